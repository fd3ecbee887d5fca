"""Every code block of README.md and docs/*.rst runs.

The Python blocks of a page (``.. code-block:: python``, ``::`` literal blocks, which Sphinx
highlights as Python, ``>>>`` doctest blocks; in README.md the ```python fences) run in the order of
the page in one namespace, with a temporary directory as the working directory: a page builds on
its earlier blocks (the first block of a page that needs a model builds one), never on another page.
Shell blocks (``console``: the ``$`` lines; ``bash``: every line) run in a subprocess, with ``lrpcpp``
and ``python`` the command and interpreter of this checkout. A block that is not run says so in
the source, on the line before it: ``.. not-executed: REASON`` (an rst comment) or, in Markdown,
``<!-- not-executed: REASON -->``; :func:`test_blocks_not_executed_are_marked` counts and lists them.
"""

import dataclasses
import doctest
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap
from typing import List, Optional

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.rst"))
PYTHON = {"python", "python3", "py", "pycon", "doctest"}
SHELL = {"console", "bash", "sh", "shell"}
# pages whose Python blocks take long enough for the slow set (what makes them slow)
SLOW_PAGES = {
    "README.md": "torch.compile with inductor in the deployment example",
    "docs/deploy.rst": "TorchScript tracing, torch.export and torch.compile with inductor",
    "docs/large_models.rst": "accelerate's disk offloading and dataset attribution",
}
# pages that run torch.compile or torch.export (the `compile` marker)
COMPILE_PAGES = {"README.md", "docs/deploy.rst"}
NOT_EXECUTED = re.compile(r"^\s*\.\. not-executed:\s*(\S.*)$")
NOT_EXECUTED_MD = re.compile(r"^\s*<!--\s*not-executed:\s*(\S.*?)\s*-->\s*$")


@dataclasses.dataclass
class Block:
    page: str
    line: int  # of the directive or fence, 1-based
    language: str
    code: str
    not_executed: Optional[str] = None  # the reason its marker gives
    first: int = 0  # the page line of its first line of code, 1-based (0: unknown)

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def _marker(lines: List[str], i: int, pattern) -> Optional[str]:
    """The reason of a not-executed marker on the last non-blank line before line ``i``."""
    j = i - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    m = pattern.match(lines[j]) if j >= 0 else None
    return m.group(1) if m else None


def _indented_body(lines: List[str], start: int, indent: int):
    """The lines from ``start`` on that are blank or indented deeper than ``indent``: (text, end,
    index of the first line of text)."""
    while start < len(lines) and (re.match(r"^\s+:[\w-]+:", lines[start]) or not lines[start].strip()):
        start += 1  # a directive's options, blank lines
    j = start
    while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
        j += 1
    return textwrap.dedent("\n".join(lines[start:j])).strip("\n") + "\n", j, start


def rst_blocks(text: str, page: str = "<rst>") -> List[Block]:
    """The code blocks of a reStructuredText page: code-block directives (their options left out),
    ``::`` literal blocks and ``>>>`` doctest paragraphs."""
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        directive = re.match(r"^\s*\.\. (?:code-block|code|sourcecode)::\s*(\S*)\s*$", line)
        literal = line.rstrip().endswith("::") and not line.lstrip().startswith("..")
        if directive or literal:
            code, end, first = _indented_body(lines, i + 1, indent)
            language = (directive.group(1) or "python") if directive else "python"
            if code.strip():
                blocks.append(Block(page, i + 1, language, code, _marker(lines, i, NOT_EXECUTED), first + 1))
            i = end
            continue
        if line.lstrip().startswith(">>> "):
            j = i
            while j < len(lines) and lines[j].strip():
                j += 1
            code = textwrap.dedent("\n".join(lines[i:j])) + "\n"
            blocks.append(Block(page, i + 1, "doctest", code, _marker(lines, i, NOT_EXECUTED), i + 1))
            i = j
            continue
        i += 1
    return blocks


def markdown_blocks(text: str, page: str = "<md>") -> List[Block]:
    """The fenced code blocks of a Markdown page."""
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(```+)\s*([\w+-]*)", lines[i])
        if fence:
            j = i + 1
            while j < len(lines) and not lines[j].startswith(fence.group(1)):
                j += 1
            code = "\n".join(lines[i + 1 : j]) + "\n"
            marker = _marker(lines, i, NOT_EXECUTED_MD)
            blocks.append(Block(page, i + 1, fence.group(2) or "text", code, marker, i + 2))
            i = j + 1
            continue
        i += 1
    return blocks


def page_blocks(page: str) -> List[Block]:
    text = (ROOT / page).read_text(encoding="utf-8")
    return markdown_blocks(text, page) if page.endswith(".md") else rst_blocks(text, page)


def run_python(blocks: List[Block], namespace: dict) -> None:
    """Runs the blocks in order in one namespace; a traceback names the page and its line."""
    for block in blocks:
        if block.language in ("pycon", "doctest") or block.code.lstrip().startswith(">>>"):
            test = doctest.DocTestParser().get_doctest(block.code, namespace, block.where, block.page, block.first - 1)
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
            runner.run(test, clear_globs=False)
            assert not runner.failures, f"the doctest block at {block.where} failed"
        else:
            # padded with empty lines, so that the line numbers of a traceback are those of the page
            exec(compile("\n" * (max(block.first, 1) - 1) + block.code, block.page, "exec"), namespace)


def shell_commands(block: Block) -> List[str]:
    """The commands of a shell block: a console block's ``$`` lines (with their ``\\`` continuations;
    the other lines are output), every line of a bash block."""
    commands: List[str] = []
    continued = False
    for line in block.code.splitlines():
        if continued:
            commands[-1] += "\n" + line
        elif block.language == "console":
            if line.startswith("$ "):
                commands.append(line[2:])
            else:
                continue
        elif line.strip():
            commands.append(line)
        else:
            continue
        continued = line.rstrip().endswith("\\")
    return commands


def _executed(block: Block) -> bool:
    return block.not_executed is None and (block.language in PYTHON or block.language in SHELL)


ALL = [b for page in PAGES for b in page_blocks(page)]
PYTHON_PAGES = [p for p in PAGES if any(_executed(b) and b.language in PYTHON for b in ALL if b.page == p)]
SHELL_BLOCKS = [b for b in ALL if _executed(b) and b.language in SHELL]


def _marks(page):
    return [pytest.mark.slow] * (page in SLOW_PAGES) + [pytest.mark.compile] * (page in COMPILE_PAGES)


@pytest.mark.parametrize("page", [pytest.param(p, marks=_marks(p)) for p in PYTHON_PAGES])
def test_python_blocks_of_a_page_run_in_order(page, tmp_path, monkeypatch):
    import lrpcpp

    monkeypatch.chdir(tmp_path)
    blocks = [b for b in ALL if b.page == page and _executed(b) and b.language in PYTHON]
    # the registries a page may add to (register_family, register_preset) are put back as they were
    registries = {id(r): (r, dict(r)) for r in (lrpcpp.models.families.FAMILIES, lrpcpp.PRESETS)}
    try:
        run_python(blocks, {"__name__": "__snippets__"})
    finally:
        for registry, saved in registries.values():
            registry.clear()
            registry.update(saved)


def _command_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """A directory with ``lrpcpp`` and ``python`` as this checkout runs them (the console script is not
    installed in a checkout)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, args in (("lrpcpp", "-m lrpcpp"), ("python", "")):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {args} "$@"\n')
        script.chmod(0o755)
    return bin_dir


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[b.where for b in SHELL_BLOCKS])
def test_shell_blocks_run(block, tmp_path):
    run_shell(block, tmp_path)


def run_shell(block: Block, cwd: pathlib.Path) -> None:
    """Runs the commands of a shell block one by one in ``cwd``; one that fails fails the test."""
    from conftest import subprocess_env

    env = subprocess_env()
    env["PATH"] = f"{_command_dir(cwd)}{os.pathsep}{env['PATH']}"
    env["NO_COLOR"] = "1"
    for command in shell_commands(block):
        proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{block.where}: `{command}` exited {proc.returncode}:\n{proc.stderr[-3000:]}"


def test_blocks_not_executed_are_marked(capsys):
    """Every block runs, or says why not with a marker; the ones that do not run are listed."""
    unmarked = [b.where + f" [{b.language}]" for b in ALL if b.not_executed is None and not _executed(b)]
    assert not unmarked, f"blocks that neither run nor carry a not-executed marker: {unmarked}"
    skipped = [b for b in ALL if b.not_executed is not None]
    ran = len(ALL) - len(skipped)
    with capsys.disabled():
        print(f"\ncode blocks of README.md and docs/*.rst: {ran} run, {len(skipped)} not executed:")
        for b in skipped:
            print(f"  {b.where} [{b.language}]: {b.not_executed}")
    assert ran > len(skipped)


# ----------------------------------------------------------------------------- the collector itself
BROKEN = """Title
=====

.. code-block:: python

   import math
   x = math.sqrt(4)

Text, then a block that uses what the first defined.

.. code-block:: python
   :caption: checked

   assert x == 3, "x is 2"

Literal::

   y = x + 1

>>> x + 1
3.0

.. not-executed: a C++ fragment

.. code-block:: cpp

   int main() {}
"""


def test_a_broken_snippet_fails_and_names_its_line():
    blocks = rst_blocks(BROKEN, "broken.rst")
    assert [(b.line, b.language, b.not_executed) for b in blocks] == [
        (4, "python", None),
        (11, "python", None),
        (16, "python", None),
        (20, "doctest", None),
        (25, "cpp", "a C++ fragment"),
    ]
    assert blocks[1].code == 'assert x == 3, "x is 2"\n'
    with pytest.raises(AssertionError, match="x is 2") as info:
        run_python(blocks[:2], {})
    assert any((str(entry.path), entry.lineno + 1) == ("broken.rst", 14) for entry in info.traceback)
    namespace: dict = {}
    run_python([blocks[0], blocks[2], blocks[3]], namespace)  # the doctest's 3.0 is right
    assert namespace["y"] == 3.0
    with pytest.raises(AssertionError, match="doctest block at broken.rst:20"):
        run_python([blocks[0], dataclasses.replace(blocks[3], code=">>> x\n3.0\n")], {})


def test_markdown_fences_markers_and_shell_commands():
    text = "a\n\n```python\nz = 1\n```\n\n<!-- not-executed: needs a GPU -->\n```bash\nmake run  # all\n```\n"
    blocks = markdown_blocks(text, "R.md")
    assert [(b.line, b.language, b.code, b.not_executed) for b in blocks] == [
        (3, "python", "z = 1\n", None),
        (8, "bash", "make run  # all\n", "needs a GPU"),
    ]
    console = Block("p", 1, "console", "$ lrpcpp explain \\\n    --json a.json\noutput line\n$ ls\n")
    assert shell_commands(console) == ["lrpcpp explain \\\n    --json a.json", "ls"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_failing_shell_command_fails(tmp_path):
    block = Block("p.rst", 3, "console", "$ python -c 'print(1)'\n1\n$ lrpcpp no-such-command\n")
    with pytest.raises(AssertionError, match=r"p.rst:3: `lrpcpp no-such-command` exited 2"):
        run_shell(block, tmp_path)

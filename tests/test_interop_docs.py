"""The snippets of docs/interop.rst run, in order, in one namespace (each asserts what it shows)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^\.\. code-block:: python\n\n((?:   .*\n|\n)+)", re.MULTILINE)


def snippets(text):
    return [re.sub(r"^   ", "", block, flags=re.MULTILINE) for block in BLOCK.findall(text)]


def test_interop_page_snippets_run():
    blocks = snippets((ROOT / "docs" / "interop.rst").read_text())
    assert len(blocks) == 7
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/interop.rst snippet {i}", "exec"), namespace)


def test_snippet_failure_is_seen():
    blocks = snippets(".. code-block:: python\n\n   assert 1 == 2\n\ntext\n")
    assert blocks == ["assert 1 == 2\n\n"]
    try:
        exec(compile(blocks[0], "snippet", "exec"), {})
    except AssertionError:
        return
    raise AssertionError("a failing snippet must fail")

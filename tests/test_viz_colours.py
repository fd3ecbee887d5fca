"""One colour pipeline for every view: a relevance value gets the same colour in the HTML, the image
PNG, the terminal, the LaTeX figure and the text PNG, every view shows the scale with the largest
|relevance| at its ends, and text on a colour stays readable."""

import re

import numpy as np
import pytest
from lrpcpp import viz
from lrpcpp.cli import render
from lrpcpp.cli.explain import Explanation
from PIL import Image

VALUES = [0.5, -2.0, 0.0, 1.25, -0.3]
WORDS = ["a", "b", "c", "d", "e"]


def bwr(v):
    """matplotlib's ``bwr`` at v in [-1, 1], transcribed in float64: blue (0, 0, 1), white, red (1, 0, 0),
    linear in between, sampled at 255 points (v rounded to the nearest)."""
    t = np.rint((v + 1.0) * 127.0) / 254.0
    rgb = (2 * t, 2 * t, 1.0) if t <= 0.5 else (1.0, 2 - 2 * t, 2 - 2 * t)
    return np.array(rgb) * 255.0


def explanation(values=VALUES, generated=None):
    n = len(values)
    return Explanation(
        model="m",
        method="attnlrp",
        task="classifier",
        output=1.0,
        texts=[" ".join(WORDS[:n])],
        target="pos",
        tokens=WORDS[:n],
        relevance=list(values),
        segment=[0] * n,
        special=[False] * n,
        generated=generated or [False] * n,
        words=WORDS[:n],
        space=[True] * n,
    )


def test_a_value_has_one_colour_in_every_view(tmp_path):
    scale = max(abs(v) for v in VALUES)
    expected = [viz.colour(v, scale) for v in VALUES]
    for v, rgb in zip(VALUES, expected):  # the colour map, transcribed
        np.testing.assert_allclose(rgb, bwr(v / scale), atol=1.0)
    # HTML: each token's background
    page = viz.text_html(WORDS, VALUES)
    found = re.findall(r"background-color: rgb\((\d+), (\d+), (\d+)\)", page)
    assert [tuple(map(int, c)) for c in found] == expected
    page = render.html_page([explanation()])
    found = re.findall(r'class="tok" style="background-color: rgb\((\d+), (\d+), (\d+)\)', page)
    assert [tuple(map(int, c)) for c in found] == expected
    # terminal: each token's 24-bit background escape, in the inline text
    text = viz.text_terminal(WORDS, VALUES, color=True)
    inline = text.split("\n")[2]
    found = re.findall(r"\x1b\[48;2;(\d+);(\d+);(\d+)m", inline)
    assert [tuple(map(int, c)) for c in found] == expected
    # the image PNG: the same values as pixels, decoded with Pillow
    path = tmp_path / "row.png"
    viz.heatmap(np.array([VALUES]), str(path))
    pixels = np.asarray(Image.open(path).convert("RGB"))[0]
    assert [tuple(p) for p in pixels.tolist()] == expected
    # LaTeX: \colorbox[rgb] of each token
    tex = render.latex_document([explanation()])
    boxes = re.findall(r"\\lrpcpptok\{([0-9.]+),([0-9.]+),([0-9.]+)\}\{[01]\}\{([a-e])\}", tex)
    assert [w for *_, w in boxes] == WORDS
    assert [tuple(round(float(c) * 255) for c in box[:3]) for box in boxes] == expected


def test_the_text_png_boxes_have_the_colours(tmp_path):
    values = [2.0, -2.0, 0.0]
    render.text_png([explanation(values)], str(tmp_path / "t.png"))
    pixels = np.asarray(Image.open(tmp_path / "t.png").convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in pixels.tolist()}
    assert viz.colour(2.0, 2.0) == (255, 0, 0) and viz.colour(-2.0, 2.0) == (0, 0, 255)
    assert (255, 0, 0) in colours and (0, 0, 255) in colours


def test_every_view_shows_the_scale_ends_as_the_largest_absolute_relevance(tmp_path, monkeypatch):
    scale = 2.0  # max |VALUES|
    for page in (viz.text_html(WORDS, VALUES), render.html_page([explanation()])):
        assert re.findall(r'class="lo">([^<]*)<', page) == ["-2"]
        assert re.findall(r'class="hi">([^<]*)<', page) == ["+2"]
    for text in (viz.text_terminal(WORDS, VALUES), render.terminal([explanation()])):
        (line,) = [line for line in text.splitlines() if "colour scale:" in line]
        assert re.findall(r"[-+]?\d[\d.]*", line) == ["-2", "+0", "+2"]
    grid = viz.image_terminal(np.array([[1.0, -3.0], [0.5, 0.0]]))
    assert re.findall(r"[-+]?\d[\d.]*", grid.splitlines()[-2]) == ["-3", "+0", "+3"]
    tex = render.latex_document([explanation()])
    scale_line = [line for line in tex.splitlines() if "colour scale" in line][0]
    assert re.findall(r"\{([-+][\d.]+)\}", scale_line) == ["-2", "+0", "+2"]
    # the text PNG: a colour bar from -scale to +scale, its ends and middle labelled
    bars = []
    real = render.add_colorbar

    def recording(figure, rect, vrange, *args, **kwargs):
        bar = real(figure, rect, vrange, *args, **kwargs)
        bars.append((vrange, [t.get_text() for t in bar.ax.get_xticklabels()]))
        return bar

    monkeypatch.setattr(render, "add_colorbar", recording)
    render.text_png([explanation()], str(tmp_path / "t.png"))
    assert bars == [((-scale, scale), ["-2", "0", "2"])]


def test_text_on_every_colour_is_readable():
    for cmap in ("bwr", "seismic", "coldnhot"):
        for rgb in viz.colorize(np.linspace(-1.0, 1.0, 255), cmap).tolist():
            assert viz.contrast_ratio(rgb, viz.text_color(rgb)) >= 4.5, (cmap, rgb)
    assert viz.text_color((0, 0, 255)) == (255, 255, 255)  # white on the strongest blue
    assert viz.text_color((255, 255, 255)) == (0, 0, 0)
    # the terminal sets that foreground with every background; the table's bars are on colours too
    text = viz.text_terminal(WORDS, VALUES, color=True)
    for bg, fg in re.findall(r"\x1b\[48;2;(\d+;\d+;\d+)m\x1b\[38;2;(\d+;\d+;\d+)m", text):
        background, foreground = [tuple(map(int, c.split(";"))) for c in (bg, fg)]
        assert viz.contrast_ratio(background, foreground) >= 4.5
    assert "\x1b[34m" not in text and "\x1b[31m" not in text  # no bare blue or red foreground


def test_generated_tokens_are_underlined_in_every_view(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    e = explanation(generated=[False, False, False, True, True])
    e.step = 0
    page = render.html_page([e])
    assert len(re.findall(r'class="tok generated"', page)) == 2 and viz.GENERATED_NOTE in page
    tex = render.latex_document([e])
    assert len(re.findall(r"\\underline\{[de]\}", tex)) == 2 and viz.GENERATED_NOTE in tex
    colour = render.terminal([e], color=True)
    assert colour.count("\x1b[4m") == 2 and viz.GENERATED_NOTE in colour
    plain = render.terminal([e])
    assert " _d_ _e_" in plain and viz.GENERATED_NOTE in plain
    drawn = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), real(self, *a, **k))[1])
    render.text_png([e], str(tmp_path / "g.png"))
    texts = [t.get_text() for t in drawn[0].texts]
    assert f"{viz.GENERATED_NOTE}:" in texts
    lines = [a for a in drawn[0].artists if isinstance(a, Line2D)]
    assert len(lines) == 3  # under "like this" of the note and under the two generated tokens


def test_unknown_colour_map_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown colour map 'no-such-map'"):
        viz.colorize(np.zeros(2), "no-such-map")

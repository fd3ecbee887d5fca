"""How an :class:`lrpcpp.Attribution` shows itself: HTML in a notebook (``_repr_html_``, tokens
coloured by relevance, an inline PNG for pixels), the terminal view elsewhere (``show()``), and the
text views of :mod:`lrpcpp.viz` they are made of."""

import base64
import io
import re
import sys
import types

import numpy as np
import pytest
import torch
from lrpcpp import Attribution, viz

TOKENS = ["<s>", "a&b", "cat", '"q"', "</s>"]


def attribution(token_relevance, pixels=False):
    """An Attribution as lrpcpp.attribute makes it: relevance, and its sum over the hidden (or channel) dim."""
    if pixels:
        relevance = token_relevance.unsqueeze(-3).expand(*token_relevance.shape[:-2], 3, *token_relevance.shape[-2:])
        relevance = relevance / 3
    else:
        relevance = (token_relevance / 4).unsqueeze(-1).expand(*token_relevance.shape, 4)
    output = token_relevance.sum(dim=(-2, -1) if pixels else -1)
    return Attribution(relevance=relevance, token_relevance=token_relevance, output=output, target=None)


def bwr(v):
    """matplotlib's ``bwr`` at v in [-1, 1], transcribed in float64: blue (0, 0, 1), white, red (1, 0, 0),
    linear in between, sampled at 255 points (v rounded to the nearest)."""
    t = np.rint((v + 1.0) * 127.0) / 254.0
    rgb = (2 * t, 2 * t, 1.0) if t <= 0.5 else (1.0, 2 - 2 * t, 2 - 2 * t)
    return np.array(rgb) * 255.0


def expected_rgb(r, values):
    """The colour scale: bwr at r / max |r|."""
    return bwr(r / max(abs(v) for v in values))


def same_colour(found, expected):
    np.testing.assert_allclose(np.asarray(found, dtype=np.float64), expected, atol=1.0)


VALUES = [0.5, -1.0, 0.25, 0.0, 2.0]


def spans(page):
    return re.findall(r'<span style="background-color: rgb\((\d+), (\d+), (\d+)\);[^"]*" title="([^"]*)"', page)


def test_html_colours_every_token_with_its_value_and_a_scale():
    page = attribution(torch.tensor([VALUES], dtype=torch.float64))._repr_html_()
    assert [title.split(":")[0] for *_, title in spans(page)] == ["0", "1", "2", "3", "4"]  # no tokens: positions
    attr = attribution(torch.tensor([VALUES], dtype=torch.float64))
    attr.tokens = [TOKENS]
    page = attr._repr_html_()
    found = spans(page)
    assert len(found) == len(TOKENS)
    escaped = ["&lt;s&gt;", "a&amp;b", "cat", "&quot;q&quot;", "&lt;/s&gt;"]
    for (red, green, blue, title), word, r in zip(found, escaped, VALUES):
        same_colour((int(red), int(green), int(blue)), expected_rgb(r, VALUES))
        assert title.startswith(word + ": ") and float(title.split(": ")[1]) == pytest.approx(r, rel=1e-3)
        assert f">{word}</span>" in page
    # nothing of a token is left unescaped: its text is never markup
    assert "<s>" not in page and "</s>" not in page and "a&b" not in page
    # the colour scale: -max to +max |relevance|
    assert "linear-gradient" in page and "-2<" in page and "+2<" in page


def test_tokens_from_a_tokenizer_and_one_view_per_batch_item_and_target(capsys):
    class Tokenizer:
        def convert_ids_to_tokens(self, ids):
            return [f"t{i}" for i in ids]

    attr = attribution(torch.arange(12, dtype=torch.float64).reshape(2, 2, 3) - 5)  # K=2 targets, batch 2
    attr.show(tokenizer=Tokenizer(), input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]))
    out = capsys.readouterr().out
    for label in ("target 0, item 0", "target 0, item 1", "target 1, item 0", "target 1, item 1"):
        assert f"--- {label}\n" in out
    assert "t1" in out and "t6" in out
    with pytest.raises(TypeError, match="input_ids"):
        attr.show(tokenizer=Tokenizer())
    with pytest.raises(ValueError, match="tokens for 1 items, the batch has 2"):
        attr.show(tokens=[["a", "b", "c"]])
    with pytest.raises(ValueError, match="3 tokens for 5 relevance values"):
        attribution(torch.tensor([VALUES])).show(tokens=["a", "b", "c"])


def test_show_prints_the_terminal_view(capsys):
    attribution(torch.tensor([VALUES], dtype=torch.float64)).show(tokens=TOKENS)
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # not a terminal: no colour codes
    table = [line.split() for line in out.splitlines() if line.startswith("  ") and len(line.split()) >= 2]
    rows = {cells[0]: cells[1] for cells in table}
    for token, r in zip(TOKENS, VALUES):
        assert float(rows[token]) == pytest.approx(r)
    assert "sum of the relevance of all tokens: +1.7500" in out
    assert viz.text_terminal(TOKENS, VALUES) == out


def test_show_in_a_notebook_displays_the_html(monkeypatch):
    shown = []

    class ZMQInteractiveShell:
        pass

    ipython = types.ModuleType("IPython")
    ipython.get_ipython = ZMQInteractiveShell
    display = types.ModuleType("IPython.display")
    display.HTML = lambda text: ("html", text)
    display.display = shown.append
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    attribution(torch.tensor([VALUES])).show(tokens=TOKENS)
    ((kind, text),) = shown
    assert kind == "html" and len(spans(text)) == len(TOKENS) and "&lt;s&gt;" in text


def test_pixel_relevance_is_an_inline_png_with_its_scale():
    from PIL import Image

    rel = torch.tensor([[[1.0, 0.0, -1.0, 0.5, 0.0]] * 4])  # [1, 4, 5]
    page = attribution(rel, pixels=True)._repr_html_()
    (data,) = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    png = Image.open(io.BytesIO(base64.b64decode(data)))
    assert png.format == "PNG" and png.size == (5 * 56, 4 * 56)  # enlarged to at least 224 pixels a side
    row = np.asarray(png.convert("RGB"))[0]
    for column, r in enumerate([1.0, 0.0, -1.0, 0.5, 0.0]):  # red, white, blue, half red, white
        same_colour(row[column * 56], bwr(r))
    # the scale's ends: the largest |relevance| of the map (summed over the 3 channels: 1)
    assert re.search(r'class="lo">-1<', page) and re.search(r'class="hi">\+1<', page)


def test_an_image_whose_channels_height_and_width_are_equal_is_shown_as_an_image(capsys):
    rel = torch.arange(27, dtype=torch.float64).reshape(1, 3, 3, 3) - 13  # [1, C=3, H=3, W=3]
    attr = Attribution(relevance=rel, token_relevance=rel.sum(-3), output=rel.sum((-3, -2, -1)), target=None)
    # the shapes cannot tell: relevance.shape[:-1] == token_relevance.shape; the sum can
    assert attr._views()[0][2] is None
    attr.inputs = {"pixel_values": rel}  # as lrpcpp.attribute fills it: the input's name decides
    attr.show()
    out = capsys.readouterr().out
    assert "cells of summed pixel relevance" in out and "sum of the pixel relevance: " in out
    assert out == viz.image_terminal(rel[0])
    # the same shapes from a text input (embeddings [1, seq=3, 3, hidden=3]: K=1 target): tokens
    text = Attribution(relevance=rel, token_relevance=rel.sum(-1), output=rel.sum((-2, -1)), target=None)
    text.inputs = {"input_ids": rel}
    assert text._views()[0][2] == ["0", "1", "2"]

"""lrpcpp.viz: symmetric normalisation, the colour maps, the overlay and the PNG files it writes."""

import numpy as np
import pytest
import torch
from lrpcpp import viz
from PIL import Image


def read_png(path):
    """(width, height, mode, pixels) of a PNG file, decoded by Pillow."""
    image = Image.open(path)
    assert image.format == "PNG"
    return image.width, image.height, image.mode, np.asarray(image)


def bwr(v):
    """matplotlib's ``bwr`` at v in [-1, 1], transcribed in float64: blue (0, 0, 1), white, red (1, 0, 0),
    linear in between, sampled at 255 points (v rounded to the nearest)."""
    t = np.rint((v + 1.0) * 127.0) / 254.0
    rgb = (2 * t, 2 * t, 1.0) if t <= 0.5 else (1.0, 2 - 2 * t, 2 - 2 * t)
    return np.array(rgb) * 255.0


def test_symmetric_normalisation_keeps_zero_and_sign():
    r = torch.tensor([[[-2.0, 0.0], [1.0, 4.0]]])  # [C=1, H, W]
    n = viz.normalize(r)
    np.testing.assert_allclose(n, [[-0.5, 0.0], [0.25, 1.0]])
    np.testing.assert_allclose(viz.normalize(np.zeros((3, 2, 2))), np.zeros((2, 2)))
    clipped = viz.normalize(np.array([[1.0, 2.0], [3.0, 100.0]]), percentile=75)
    assert clipped.max() == 1.0 and clipped[0, 0] == pytest.approx(1.0 / np.percentile([1, 2, 3, 100], 75))
    np.testing.assert_allclose(viz.normalize(np.array([[1.0, 3.0]]), symmetric=False), [[-1.0, 1.0]])


def test_channels_are_summed_and_batches_refused():
    r = torch.randn(1, 3, 4, 5)
    np.testing.assert_allclose(viz.to_2d(r), r[0].double().sum(0).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="one image at a time"):
        viz.to_2d(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="inf or nan"):
        viz.normalize(np.array([[np.nan, 1.0]]))


def test_red_white_blue():
    rgb = viz.colorize(np.array([[-1.0, 0.0, 1.0, 0.5]]), "bwr")
    assert rgb[0, 0].tolist() == [0, 0, 255]  # negative: blue
    assert rgb[0, 1].tolist() == [255, 255, 255]  # zero: white
    assert rgb[0, 2].tolist() == [255, 0, 0]  # positive: red
    values = np.linspace(-1.0, 1.0, 1001)
    np.testing.assert_allclose(viz.colorize(values), np.stack([bwr(v) for v in values]), atol=1.0)
    # symmetric around 0: r and -r get mirrored colours (red and blue swapped)
    np.testing.assert_array_equal(viz.colorize(values), viz.colorize(-values)[:, ::-1])
    assert viz.colorize(np.zeros((1, 1)), "coldnhot")[0, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="unknown colour map"):
        viz.colorize(np.zeros((1, 1)), "no-such-map")


def test_heatmap_png_round_trip(tmp_path):
    r = torch.zeros(3, 6, 8)
    r[0, 1, 2] = 5.0
    r[1, 4, 6] = -2.5
    path = tmp_path / "heat.png"
    rgb = viz.heatmap(r, str(path))
    width, height, mode, pixels = read_png(path)
    assert (width, height, mode) == (8, 6, "RGB")
    assert np.array_equal(pixels, rgb)
    assert pixels[1, 2].tolist() == [255, 0, 0] and pixels[0, 0].tolist() == [255, 255, 255]
    np.testing.assert_allclose(pixels[4, 6], bwr(-0.5), atol=1.0)


def test_overlay_on_the_input_image(tmp_path):
    r = np.zeros((4, 4))
    r[0, 0] = 1.0
    image = torch.full((3, 8, 8), 0.2)  # [3, H, W] in [0, 1], twice the heatmap's size
    rgb = viz.heatmap(r, str(tmp_path / "o.png"), image=image, alpha=0.25)
    assert rgb.shape == (8, 8, 3)
    expected_red = (0.25 * np.array([1.0, 0.0, 0.0]) + 0.75 * 0.2) * 255
    np.testing.assert_allclose(rgb[1, 1], expected_red, atol=1.0)  # nearest-neighbour upscaled corner
    expected_white = (0.25 * 1.0 + 0.75 * 0.2) * 255
    np.testing.assert_allclose(rgb[7, 7], [expected_white] * 3, atol=1.0)
    # a normalised model input (outside [0, 1]) is min-max scaled; uint8 images are divided by 255
    normalised = np.stack([np.linspace(-2, 2, 64).reshape(8, 8)] * 3, axis=-1)
    assert viz.overlay(viz.colorize(viz.normalize(np.zeros((8, 8)))), normalised, 0.0)[7, 7].tolist() == [255] * 3
    assert viz.overlay(np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 51, np.uint8), 0.0)[0, 0].tolist() == [51] * 3
    with pytest.raises(ValueError, match="alpha must lie in"):
        viz.overlay(rgb, image, 1.5)


def test_size_and_gray_png(tmp_path):
    rgb = viz.heatmap(np.eye(3), size=6, cmap="gray")
    assert rgb.shape == (6, 6, 3)
    viz.write_png(str(tmp_path / "g.png"), rgb[..., 0])
    assert read_png(tmp_path / "g.png")[2] == "L"


def test_colour_bar_with_the_symmetric_scale(tmp_path):
    pytest.importorskip("matplotlib", reason="the colour bar is drawn with matplotlib (the cli extra)")
    r = np.zeros((16, 24))
    r[2, 3], r[10, 20] = 0.5, -2.0  # the symmetric range is [-2, 2]
    assert viz.value_range(r) == (-2.0, 2.0)
    assert viz.value_range(r, symmetric=False) == (-2.0, 0.5)
    figure = viz.heatmap_figure(r)
    bar = figure.axes[1]
    assert [t.get_text() for t in bar.get_yticklabels()] == ["-2", "0", "2"]
    assert bar.get_ylim() == (-2.0, 2.0)
    path = tmp_path / "bar.png"
    rgb = viz.heatmap(r, str(path), colorbar=True)
    width, height, _, pixels = read_png(path)
    np.testing.assert_array_equal(pixels, rgb)
    # the map is drawn 256 px wide (x 256/24) with square pixels, the colour bar to the right of it
    assert abs(height - 16 * 256 / 24) <= 1 and width > 256 + 60
    heat = viz.colorize(viz.normalize(r))
    np.testing.assert_array_equal(pixels[int(10.5 * height / 16), int(20.5 * 256 / 24)], heat[10, 20])
    np.testing.assert_array_equal(pixels[int(2.5 * height / 16), int(3.5 * 256 / 24)], heat[2, 3])
    # a column of the colour bar: red (positive) at the top, white in the middle, blue at the bottom
    bar_column = pixels[:, 256 + 15].astype(int)
    top, middle, bottom = bar_column[int(0.1 * height)], bar_column[height // 2], bar_column[int(0.9 * height)]
    assert top[0] > 200 and top[2] < 100 and bottom[2] > 200 and bottom[0] < 100 and middle.min() > 200
    zero = viz.heatmap_figure(np.zeros((4, 4)))
    assert [t.get_text() for t in zero.axes[1].get_yticklabels()] == ["-1", "0", "1"]


def test_without_matplotlib_a_heatmap_says_how_to_install_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    viz._colour_table.cache_clear()  # the colour maps already looked up
    try:
        with pytest.raises(ImportError, match="pip install matplotlib"):
            viz.heatmap(np.ones((4, 4)), cmap="seismic")
    finally:
        viz._colour_table.cache_clear()

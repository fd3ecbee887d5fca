"""Relevance heatmaps as images.

A relevance map of an image (``[H, W]``, ``[C, H, W]`` or ``[1, C, H, W]``; channels are summed) is
normalised symmetrically, so that 0 stays the middle of the colour map and the largest absolute value
reaches an end of it, coloured with a diverging colour map and written as a PNG, optionally blended
over the input image::

    import lrpcpp
    import lrpcpp.viz

    attr = lrpcpp.attribute(model, pixel_values=x, preset="vit")
    lrpcpp.viz.heatmap(attr.relevance[0], "heatmap.png")                         # red-white-blue
    lrpcpp.viz.heatmap(attr.relevance[0], "overlay.png", image=pixels[0], alpha=0.5)

Only numpy is needed: the PNG encoder is the standard library's ``zlib``, and the built-in colour
maps are :data:`COLORMAPS`; any other name is looked up in matplotlib, when it is installed.
"""

import html
import struct
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._files import atomic_write

__all__ = [
    "heatmap",
    "heatmap_figure",
    "value_range",
    "normalize",
    "colorize",
    "overlay",
    "write_png",
    "png_bytes",
    "to_2d",
    "COLORMAPS",
]

Color = Tuple[float, float, float]

#: Built-in colour maps: ``(position in [-1, 1], RGB in [0, 1])`` anchors, interpolated linearly.
#: ``bwr``: blue, white, red (negative, zero, positive relevance); ``seismic``: the same through
#: darker ends; ``coldnhot``: light blue, blue, black, red, yellow (zero is black, for overlays on
#: bright images); ``gray``: black to white over [-1, 1].
COLORMAPS: Dict[str, Sequence[Tuple[float, Color]]] = {
    "bwr": ((-1.0, (0.0, 0.0, 1.0)), (0.0, (1.0, 1.0, 1.0)), (1.0, (1.0, 0.0, 0.0))),
    "seismic": (
        (-1.0, (0.0, 0.0, 0.3)),
        (-0.5, (0.0, 0.0, 1.0)),
        (0.0, (1.0, 1.0, 1.0)),
        (0.5, (1.0, 0.0, 0.0)),
        (1.0, (0.5, 0.0, 0.0)),
    ),
    "coldnhot": (
        (-1.0, (0.0, 1.0, 1.0)),
        (-0.5, (0.0, 0.0, 1.0)),
        (0.0, (0.0, 0.0, 0.0)),
        (0.5, (1.0, 0.0, 0.0)),
        (1.0, (1.0, 1.0, 0.0)),
    ),
    "gray": ((-1.0, (0.0, 0.0, 0.0)), (1.0, (1.0, 1.0, 1.0))),
}


def _numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor, on any device and of any floating dtype
        a = a.detach().float().cpu().numpy()
    return np.asarray(a)


def to_2d(relevance: Any) -> np.ndarray:
    """``relevance`` as one ``[H, W]`` float64 map: ``[H, W]`` as it is, ``[C, H, W]`` and
    ``[1, C, H, W]`` summed over the channels (the relevance of a pixel is that of its channels)."""
    r = _numpy(relevance).astype(np.float64)
    if r.ndim == 4:
        if r.shape[0] != 1:
            raise ValueError(f"lrpcpp.viz: one image at a time; got a batch of {r.shape[0]} (pass relevance[i])")
        r = r[0]
    if r.ndim == 3:
        r = r.sum(axis=0)
    if r.ndim != 2:
        raise ValueError(
            f"lrpcpp.viz: expected a relevance map [H, W], [C, H, W] or [1, C, H, W], got shape {tuple(r.shape)}"
        )
    return r


def value_range(relevance: Any, symmetric: bool = True, percentile: Optional[float] = None) -> Tuple[float, float]:
    """The relevance values at the two ends of the colour map, as :func:`normalize` maps them:
    ``(-s, s)`` with ``s`` the largest absolute value (or that ``percentile`` of the absolute values)
    when ``symmetric``, else ``(min, max)``."""
    r = to_2d(relevance)
    if not np.all(np.isfinite(r)):
        raise ValueError("lrpcpp.viz: the relevance map holds inf or nan")
    if symmetric:
        scale = float(np.percentile(np.abs(r), percentile) if percentile is not None else np.abs(r).max())
        return -scale, scale
    return float(r.min()), float(r.max())


def normalize(relevance: Any, symmetric: bool = True, percentile: Optional[float] = None) -> np.ndarray:
    """The map scaled into [-1, 1]. ``symmetric`` (default): divided by its largest absolute value
    (or by that ``percentile`` of the absolute values, clipping what lies beyond), so that 0 maps to
    0 and the sign is kept. Otherwise min-max scaled onto [-1, 1]. A map of zeros stays zeros."""
    r = to_2d(relevance)
    lo, hi = value_range(r, symmetric, percentile)
    if symmetric:
        return np.clip(r / hi, -1.0, 1.0) if hi > 0 else np.zeros_like(r)
    return (r - lo) / (hi - lo) * 2.0 - 1.0 if hi > lo else np.zeros_like(r)


def _anchors(cmap: str) -> Optional[Sequence[Tuple[float, Color]]]:
    return COLORMAPS.get(cmap)


def colorize(normalized: np.ndarray, cmap: str = "bwr") -> np.ndarray:
    """``[H, W]`` values in [-1, 1] as ``[H, W, 3]`` uint8 RGB through the colour map ``cmap``: one of
    :data:`COLORMAPS`, or a matplotlib colour map name (``"RdBu_r"``, ``"coolwarm"``, ...) when
    matplotlib is installed."""
    v = np.clip(np.asarray(normalized, dtype=np.float64), -1.0, 1.0)
    anchors = _anchors(cmap)
    if anchors is not None:
        xs = np.array([a for a, _ in anchors])
        rgb = np.stack([np.interp(v, xs, np.array([c[k] for _, c in anchors])) for k in range(3)], axis=-1)
    else:
        try:
            from matplotlib import colormaps
        except ImportError as e:
            raise ValueError(
                f"lrpcpp.viz: unknown colour map {cmap!r}; built in: {sorted(COLORMAPS)} (other names need matplotlib)"
            ) from e
        if cmap not in colormaps:
            raise ValueError(f"lrpcpp.viz: unknown colour map {cmap!r}; built in: {sorted(COLORMAPS)}")
        rgb = colormaps[cmap]((v + 1.0) / 2.0)[..., :3]
    return np.round(rgb * 255.0).astype(np.uint8)


def _image_rgb(image: Any) -> np.ndarray:
    """An input image as ``[H, W, 3]`` float in [0, 1]: ``[3, H, W]`` or ``[H, W, 3]`` (or gray
    ``[H, W]`` / ``[1, H, W]``); uint8 is divided by 255, floats outside [0, 1] (a normalised model
    input) are min-max scaled."""
    a = _numpy(image)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"lrpcpp.viz: expected an image [3, H, W], [H, W, 3] or [H, W], got shape {tuple(a.shape)}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    a = a.astype(np.float64)
    lo, hi = a.min(), a.max()
    if lo < 0.0 or hi > 1.0:
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return a


def _resize_nearest(a: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    h, w = a.shape[:2]
    rows = np.minimum((np.arange(size[0]) * h) // size[0], h - 1)
    cols = np.minimum((np.arange(size[1]) * w) // size[1], w - 1)
    return a[rows][:, cols]


def overlay(heat: np.ndarray, image: Any, alpha: float = 0.5) -> np.ndarray:
    """``alpha * heat + (1 - alpha) * image`` as uint8 RGB; the heatmap is resized (nearest
    neighbour) to the image when their sizes differ."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"lrpcpp.viz: alpha must lie in [0, 1], got {alpha}")
    base = _image_rgb(image)
    h = heat.astype(np.float64) / 255.0
    if h.shape[:2] != base.shape[:2]:
        h = _resize_nearest(h, base.shape[:2])
    return np.round((alpha * h + (1.0 - alpha) * base) * 255.0).astype(np.uint8)


def write_png(path: str, rgb: np.ndarray) -> None:
    """Writes ``[H, W, 3]`` (or ``[H, W]`` gray) uint8 as an 8-bit PNG."""
    data = png_bytes(rgb)
    with atomic_write(path, binary=True) as f:  # a failed write leaves no cut-off PNG
        f.write(data)


def png_bytes(rgb: np.ndarray) -> bytes:
    """``[H, W, 3]`` (or ``[H, W]`` gray) uint8 as the bytes of an 8-bit PNG."""
    a = np.ascontiguousarray(rgb, dtype=np.uint8)
    if a.ndim == 2:
        color_type, a3 = 0, a
    elif a.ndim == 3 and a.shape[-1] == 3:
        color_type, a3 = 2, a
    else:
        raise ValueError(f"lrpcpp.viz: expected [H, W, 3] or [H, W] uint8, got shape {tuple(a.shape)}")
    height, width = a.shape[:2]
    raw = b"".join(b"\x00" + a3[row].tobytes() for row in range(height))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def heatmap(
    relevance: Any,
    path: Optional[str] = None,
    cmap: str = "bwr",
    image: Any = None,
    alpha: float = 0.5,
    symmetric: bool = True,
    percentile: Optional[float] = None,
    size: Optional[Union[int, Tuple[int, int]]] = None,
    colorbar: bool = False,
) -> np.ndarray:
    """The relevance map as a ``[H, W, 3]`` uint8 RGB heatmap, also written to ``path`` as a PNG when
    given.

    * ``relevance``: ``[H, W]``, ``[C, H, W]`` or ``[1, C, H, W]`` (tensor or array; channels summed).
    * ``cmap``: ``"bwr"`` (red-white-blue: positive red, negative blue), ``"seismic"``, ``"coldnhot"``,
      ``"gray"``, or a matplotlib name.
    * ``symmetric`` / ``percentile``: see :func:`normalize`.
    * ``image``: the input image to blend under the heatmap (see :func:`overlay`), with ``alpha``
      the heatmap's weight.
    * ``size``: ``(height, width)`` or one int for both: resize the result (nearest neighbour).
    * ``colorbar``: the heatmap with a colour bar on its right, labelled with the relevance values of
      its ends and middle (:func:`value_range`), rendered by :func:`heatmap_figure` (needs
      matplotlib); the result is then that figure's pixels, of its own size.
    """
    rgb = colorize(normalize(relevance, symmetric, percentile), cmap)
    if image is not None:
        rgb = overlay(rgb, image, alpha)
    if size is not None:
        rgb = _resize_nearest(rgb, (size, size) if isinstance(size, int) else (size[0], size[1]))
    if colorbar:
        figure = _figure(rgb, value_range(relevance, symmetric, percentile), cmap)
        figure.canvas.draw()
        rgb = np.ascontiguousarray(np.asarray(figure.canvas.buffer_rgba())[..., :3])
    if path is not None:
        write_png(path, rgb)
    return rgb


def heatmap_figure(
    relevance: Any,
    cmap: str = "bwr",
    image: Any = None,
    alpha: float = 0.5,
    symmetric: bool = True,
    percentile: Optional[float] = None,
    size: Optional[Union[int, Tuple[int, int]]] = None,
):
    """The heatmap of :func:`heatmap` as a matplotlib ``Figure`` with a colour bar whose ticks are the
    relevance values of the colour map's ends and middle (:func:`value_range`), for notebooks or
    ``figure.savefig``. Needs matplotlib (``pip install matplotlib``, or ``pip install lrpcpp[cli]``)."""
    rgb = heatmap(relevance, None, cmap, image, alpha, symmetric, percentile, size)
    return _figure(rgb, value_range(relevance, symmetric, percentile), cmap)


def _figure(rgb: np.ndarray, vrange: Tuple[float, float], cmap: str):
    """The heatmap ``rgb`` with a colour bar from ``vrange[0]`` to ``vrange[1]`` on its right."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import ListedColormap, Normalize
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "lrpcpp.viz: a colour bar is drawn with matplotlib: pip install matplotlib (or pip install "
            "'lrpcpp[cli]'); heatmap(..., colorbar=False) needs numpy only"
        ) from e
    height, width = rgb.shape[:2]
    zoom = max(1.0, 256.0 / max(height, width))  # a small map is shown larger, its pixels square
    dpi, bar = 100.0, 1.2  # the colour bar and its labels take `bar` inches on the right
    w, h = width * zoom / dpi, height * zoom / dpi
    figure = Figure(figsize=(w + bar, h), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.0, 0.0, w / (w + bar), 1.0))
    axes.imshow(rgb, interpolation="nearest", aspect="auto")
    axes.set_axis_off()
    lo, hi = vrange
    if not hi > lo:  # a map of zeros: 0 in the middle of the colour map
        lo, hi = -1.0, 1.0
    ticks = [lo, (lo + hi) / 2.0, hi]
    colours = colorize(np.linspace(-1.0, 1.0, 256), cmap) / 255.0
    cax = figure.add_axes(((w + 0.1) / (w + bar), 0.05, 0.2 / (w + bar), 0.9))
    bar_ = figure.colorbar(ScalarMappable(Normalize(lo, hi), ListedColormap(colours)), cax=cax, ticks=ticks)
    bar_.ax.set_yticklabels([f"{v:.3g}" for v in ticks])
    return figure


# ----------------------------------------------------------------------------- text
# Tokens coloured by their relevance, on the command line's scale (lrpcpp.cli.render): red for
# positive, blue for negative, the intensity |relevance| / max |relevance|.

__all__ += ["text_html", "text_terminal"]


def _token_values(tokens: Sequence[str], relevance: Any) -> Tuple[List[str], List[float]]:
    values = [float(v) for v in _numpy(relevance).astype(np.float64).reshape(-1)]
    tokens = [str(t) for t in tokens]
    if len(tokens) != len(values):
        raise ValueError(f"lrpcpp.viz: {len(tokens)} tokens for {len(values)} relevance values (one value per token)")
    return tokens, values


def text_html(tokens: Sequence[str], relevance: Any) -> str:
    """An HTML fragment (inline styles, no scripts): every token on the background colour of its
    relevance, its value shown on hover, and a colour scale from ``-max |r|`` to ``+max |r|`` below.
    Tokens are HTML-escaped, their control characters shown as escapes."""
    from .cli import render

    tokens, values = _token_values(tokens, relevance)
    scale = render.scale_of(values)
    spans = []
    for token, r in zip(tokens, values):
        word = html.escape(render.visible(token))
        red, green, blue = render.colour(r, scale)
        spans.append(
            f'<span style="background-color: rgb({red}, {green}, {blue}); color: #000; padding: 0.1em 0.15em; '
            f'border-radius: 0.2em; white-space: pre" title="{word}: {r:+.4g}" data-relevance="{r!r}">{word}</span>'
        )
    low, high = render.colour(-scale, scale), render.colour(scale, scale)
    bar = f"linear-gradient(to right, rgb{low}, rgb(255, 255, 255), rgb{high})"
    legend = (
        '<div style="display: flex; align-items: center; gap: 0.5em; font-size: 0.85em; margin-top: 0.4em">'
        f'<span>{-scale:+.4g}</span><span style="width: 12em; height: 0.8em; border: 1px solid #ccc; '
        f'background: {bar}"></span><span>{scale:+.4g}</span>'
        f"<span>(red raises the explained value, blue lowers it; sum {sum(values):+.4g})</span></div>"
    )
    return f'<div class="lrpcpp-text"><div style="line-height: 2">{" ".join(spans)}</div>{legend}</div>'


def text_terminal(tokens: Sequence[str], relevance: Any, color: bool = False, width: int = 100) -> str:
    """The tokens as terminal text (the command line's view): in a line, on a 24-bit background
    colour with ``color``, then a table of their relevance with bars, and the sum."""
    from .cli import render

    tokens, values = _token_values(tokens, relevance)
    e = _Tokens([render.visible(t) for t in tokens], values)
    idx = list(range(len(tokens)))
    scale = render.scale_of(values)
    lines = ["relevance: red (+) raises the explained value, blue (-) lowers it", ""]
    lines += render._inline(e, idx, scale, color, width) + [""] + render._table(e, idx, scale, color)
    lines.append(f"sum of the relevance of all tokens: {sum(values):+.4f}")
    return "\n".join(lines) + "\n"


class _Tokens:
    """What the command line's terminal layout reads of an explanation: the words shown, whether a
    space precedes each, their relevance."""

    def __init__(self, words: List[str], relevance: List[float]):
        self.words, self.relevance = words, relevance
        self.space = [True] * len(words)
        self.generated: List[bool] = []

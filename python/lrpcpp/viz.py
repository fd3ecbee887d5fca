"""Relevance heatmaps: images, texts and the terminal, all coloured one way.

One colour pipeline serves every view. The relevance is divided by its scale, the largest absolute
value (:func:`scale_of`, :func:`value_range`), so that 0 stays the middle of the colour map and the
strongest value of either sign reaches an end of it, and looked up in one matplotlib colour map
(:func:`colormap`; red-white-blue by default: positive red, zero white, negative blue):
:func:`colorize` for arrays, :func:`colour` for one value. Image heatmaps, the tokens of a text
(HTML, terminal, PNG, LaTeX) and the colour bars and scales that show the numbers all take their
colours from there; text on a coloured background gets the contrasting foreground of
:func:`text_color`. Pillow encodes, resizes and blends the images::

    import lrpcpp
    import lrpcpp.viz

    attr = lrpcpp.attribute(model, pixel_values=x, preset="vit")
    lrpcpp.viz.heatmap(attr.relevance[0], "heatmap.png")                         # red-white-blue
    lrpcpp.viz.heatmap(attr.relevance[0], "overlay.png", image=pixels[0], alpha=0.5)

Needs matplotlib and Pillow (``pip install matplotlib``, or ``pip install 'lrpcpp[cli]'``); both
are imported when a first colour is looked up.
"""

import functools
import html
import io
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._files import atomic_write

__all__ = [
    "heatmap",
    "heatmap_figure",
    "value_range",
    "normalize",
    "colorize",
    "colormap",
    "colour",
    "scale_of",
    "text_color",
    "overlay",
    "write_png",
    "png_bytes",
    "to_2d",
    "COLORMAPS",
]

Color = Tuple[float, float, float]

#: Colour maps that matplotlib lacks, by name: ``(position in [-1, 1], RGB in [0, 1])`` anchors,
#: interpolated linearly. ``coldnhot``: light blue, blue, black, red, yellow (zero is black, for
#: overlays on bright images). Every other name (``"bwr"``, the default, ``"seismic"``,
#: ``"RdBu_r"``, ``"gray"``, ...) is matplotlib's.
COLORMAPS: Dict[str, Sequence[Tuple[float, Color]]] = {
    "coldnhot": (
        (-1.0, (0.0, 1.0, 1.0)),
        (-0.5, (0.0, 0.0, 1.0)),
        (0.0, (0.0, 0.0, 0.0)),
        (0.5, (1.0, 0.0, 0.0)),
        (1.0, (1.0, 1.0, 0.0)),
    ),
}

DEFAULT_CMAP = "bwr"
# the entries of a colour map's table: odd, so that zero has the middle entry to itself and a value
# and its negative lie symmetric around it
_STEPS = 255
_INSTALL = "pip install matplotlib pillow (or pip install 'lrpcpp[cli]')"


def _matplotlib_colormap(cmap: str):
    try:
        from matplotlib import colormaps
        from matplotlib.colors import LinearSegmentedColormap
    except ImportError as e:
        raise ImportError(f"lrpcpp.viz: the heatmap colours are a matplotlib colour map: {_INSTALL}") from e
    anchors = COLORMAPS.get(cmap)
    if anchors is not None:
        return LinearSegmentedColormap.from_list(cmap, [((p + 1.0) / 2.0, c) for p, c in anchors])
    if not isinstance(cmap, str) or cmap not in colormaps:
        raise ValueError(
            f"lrpcpp.viz: unknown colour map {cmap!r}: a matplotlib colour map name or one of {sorted(COLORMAPS)}"
        )
    return colormaps[cmap]


@functools.lru_cache(maxsize=None)
def _colour_table(cmap: str) -> np.ndarray:
    """``[_STEPS, 3]`` uint8: the colour map sampled at ``_STEPS`` evenly spaced points of [-1, 1]."""
    sampled = _matplotlib_colormap(cmap).resampled(_STEPS)
    table = np.round(sampled(np.arange(_STEPS))[:, :3] * 255.0).astype(np.uint8)
    table.flags.writeable = False
    return table


def colormap(cmap: str = DEFAULT_CMAP):
    """The colour map of every view as a matplotlib ``ListedColormap`` over [0, 1] (0 for
    ``-scale``, 0.5 for zero, 1 for ``+scale``): the table :func:`colorize` looks colours up in, for
    colour bars and ``imshow``."""
    from matplotlib.colors import ListedColormap

    return ListedColormap(_colour_table(cmap) / 255.0, name=f"lrpcpp-{cmap}")


def colorize(normalized: Any, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """Values in [-1, 1] (any shape; beyond is clipped) as uint8 RGB (one more dim of 3) through the
    colour map ``cmap``: the one colour function of every view. -1 is the map's lower end, 0 its
    middle, 1 its upper end."""
    v = np.nan_to_num(np.clip(np.asarray(normalized, dtype=np.float64), -1.0, 1.0))
    index = np.rint((v + 1.0) * ((_STEPS - 1) / 2.0)).astype(np.intp)
    return _colour_table(cmap)[index]


def scale_of(values: Any) -> float:
    """The scale of a heatmap: the largest absolute relevance (1 where all are zero)."""
    a = _numpy(values) if hasattr(values, "shape") else np.asarray(list(values), dtype=np.float64)
    m = float(np.abs(a.astype(np.float64)).max()) if a.size else 0.0
    return m if m > 0 and math.isfinite(m) else 1.0


def colour(r: float, scale: float, cmap: str = DEFAULT_CMAP) -> Tuple[int, int, int]:
    """The RGB colour of relevance ``r`` on a heatmap of scale ``scale`` (:func:`colorize` of
    ``r / scale``): red when positive, blue when negative, white at zero."""
    red, green, blue = colorize(float(r) / scale if scale > 0 else 0.0, cmap).tolist()
    return red, green, blue


def _luminance(rgb: Sequence[int]) -> float:
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(linear @ np.array([0.2126, 0.7152, 0.0722]))


def contrast_ratio(a: Sequence[int], b: Sequence[int]) -> float:
    """The WCAG contrast ratio of two RGB colours (1 to 21; 4.5 is the minimum for body text)."""
    la, lb = _luminance(a), _luminance(b)
    return (max(la, lb) + 0.05) / (min(la, lb) + 0.05)


def text_color(background: Sequence[int]) -> Tuple[int, int, int]:
    """Black or white, whichever contrasts more with ``background``: the text colour of a token on
    its relevance colour (every colour of a map then reaches a contrast ratio of at least 4.5)."""
    black, white = (0, 0, 0), (255, 255, 255)
    return black if contrast_ratio(background, black) >= contrast_ratio(background, white) else white


__all__ += ["contrast_ratio"]


def _numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor, on any device and of any floating dtype
        a = a.detach().float().cpu().numpy()
    return np.asarray(a)


def _pil():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(f"lrpcpp.viz: images are encoded, resized and blended with Pillow: {_INSTALL}") from e
    return Image


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


def _image_rgb(image: Any) -> np.ndarray:
    """An input image as ``[H, W, 3]`` uint8: ``[3, H, W]`` or ``[H, W, 3]`` (or gray ``[H, W]`` /
    ``[1, H, W]``); uint8 as it is, floats in [0, 1] times 255, floats outside [0, 1] (a normalised
    model input) min-max scaled."""
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
        return np.ascontiguousarray(a)
    a = a.astype(np.float64)
    lo, hi = a.min(), a.max()
    if lo < 0.0 or hi > 1.0:
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return np.round(a * 255.0).astype(np.uint8)


def _resize_nearest(a: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """uint8 ``[H, W, 3]`` resized to ``size`` = ``(height, width)`` (Pillow, nearest neighbour)."""
    image = _pil()
    resized = image.fromarray(np.ascontiguousarray(a, dtype=np.uint8)).resize(
        (size[1], size[0]), image.Resampling.NEAREST
    )
    return np.asarray(resized).copy()


def overlay(heat: np.ndarray, image: Any, alpha: float = 0.5) -> np.ndarray:
    """``alpha * heat + (1 - alpha) * image`` as uint8 RGB (Pillow's ``Image.blend``); the heatmap
    is resized (nearest neighbour) to the image when their sizes differ."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"lrpcpp.viz: alpha must lie in [0, 1], got {alpha}")
    pil = _pil()
    base = _image_rgb(image)
    h = np.ascontiguousarray(heat, dtype=np.uint8)
    if h.shape[:2] != base.shape[:2]:
        h = _resize_nearest(h, base.shape[:2])
    return np.asarray(pil.blend(pil.fromarray(base, "RGB"), pil.fromarray(h, "RGB"), alpha)).copy()


def write_png(path: str, rgb: np.ndarray) -> None:
    """Writes ``[H, W, 3]`` (or ``[H, W]`` gray) uint8 as an 8-bit PNG (Pillow)."""
    image = _png_image(rgb)
    with atomic_write(path, binary=True) as f:  # a failed write leaves no cut-off PNG
        image.save(f, format="PNG")


def png_bytes(rgb: np.ndarray) -> bytes:
    """``[H, W, 3]`` (or ``[H, W]`` gray) uint8 as the bytes of an 8-bit PNG (Pillow)."""
    buffer = io.BytesIO()
    _png_image(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_image(rgb: np.ndarray):
    a = np.ascontiguousarray(rgb, dtype=np.uint8)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)):
        raise ValueError(f"lrpcpp.viz: expected [H, W, 3] or [H, W] uint8, got shape {tuple(a.shape)}")
    return _pil().fromarray(a, "L" if a.ndim == 2 else "RGB")


def heatmap(
    relevance: Any,
    path: Optional[str] = None,
    cmap: str = DEFAULT_CMAP,
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
    * ``cmap``: a matplotlib colour map name (``"bwr"``, the default: red-white-blue, positive red,
      negative blue; ``"seismic"``, ``"RdBu_r"``, ...) or one of :data:`COLORMAPS` (``"coldnhot"``).
    * ``symmetric`` / ``percentile``: see :func:`normalize`.
    * ``image``: the input image to blend under the heatmap (see :func:`overlay`), with ``alpha``
      the heatmap's weight.
    * ``size``: ``(height, width)`` or one int for both: resize the result (nearest neighbour).
    * ``colorbar``: the heatmap with a colour bar on its right, labelled with the relevance values of
      its ends and middle (:func:`value_range`), rendered by :func:`heatmap_figure`; the result is
      then that figure's pixels, of its own size.
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
    cmap: str = DEFAULT_CMAP,
    image: Any = None,
    alpha: float = 0.5,
    symmetric: bool = True,
    percentile: Optional[float] = None,
    size: Optional[Union[int, Tuple[int, int]]] = None,
):
    """The heatmap of :func:`heatmap` as a matplotlib ``Figure`` with a colour bar whose ticks are the
    relevance values of the colour map's ends and middle (:func:`value_range`), for notebooks or
    ``figure.savefig``."""
    rgb = heatmap(relevance, None, cmap, image, alpha, symmetric, percentile, size)
    return _figure(rgb, value_range(relevance, symmetric, percentile), cmap)


def add_colorbar(figure, rect: Sequence[float], vrange: Tuple[float, float], cmap: str = DEFAULT_CMAP, **kwargs):
    """Draws the colour bar of :func:`colormap` from ``vrange[0]`` to ``vrange[1]`` into a new axes
    of ``figure`` at ``rect`` (figure fractions), its ticks the ends and the middle, labelled with
    their values; ``kwargs`` go to ``figure.colorbar`` (``orientation="horizontal"``)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    lo, hi = vrange
    if not hi > lo:  # a map of zeros: 0 in the middle of the colour map
        lo, hi = -1.0, 1.0
    ticks = [lo, (lo + hi) / 2.0, hi]
    bar = figure.colorbar(
        ScalarMappable(Normalize(lo, hi), colormap(cmap)), cax=figure.add_axes(rect), ticks=ticks, **kwargs
    )
    bar.set_ticklabels([f"{v:.3g}" for v in ticks])
    return bar


def _figure(rgb: np.ndarray, vrange: Tuple[float, float], cmap: str):
    """The heatmap ``rgb`` with a colour bar from ``vrange[0]`` to ``vrange[1]`` on its right."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"lrpcpp.viz: a colour bar is drawn with matplotlib: {_INSTALL}") from e
    height, width = rgb.shape[:2]
    zoom = max(1.0, 256.0 / max(height, width))  # a small map is shown larger, its pixels square
    dpi, bar = 100.0, 1.2  # the colour bar and its labels take `bar` inches on the right
    w, h = width * zoom / dpi, height * zoom / dpi
    figure = Figure(figsize=(w + bar, h), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.0, 0.0, w / (w + bar), 1.0))
    axes.imshow(rgb, interpolation="nearest", aspect="auto")
    axes.set_axis_off()
    add_colorbar(figure, ((w + 0.1) / (w + bar), 0.05, 0.2 / (w + bar), 0.9), vrange, cmap)
    return figure


__all__ += ["add_colorbar"]


# ----------------------------------------------------------------------------- text
# Tokens on the colour of their relevance (:func:`colour`, the scale the largest |relevance| of
# the text), in the foreground colour that contrasts with it (:func:`text_color`). Generated tokens
# (a continuation the model wrote) are underlined in every view; plain text, which has no
# underline, writes them _like this_.

__all__ += ["text_html", "html_legend", "text_terminal", "image_terminal", "visible", "GENERATED_NOTE"]

#: How every view says that generated tokens are underlined.
GENERATED_NOTE = "generated tokens are underlined"

# the bidirectional controls (embeddings, overrides, isolates and marks), and the line and paragraph separators
_LAYOUT_CONTROLS = frozenset([0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)])


def visible(text: str) -> str:
    """``text`` with every character that acts instead of showing written as an escape: C0 and C1
    control characters and DEL (``\\x1b``, ``\\x0d``), the bidirectional controls and the line
    and paragraph separators (``\\u202e``). Input text can then neither drive a terminal (colours,
    cursor moves, titles) nor reorder or hide what is shown around it."""
    out = []
    for ch in text:
        o = ord(ch)
        if o < 0x20 or 0x7F <= o < 0xA0 or o in _LAYOUT_CONTROLS:
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _css(rgb: Sequence[int]) -> str:
    return f"rgb({rgb[0]}, {rgb[1]}, {rgb[2]})"


def html_style(r: float, scale: float) -> str:
    """The inline CSS of a token of relevance ``r``: its :func:`colour` as background, the
    :func:`text_color` that contrasts with it as foreground."""
    rgb = colour(r, scale)
    return f"background-color: {_css(rgb)}; color: {_css(text_color(rgb))}"


def html_legend(scale: float, note: str = "red raises the explained value, blue lowers it") -> str:
    """An HTML colour scale from ``-scale`` to ``+scale`` (the colours of :func:`colour` at its ends
    and middle), labelled with those numbers, and ``note``."""
    stops = ", ".join(_css(colour(v, scale)) for v in np.linspace(-scale, scale, 9))
    return (
        '<div class="lrpcpp-scale" style="display: flex; align-items: center; gap: 0.5em; font-size: 0.85em; '
        'margin: 0.4em 0">'
        f'<span class="lo">{-scale:+.4g}</span><span style="width: 12em; height: 0.8em; border: 1px solid #ccc; '
        f'background: linear-gradient(to right, {stops})"></span><span class="hi">{scale:+.4g}</span>'
        f"<span>({html.escape(note)})</span></div>"
    )


__all__ += ["html_style"]


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
    tokens, values = _token_values(tokens, relevance)
    scale = scale_of(values)
    spans = []
    for token, r in zip(tokens, values):
        word = html.escape(visible(token))
        spans.append(
            f'<span style="{html_style(r, scale)}; padding: 0.1em 0.15em; '
            f'border-radius: 0.2em; white-space: pre" title="{word}: {r:+.4g}" data-relevance="{r!r}">{word}</span>'
        )
    legend = html_legend(scale, f"red raises the explained value, blue lowers it; sum {sum(values):+.4g}")
    return f'<div class="lrpcpp-text"><div style="line-height: 2">{" ".join(spans)}</div>{legend}</div>'


# ------------------------------------------------------------------ terminal
def ansi(rgb: Sequence[int]) -> str:
    """The escape that sets a 24-bit background ``rgb`` and the contrasting foreground
    (:func:`text_color`): readable on light and dark terminals alike."""
    fg = text_color(rgb)
    return f"\x1b[48;2;{rgb[0]};{rgb[1]};{rgb[2]}m\x1b[38;2;{fg[0]};{fg[1]};{fg[2]}m"


__all__ += ["ansi"]


def text_terminal(tokens: Sequence[str], relevance: Any, color: bool = False, width: int = 100) -> str:
    """The tokens as terminal text (the command line's view): in a line, on a 24-bit background
    colour with ``color``, then a table of their relevance with bars, the colour scale and the sum."""
    from ._terminal import Tokens, inline, scale_line, table

    tokens, values = _token_values(tokens, relevance)
    e = Tokens([visible(t) for t in tokens], values)
    idx = list(range(len(tokens)))
    scale = scale_of(values)
    lines = ["relevance: red (+) raises the explained value, blue (-) lowers it", ""]
    lines += inline(e, idx, scale, color, width) + [""] + table(e, idx, scale, color)
    lines.append(scale_line(scale, color))
    lines.append(f"sum of the relevance of all tokens: {sum(values):+.4f}")
    return "\n".join(lines) + "\n"


def image_terminal(relevance: Any, color: bool = False, width: int = 100) -> str:
    """A pixel relevance map (``[H, W]``, ``[C, H, W]`` or ``[1, C, H, W]``) as terminal text: a grid
    of cells of summed relevance, on their colours with ``color`` (else as signs by size), the
    colour scale and the sum."""
    from ._terminal import image_grid

    r = to_2d(relevance)
    lines = image_grid(r, color, width)
    return "\n".join(lines) + f"\nsum of the pixel relevance: {float(r.sum()):+.4f}\n"

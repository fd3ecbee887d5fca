"""Heatmaps of :class:`lrpcpp.cli.explain.Explanation` records: a coloured terminal view, a
self-contained HTML page, a LaTeX figure to ``\\input`` (a ``\\colorbox`` per token), PNG images (matplotlib for
text, Pillow for images) and the per-layer relevance plot.

One colour scale everywhere, :mod:`lrpcpp.viz`'s (:func:`lrpcpp.viz.colour`): red for positive
relevance (the token raises the explained value), blue for negative, white for none; the scale is
the largest ``|relevance|`` of the explanation, so the strongest token of either sign reaches an end
of the colour map. Every view also shows the numbers (the values, and the scale's ends), so it stays
legible without colour. Generated tokens are underlined in every view (``_like this_`` in plain
text).
"""

import base64
import dataclasses
import html
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._files import atomic_write
from .._terminal import fmt as _fmt
from .._terminal import inline as _inline
from .._terminal import scale_line as _scale_line
from .._terminal import table as _table
from .._terminal import wrap as _wrap
from ..viz import (
    GENERATED_NOTE,
    add_colorbar,
    ansi,
    colormap,
    colour,
    html_legend,
    html_style,
    image_terminal,
    scale_of,
    text_color,
    visible,
)
from ..viz import heatmap as _heatmap
from ..viz import png_bytes as _png_bytes

# matplotlib and Pillow (the command line's extra) are imported by lrpcpp.viz when a first colour is
# looked up or an image encoded: they are optional, and matplotlib is slow to import

__all__ = [
    "colour",
    "scale_of",
    "visible",
    "terminal",
    "html_page",
    "latex_document",
    "text_png",
    "image_pngs",
    "latent_png",
    "write_text",
    "write_bytes",
]


def _segments(e) -> List[List[int]]:
    """Token indices of each text of an explanation."""
    out: Dict[int, List[int]] = {}
    for i, s in enumerate(e.segment):
        out.setdefault(s, []).append(i)
    return [out[k] for k in sorted(out)]


def _shown(explanations: Sequence) -> list:
    """Copies of the explanations whose text fields (tokens shown, texts, model, target, image file)
    have passed through :func:`visible`: what every view renders."""

    def text(value):
        return visible(value) if isinstance(value, str) else value

    return [
        dataclasses.replace(
            e,
            words=[visible(w) for w in e.words],
            texts=[visible(t) for t in e.texts],
            model=text(e.model),
            target=text(e.target),
            image_file=text(e.image_file),
            latent=e.latent and {visible(k): v for k, v in e.latent.items()},
        )
        for e in explanations
    ]


def _header(e, steps: int = 1) -> List[str]:
    lines = [f"{e.model} · {e.method_name}"]
    if e.step is None:
        lines.append(f"explained: {e.what} = {e.output:.4f}")
    else:
        lines.append(
            f"explained: each of the {steps} generated tokens (logit of the next token), given the text before it"
        )
    return lines


# ----------------------------------------------------------------------------- terminal
def _top(e, idx, k=5) -> str:
    best = sorted(idx, key=lambda i: -abs(e.relevance[i]))[:k]
    return ", ".join(f"{e.words[i]} {_fmt(e.relevance[i])}" for i in best)


def _latent_lines(e, color: bool, width: int) -> List[str]:
    if not e.latent:
        return []
    lines = ["", "relevance per layer (each layer's output; sum, and the tokens with the largest |relevance|):"]
    name_w = max(len(n) for n in e.latent)
    for name, values in e.latent.items():
        total = sum(values)
        if e.image is not None or not e.words:
            lines.append(f"  {name:<{name_w}}  sum {_fmt(total)}")
            continue
        best = sorted(range(len(values)), key=lambda i: -abs(values[i]))[:3]
        top = ", ".join(f"{e.words[i]} {_fmt(values[i])}" for i in best)
        lines.append(f"  {name:<{name_w}}  sum {_fmt(total)}  top: {top}")
        if color:
            scale = scale_of(values)
            pieces = []
            for i, w in enumerate(e.words):
                sep = " " if e.space[i] and i else ""
                pieces.append((sep + w, sep + ansi(colour(values[i], scale)) + w + "\x1b[0m"))
            lines += _wrap(pieces, width, "    ")
    return lines


def terminal(explanations: Sequence, color: bool = False, width: int = 100) -> str:
    """The heatmap as terminal text. With ``color``, tokens get a 24-bit background colour. Control
    characters of the input are shown escaped (:func:`visible`)."""
    explanations = _shown(explanations)
    e0 = explanations[0]
    lines = _header(e0, len(explanations))
    lines.append("relevance: red (+) raises the explained value, blue (-) lowers it")
    if e0.image is not None:
        lines.insert(2, f"image: {e0.image_file}")
        lines.append("")
        lines += image_terminal(e0.pixel_relevance, color, width).splitlines()
        lines += _latent_lines(e0, color, width)
        return "\n".join(lines) + "\n"
    if e0.step is not None:
        lines.append("")
        lines.append(f"text: {e0.texts[0]}")
        for e in explanations:
            idx = list(range(len(e.tokens)))
            scale = scale_of(e.relevance)
            lines.append("")
            lines.append(
                f"step {e.step + 1}/{len(explanations)}: {e.target!r} (logit {e.output:.4f});"
                f" {GENERATED_NOTE}" + ("" if color else ": _like this_")
            )
            lines += _inline(e, idx, scale, color, width)
            lines.append(_scale_line(scale, color))
            lines.append(f"  largest |relevance|: {_top(e, idx)}")
            lines += _latent_lines(e, color, width)
        return "\n".join(lines) + "\n"
    e = e0
    scale = scale_of(e.relevance)
    if e.truncated:
        lines.append("(the text was truncated to the model's maximum length)")
    for s, idx in enumerate(_segments(e)):
        lines.append("")
        lines.append(f"text {s + 1}: {e.texts[s]}" if len(e.texts) > 1 else f"text: {e.texts[s]}")
        lines += _inline(e, idx, scale, color, width)
        lines.append("")
        lines += _table(e, idx, scale, color)
        if len(e.texts) > 1:
            lines.append(f"  sum over text {s + 1}: {_fmt(sum(e.relevance[i] for i in idx))}")
    lines.append(_scale_line(scale, color))
    lines.append("")
    lines.append(f"sum of the relevance of all tokens: {_fmt(sum(e.relevance))} (explained value {e.output:.4f})")
    lines += _latent_lines(e, color, width)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- HTML
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 62em; margin: 2em auto;
       padding: 0 1em; color: #111; line-height: 1.5; }
h1 { font-size: 1.3em; margin-bottom: 0.2em; }
h2 { font-size: 1.05em; margin: 1.4em 0 0.3em; }
.meta { color: #444; margin: 0.2em 0; }
.text { font-size: 1.15em; line-height: 2.1; }
.tok { padding: 0.15em 0.1em; border-radius: 0.25em; white-space: pre; }
.special { font-size: 0.75em; color: #333; font-family: ui-monospace, monospace; }
.generated { text-decoration: underline; }
.lrpcpp-scale { color: #444; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
td, th { padding: 0.1em 0.8em; text-align: left; }
td.num { text-align: right; font-family: ui-monospace, monospace; }
details { margin: 0.4em 0 1em; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; }
"""


def _span(e, i: int, scale: float, values: Optional[Sequence[float]] = None) -> str:
    r = float((values if values is not None else e.relevance)[i])
    classes = ["tok"]
    if e.special and e.special[i]:
        classes.append("special")
    if e.generated and e.generated[i]:
        classes.append("generated")
    sep = " " if e.space[i] else ""
    return (
        f'{sep}<span class="{" ".join(classes)}" style="{html_style(r, scale)}" '
        f'data-index="{i}" data-relevance="{r!r}" title="{html.escape(e.words[i])}: {_fmt(r)}">'
        f"{html.escape(e.words[i])}</span>"
    )


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def html_page(explanations: Sequence) -> str:
    """One self-contained page (inline CSS, images as data URIs, no scripts, no network); every text
    is HTML-escaped, control characters shown escaped (:func:`visible`)."""
    explanations = _shown(explanations)
    e0 = explanations[0]
    esc = html.escape
    title = f"lrpcpp: {e0.method_name} explanation of {e0.model}"
    body = [f"<h1>{esc(title)}</h1>"]
    for line in _header(e0, len(explanations))[1:]:
        body.append(f'<p class="meta">{esc(line)}</p>')
    if e0.target is not None and e0.step is None:
        kind = {"causal-lm": "Next token", "classifier": "Class", "image-classifier": "Class"}[e0.task]
        body.append(f'<p class="meta">{kind}: <b>{esc(e0.target)}</b></p>')
    if e0.step is not None:
        body.append(f'<p class="meta">{esc(GENERATED_NOTE)}: <span class="generated">like this</span></p>')
    if e0.image is not None:
        heat, overlay = image_pngs(e0)
        body.append(
            f'<p class="meta">Image: {esc(str(e0.image_file))}; sum of the pixel relevance '
            f"{_fmt(float(e0.pixel_relevance.sum()))}</p>"
        )
        body.append(
            f'<figure><img alt="relevance heatmap" src="{_png_data_uri(heat)}"><figcaption>relevance'
            f'</figcaption></figure><figure><img alt="relevance over the image" '
            f'src="{_png_data_uri(overlay)}"><figcaption>over the image</figcaption></figure>'
        )
        body.append(html_legend(scale_of(e0.pixel_relevance)))
    else:
        for e in explanations:
            scale = scale_of(e.relevance)
            if e.step is not None:
                body.append(f'<h2 class="step">Step {e.step + 1}: {esc(repr(e.target))} (logit {e.output:.4f})</h2>')
            if e.truncated:
                body.append('<p class="meta">The text was truncated to the model\'s maximum length.</p>')
            for s, idx in enumerate(_segments(e)):
                if e.step is None:
                    label = f"Text {s + 1}" if len(e.texts) > 1 else "Text"
                    body.append(f"<h2>{label}</h2>")
                spans = "".join(_span(e, i, scale) for i in idx)
                body.append(f'<p class="text" data-segment="{s}">{spans.lstrip()}</p>')
                rows = "".join(
                    f'<tr><td>{esc(e.words[i])}</td><td class="num">{_fmt(e.relevance[i])}</td></tr>' for i in idx
                )
                body.append(
                    f"<details><summary>relevance of each token (sum {_fmt(sum(e.relevance[i] for i in idx))})"
                    f"</summary><table><tr><th>token</th><th>relevance</th></tr>{rows}</table></details>"
                )
            body.append(html_legend(scale))
    if e0.latent and e0.image is None and e0.step is None:
        body.append("<h2>Relevance per layer</h2>")
        for name, values in e0.latent.items():
            scale = scale_of(values)
            spans = "".join(
                ('<span class="sep"> │ </span>' if i and e0.segment[i] != e0.segment[i - 1] else "")
                + _span(e0, i, scale, values)
                for i in range(len(values))
            )
            body.append(
                f'<p class="meta">{esc(name)} (sum {_fmt(sum(values))}; colour scale ±{scale:.4g})</p>'
                f'<p class="text latent">{spans.lstrip()}</p>'
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------- LaTeX
_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "{": r"\{",
    "}": r"\}",
    "#": r"\#",
    "$": r"\$",
    "%": r"\%",
    "&": r"\&",
    "_": r"\_",
    "^": r"\textasciicircum{}",
    "~": r"\textasciitilde{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
    '"': "''",
    "↵": r"\textbackslash{}n",
    "⇥": r"\textbackslash{}t",
    "␣": r"\textvisiblespace{}",
}


# Latin-1 characters that pdflatex's default fonts (OT1) cannot set: guillemets, eth and thorn
_LATEX_UNSET = frozenset("\u00ab\u00bb\u00d0\u00de\u00f0\u00fe")


def latex_escape(text: str) -> str:
    """Text that pdflatex sets with its default fonts, whatever ``text`` holds: the LaTeX special
    characters escaped; printable ASCII and the Latin-1 letters and signs as they are; every other
    character (control characters, other scripts, emoji, combining marks) as its code point,
    ``\\texttt{U+XXXX}``."""
    out = []
    for ch in text:
        o = ord(ch)
        if ch in _LATEX_SPECIAL:
            out.append(_LATEX_SPECIAL[ch])
        elif 0x20 <= o < 0x7F or (0xA0 <= o <= 0xFF and ch not in _LATEX_UNSET):
            out.append(ch)
        else:
            out.append(f"\\texttt{{U+{o:04X}}}")
    return "".join(out)


def _latex_box(r: float, scale: float, word: str) -> str:
    rgb = colour(r, scale)
    spec = ",".join(f"{c / 255:.3f}" for c in rgb)
    return f"\\lrpcpptok{{{spec}}}{{{1 if text_color(rgb)[0] else 0}}}{{{word}}}"


def latex_document(explanations: Sequence) -> str:
    """The heatmap as a LaTeX figure to ``\\input`` into a document that loads ``\\usepackage{color}``
    (or ``xcolor``): no preamble, page, float or section of its own, so it goes wherever the
    document puts it (in a ``figure`` environment, a ``minipage``, a slide). A ``\\colorbox`` per
    token, in the text colour that contrasts with it (:func:`lrpcpp.viz.text_color`), its value in
    a comment; the colour scale with its end values below each text; generated tokens underlined.
    Everything it defines stays inside a group. See :func:`latex_escape` for the characters."""
    explanations = _shown(explanations)
    e0 = explanations[0]
    if e0.image is not None:
        raise ValueError("a LaTeX heatmap is made of tokens; explain a text")
    lines = [
        "% " + latex_escape(f"lrpcpp: {e0.method_name} explanation of {e0.model}"),
        r"% a heatmap figure: \input this file in a LaTeX document that loads \usepackage{color} (or xcolor)",
        r"% relevance per token: red raises the explained value, blue lowers it",
        r"\begingroup",
        r"\setlength{\fboxsep}{1.5pt}%",
        r"\def\lrpcpptok#1#2#3{\colorbox[rgb]{#1}{\textcolor[gray]{#2}{\strut #3}}}%",
        r"\noindent\parbox{\linewidth}{%",
        r"\textbf{" + latex_escape(f"{e0.method_name} explanation of {e0.model}") + r"}\par",
    ]
    for line in _header(e0, len(explanations))[1:]:
        lines.append(latex_escape(line) + r"\par")
    if e0.step is not None:
        lines.append(latex_escape(GENERATED_NOTE) + r": \underline{like this}\par")
    lines.append(r"\medskip")
    for e in explanations:
        scale = scale_of(e.relevance)
        if e.step is not None:
            lines.append(
                r"\textbf{" + latex_escape(f"Step {e.step + 1}: {e.target!r} (logit {e.output:.4f})") + r"}\par"
            )
        elif e.target is not None:
            kind = "Next token" if e.task == "causal-lm" else "Class"
            lines.append(latex_escape(f"{kind}: {e.target}") + r"\par\medskip")
        for s, idx in enumerate(_segments(e)):
            if e.step is None and len(e.texts) > 1:
                lines.append(r"\textbf{Text " + str(s + 1) + r"}\par")
            for i in idx:
                sep = r"\hspace{0.3em}" if e.space[i] and i != idx[0] else r"\hspace{0pt}"
                word = latex_escape(e.words[i])
                if e.generated and e.generated[i]:
                    word = f"\\underline{{{word}}}"
                lines.append(f"{sep}{_latex_box(e.relevance[i], scale, word)}% {_fmt(e.relevance[i])}")
            lines.append(r"\par\medskip")
        ends = [_latex_box(v, scale, latex_escape(f"{v:+.4g}")) for v in (-scale, 0.0, scale)]
        lines.append(r"{\small colour scale: " + r" \dots{} ".join(ends) + r"}\par\medskip")
    lines += [r"}%", r"\endgroup"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- PNG
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def text_png(explanations: Sequence, path: str, width_px: int = 1000) -> None:
    """The tokens as coloured boxes, wrapped into lines, with the header above and the colour bar of
    each text's scale below it, labelled with its end values (matplotlib); generated tokens
    underlined."""
    explanations = _shown(explanations)
    plt = _pyplot()
    from matplotlib.font_manager import FontProperties

    dpi, size, margin = 100, 13, 16
    prop = FontProperties(size=size)
    fig = plt.figure(figsize=(width_px / dpi, 1), dpi=dpi)
    renderer = fig.canvas.get_renderer()

    def text_width(s: str) -> float:
        w, _, _ = renderer.get_text_width_height_descent(s or " ", prop, ismath=False)
        return w

    space = text_width("a a") - text_width("aa")
    line_h = size * 2.1
    # (x, y, text, rgb or None, bold, underlined: a generated token)
    items: List[Tuple[float, float, str, Optional[Tuple[int, int, int]], bool, bool]] = []
    bars: List[Tuple[float, float]] = []  # (y, scale) of each colour bar
    y: float = margin
    e0 = explanations[0]
    for line in _header(e0, len(explanations)):
        items.append((margin, y, line, None, True, False))
        y += line_h
    if e0.step is not None:
        items.append((margin, y, f"{GENERATED_NOTE}:", None, False, False))
        items.append((margin + text_width(f"{GENERATED_NOTE}:") + space, y, "like this", None, False, True))
        y += line_h
    for e in explanations:
        scale = scale_of(e.relevance)
        blocks = _segments(e)
        for s, idx in enumerate(blocks):
            y += line_h * 0.4
            if e.step is not None:
                label = f"step {e.step + 1}: {e.target!r} (logit {e.output:.4f})"
            elif len(e.texts) > 1:
                label = f"text {s + 1}"
            elif e.target is not None:
                label = ("next token: " if e.task == "causal-lm" else "class: ") + repr(e.target)
            else:
                label = "text"
            items.append((margin, y, label, None, True, False))
            y += line_h
            x: float = margin
            for i in idx:
                w = text_width(e.words[i])
                gap: float = space if e.space[i] and i != idx[0] else 2
                if x + gap + w > width_px - margin and x > margin:
                    x, y = margin, y + line_h
                    gap = 0
                x += gap
                items.append(
                    (x, y, e.words[i], colour(e.relevance[i], scale), False, bool(e.generated and e.generated[i]))
                )
                x += w
            y += line_h
        bars.append((y, scale))
        y += 56
    height = y + margin
    fig.set_size_inches(width_px / dpi, height / dpi)
    from matplotlib.lines import Line2D

    for x, y, word, rgb, bold, underlined in items:
        kwargs = dict(fontsize=size, va="top", ha="left", fontweight="bold" if bold else "normal")
        if rgb is not None:
            kwargs["bbox"] = dict(boxstyle="square,pad=0.12", facecolor=tuple(c / 255 for c in rgb), edgecolor="none")
            kwargs["color"] = tuple(c / 255 for c in text_color(rgb))
        fig.text(x / width_px, 1 - y / height, word, **kwargs)
        if underlined:
            line_y = 1 - (y + size * 1.3) / height
            fig.add_artist(
                Line2D([x / width_px, (x + text_width(word)) / width_px], [line_y, line_y], color="black", zorder=4)
            )
    for y, scale in bars:
        rect = (margin / width_px, 1 - (y + 14) / height, 320 / width_px, 12 / height)
        add_colorbar(fig, rect, (-scale, scale), orientation="horizontal").ax.tick_params(labelsize=9)
        fig.text((margin + 330) / width_px, 1 - (y + 1) / height, "colour scale", fontsize=9, va="top", ha="left")
    try:
        with atomic_write(path, binary=True) as f:
            fig.savefig(f, format="png", dpi=dpi, facecolor="white")
    finally:
        plt.close(fig)


def image_pngs(e, min_side: int = 224, colorbar: bool = False) -> Tuple[bytes, bytes]:
    """(heatmap, overlay) PNG bytes of an image explanation (:func:`lrpcpp.viz.heatmap`), enlarged
    (nearest) to at least ``min_side`` pixels. The overlay blends the heatmap half into the model's
    input image. ``colorbar``: both with the colour bar of their scale on the right."""
    h, w = np.shape(e.pixel_relevance)
    factor = max(1, math.ceil(min_side / min(h, w)))
    size = (h * factor, w * factor)
    heat = _heatmap(e.pixel_relevance, size=size, colorbar=colorbar)
    over = _heatmap(e.pixel_relevance, image=np.asarray(e.image, dtype=np.uint8), size=size, colorbar=colorbar)
    return _png_bytes(heat), _png_bytes(over)


def overlay_path(path: str) -> str:
    """Where the overlay of an image heatmap written to ``path`` goes: ``NAME-overlay.png``."""
    stem, ext = os.path.splitext(path)
    return f"{stem}-overlay{ext or '.png'}"


def layers_path(path: str) -> str:
    """Where the per-layer plot goes when the heatmap is written to ``path``: ``NAME-layers.png``."""
    stem, ext = os.path.splitext(path)
    return f"{stem}-layers{ext or '.png'}"


def latent_png(e, path: str) -> None:
    """The per-layer relevance plot: layers x tokens (text) or each layer's total (images)."""
    e = _shown([e])[0]
    plt = _pyplot()
    names = list(e.latent)
    if e.image is not None or not e.words:
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.5), dpi=100)
        totals = [sum(v) for v in e.latent.values()]
        ends = {sign: tuple(c / 255 for c in colour(sign, 1.0)) for sign in (-1.0, 1.0)}  # the colour map's ends
        ax.barh(range(len(names)), totals, color=[ends[1.0 if t > 0 else -1.0] for t in totals])
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlabel("relevance of the layer's output (sum)")
    else:
        grid = np.array([e.latent[n] for n in names] + [e.relevance], dtype=np.float64)
        labels = names + ["input"]
        scale = np.abs(grid).max(axis=1, keepdims=True)
        scale[scale == 0] = 1
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * grid.shape[1] + 2.5), 0.45 * len(labels) + 1.8), dpi=100)
        ax.imshow(grid / scale, cmap=colormap(), vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xticks(range(grid.shape[1]), e.words, rotation=60, ha="right", fontsize=8)
        ax.set_title("relevance per token at each layer's output (each row scaled to its largest |value|)", fontsize=9)
    fig.suptitle(f"{e.model} · {e.method_name}", fontsize=10)
    fig.tight_layout()
    try:
        with atomic_write(path, binary=True) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)


def write_text(path: str, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` in one step: a reader finds the old file or the whole new one."""
    with atomic_write(path) as f:
        f.write(text)


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` in one step (see :func:`write_text`)."""
    with atomic_write(path, binary=True) as f:
        f.write(data)

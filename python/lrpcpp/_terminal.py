"""The terminal layout of lrpcpp's views (:func:`lrpcpp.viz.text_terminal`,
:func:`lrpcpp.viz.image_terminal` and the command line's :func:`lrpcpp.cli.render.terminal`): tokens
on their colours wrapped into lines, a table of values with bars, the colour scale, a grid of pixel
cells. Colours are :mod:`lrpcpp.viz`'s."""

from typing import Any, List, Tuple

import numpy as np

from .viz import ansi, colour, scale_of


def fmt(r: float) -> str:
    return f"{r:+.4f}" if abs(r) >= 5e-5 or r == 0 else f"{r:+.1e}"


RESET = "\x1b[0m"
UNDERLINE = "\x1b[4m"


def wrap(pieces: List[Tuple[str, str]], width: int, indent: str) -> List[str]:
    """Lays out (visible text, rendered text) pieces on lines of at most ``width`` visible columns."""
    lines, cur, cur_len = [], indent, len(indent)
    for shown, rendered in pieces:
        if cur_len + len(shown) > width and cur_len > len(indent):
            lines.append(cur.rstrip())
            cur, cur_len = indent, len(indent)
            rendered, shown = rendered.lstrip(" "), shown.lstrip(" ")
        cur += rendered
        cur_len += len(shown)
    if cur.strip():
        lines.append(cur)
    return lines


def inline(e, idx: List[int], scale: float, color: bool, width: int, indent: str = "  ") -> List[str]:
    pieces = []
    for i in idx:
        word = e.words[i]
        generated = bool(e.generated and e.generated[i])
        sep = " " if e.space[i] and i != idx[0] else ""
        if color:
            style = ansi(colour(e.relevance[i], scale)) + (UNDERLINE if generated else "")
            pieces.append((sep + word, sep + style + word + RESET))
        else:
            word = f"_{word}_" if generated else word
            pieces.append((sep + word, sep + word))
    return wrap(pieces, width, indent)


def bar(r: float, scale: float, color: bool, length: int = 20) -> str:
    n = int(round(length * min(abs(r) / scale, 1.0)))
    bar = ("+" if r > 0 else "-") * n
    if color and n:
        bar = ansi(colour(r, scale)) + bar + RESET
    return bar


def table(e, idx: List[int], scale: float, color: bool, limit: int = 80) -> List[str]:
    shown = idx
    note = None
    if len(idx) > limit:
        shown = sorted(sorted(idx, key=lambda i: -abs(e.relevance[i]))[:20])
        note = f"  ({len(idx)} tokens: the 20 with the largest |relevance| are listed)"
    width = min(max((len(e.words[i]) for i in shown), default=5), 24)
    lines = [f"  {'token':<{width}}  {'relevance':>10}"]
    for i in shown:
        word = e.words[i] if len(e.words[i]) <= width else e.words[i][: width - 1] + "…"
        if color:
            cell = ansi(colour(e.relevance[i], scale)) + word + RESET + " " * (width - len(word))
        else:
            cell = f"{word:<{width}}"
        lines.append(f"  {cell}  {fmt(e.relevance[i]):>10}  {bar(e.relevance[i], scale, color)}")
    if note:
        lines.append(note)
    return lines


def scale_line(scale: float, color: bool, indent: str = "  ") -> str:
    """The colour scale of a terminal view: its ends and middle, on their colours with ``color``."""
    cells = [f" {v:+.4g} " for v in (-scale, 0.0, scale)]
    if color:
        cells = [ansi(colour(v, scale)) + c + RESET for v, c in zip((-scale, 0.0, scale), cells)]
    return f"{indent}colour scale: {cells[0]} … {cells[1]} … {cells[2]}"


def image_grid(rel: Any, color: bool, width: int) -> List[str]:
    rel = np.asarray(rel, dtype=np.float64)
    h, w = rel.shape
    cols = max(1, min(w, (width - 4) // 2, 48))
    rows = max(1, min(h, round(cols * h / w)))
    ys = np.linspace(0, h, rows + 1).astype(int)
    xs = np.linspace(0, w, cols + 1).astype(int)
    pooled = np.array([[rel[ys[i] : ys[i + 1], xs[j] : xs[j + 1]].sum() for j in range(cols)] for i in range(rows)])
    scale = scale_of(pooled.ravel())
    out = []
    for i in range(rows):
        line = "  "
        for j in range(cols):
            v = pooled[i, j]
            a = abs(v) / scale
            ch = " " if a < 0.1 else ("+*#" if v > 0 else "-~=")[0 if a < 0.35 else 1 if a < 0.7 else 2]
            line += (ansi(colour(v, scale)) + ch * 2 + RESET) if color else ch * 2
        out.append(line)
    out.append(f"  ({rows} x {cols} cells of summed pixel relevance; + * # positive, - ~ = negative, by size)")
    out.append(scale_line(scale, color))
    return out


class Tokens:
    """What the terminal layout reads of an explanation: the words shown, whether a space precedes
    each, their relevance, which were generated."""

    def __init__(self, words: List[str], relevance: List[float]):
        self.words, self.relevance = words, relevance
        self.space = [True] * len(words)
        self.generated: List[bool] = []

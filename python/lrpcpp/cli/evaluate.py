"""Perturbation faithfulness of explanations: remove tokens in the order an explanation ranks them
and watch the explained value.

For each input text and each ranking (AttnLRP, CP-LRP, gradient times input, a random order):

* **MoRF** (most relevant first): remove the k most relevant tokens, k = 0 .. n;
* **LeRF** (least relevant first): remove the k least relevant tokens, k = 0 .. n;
* after each step, record the explained value of the unperturbed input (the same class, the same
  next token, the cosine similarity to the same fixed second text), computed by the unpatched model.

A faithful ranking makes the MoRF curve fall fast and the LeRF curve stay high: the **area between
the curves** (ABC), ``∫₀¹ (LeRF − MoRF) dx`` over the fraction x = k / n of tokens removed
(trapezoid rule), is large. A random order has an expected ABC of zero.

Removing a token means replacing its id by the tokenizer's mask token (``[MASK]``), or, where the
tokenizer has none, its unknown token, its padding token, its end-of-text token (the first that
exists). The sequence keeps its length, so positions do not shift. Special tokens (``[CLS]``,
``[SEP]``, a beginning-of-text token) are never removed. For a similarity, the first text is
perturbed and the second is held fixed (its embedding is computed once, unperturbed).
"""

import math
import os
import random
import textwrap
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._files import atomic_write
from ..attribution import attribute
from ..targets import mean_pooling
from .explain import METHOD_NAMES, similarity_target
from .loading import TASKS, InputError, Loaded, Warn, encode, hub_offline_reason

__all__ = [
    "METHODS",
    "EvalResult",
    "evaluate",
    "read_items",
    "fill_token",
    "area_between",
    "report",
    "notes",
    "read_dataset",
]

# the rankings compared, in the order they are reported
METHODS = ("attnlrp", "cp-lrp", "gradient", "random")
LABELS = dict(METHOD_NAMES, gradient="gradient x input", random="random order")
GRID = [i / 20 for i in range(21)]


@dataclass
class EvalResult:
    """Per method: the MoRF and LeRF curves of every input (explained value after k = 0..n
    removals) and their areas between the curves."""

    model: str
    task: str
    replacement: str
    texts: List[str] = field(default_factory=list)
    morf: Dict[str, List[List[float]]] = field(default_factory=dict)
    lerf: Dict[str, List[List[float]]] = field(default_factory=dict)
    abc: Dict[str, List[float]] = field(default_factory=dict)
    skipped: int = 0

    def summary(self) -> Dict[str, dict]:
        out = {}
        for m in self.abc:
            values = self.abc[m]
            n = len(values)
            mean = sum(values) / n if n else float("nan")
            var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
            out[m] = {
                "abc_mean": mean,
                "abc_sem": math.sqrt(var / n) if n else float("nan"),
                "morf_area": _mean([_area(c) for c in self.morf[m]]),
                "lerf_area": _mean([_area(c) for c in self.lerf[m]]),
                "morf_curve": mean_curve(self.morf[m]),
                "lerf_curve": mean_curve(self.lerf[m]),
            }
        return out

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "task": self.task,
            "explains": TASKS[self.task],
            "replacement": self.replacement,
            "inputs": len(self.texts),
            "skipped": self.skipped,
            "grid": GRID,
            "methods": self.summary(),
            "per_input": {m: {"abc": self.abc[m], "morf": self.morf[m], "lerf": self.lerf[m]} for m in self.abc},
            "texts": self.texts,
        }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _area(curve: Sequence[float]) -> float:
    """Trapezoid area under a curve sampled at x = k / n, k = 0..n."""
    n = len(curve) - 1
    if n < 1:
        return float(curve[0]) if curve else float("nan")
    return sum((curve[k] + curve[k + 1]) / 2 for k in range(n)) / n


def area_between(lerf: Sequence[float], morf: Sequence[float]) -> float:
    """``∫ (LeRF − MoRF) dx`` over the fraction of tokens removed (trapezoid rule)."""
    return _area([a - b for a, b in zip(lerf, morf)])


def _interp(curve: Sequence[float], x: float) -> float:
    n = len(curve) - 1
    if n < 1:
        return float(curve[0])
    pos = x * n
    k = min(int(pos), n - 1)
    t = pos - k
    return curve[k] * (1 - t) + curve[k + 1] * t


def mean_curve(curves: Sequence[Sequence[float]]) -> List[float]:
    """The mean over inputs of curves of different lengths, on the fractions ``GRID``."""
    if not curves:
        return []
    return [_mean([_interp(c, x) for c in curves]) for x in GRID]


def read_items(path: str, compare: Optional[str], task: str) -> List[Tuple[int, str, Optional[str]]]:
    """The inputs of a text file: one per line, blank lines skipped. A line may hold two texts
    separated by a tab; the second is what a similarity model compares with (``compare`` is used
    where a line has none). Other models read the first text only."""
    try:
        with open(path, encoding="utf-8") as f:
            # lines end at "\n" (or "\r\n") alone: str.splitlines would also cut a text at U+2028,
            # form feeds and other separators, and number the inputs wrongly
            lines = [line.removesuffix("\r") for line in f.read().split("\n")]
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    items: List[Tuple[int, str, Optional[str]]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        first, _, rest = line.partition("\t")
        second = rest.strip() or None
        if not first.strip():
            raise InputError(f"{path}:{number}: the text is empty")
        if task == "similarity":
            second = second or compare
            if second is None:
                raise InputError(
                    f"{path}:{number}: a similarity needs two texts: separate them by a tab, or give --compare TEXT"
                )
        else:
            second = None
        items.append((number, first.strip(), second))
    if not items:
        raise InputError(f"{path} has no texts")
    return items


# the dataset builders of datasets.load_dataset for a local data file, by its extension
_DATA_FILES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def _load_dataset(name: str, split: str):
    """``name`` as a ``datasets.Dataset``: a directory written by ``save_to_disk``, a local data file
    (csv, tsv, json, jsonl, parquet, txt), else whatever ``datasets.load_dataset`` makes of it (a
    local dataset directory or script, a hub id); ``split`` picks the split."""
    import datasets

    if os.path.isdir(name) and any(
        os.path.isfile(os.path.join(name, f)) for f in ("dataset_dict.json", "dataset_info.json", "state.json")
    ):
        data = datasets.load_from_disk(name)
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise InputError(f"--dataset {name} has no split {split!r}; its splits: {', '.join(data)} (--split S)")
            data = data[split]
        return data
    ext = os.path.splitext(name)[1].lower()
    if os.path.isfile(name):
        if ext not in _DATA_FILES:
            raise InputError(f"--dataset {name}: a data file is one of {', '.join(sorted(_DATA_FILES))}")
        kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
        return datasets.load_dataset(_DATA_FILES[ext], data_files={split: name}, split=split, **kwargs)
    return datasets.load_dataset(name, split=split)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def read_dataset(
    name: str, split: str, column: str, compare: Optional[str], task: str
) -> List[Tuple[int, str, Optional[str]]]:
    """The inputs of a Hugging Face dataset (see :func:`_load_dataset`): the texts of ``column`` in
    ``split``, numbered by their row (0-based); ``compare`` is the second text of a similarity. A
    missing dataset, split or column, or a row that holds no text, is an :class:`InputError`."""
    local = os.path.exists(name)
    offline = not local and hub_offline_reason() is not None
    if local or offline:  # the hub is not asked: datasets reads local files and its cache only
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        data = _load_dataset(name, split)
    except InputError:
        raise
    except ValueError as e:  # datasets' "Unknown split" and the like
        raise InputError(f"--dataset {name} (--split {split}): {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - not found, offline, unreadable: one line
        where = " (the Hugging Face hub is offline: give a local directory or data file)" if offline else ""
        raise InputError(f"cannot load --dataset {name}{where}: {_first_line(e)}") from None
    if column not in data.column_names:
        raise InputError(
            f"--dataset {name} has no column {column!r}; its columns: {', '.join(data.column_names)} (--column C)"
        )
    if task == "similarity" and compare is None:
        raise InputError(f"--dataset {name}: a similarity needs a second text: give --compare TEXT")
    items: List[Tuple[int, str, Optional[str]]] = []
    for row, text in enumerate(data[column]):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"--dataset {name} row {row}: column {column!r} holds no text ({text!r})")
        items.append((row, text.strip(), compare if task == "similarity" else None))
    if not items:
        raise InputError(f"--dataset {name} (--split {split}) has no rows")
    return items


def fill_token(tokenizer) -> Tuple[int, str]:
    """The id (and name) that replaces a removed token: mask, else unknown, pad, end of text."""
    for attr in ("mask_token", "unk_token", "pad_token", "eos_token"):
        tok = getattr(tokenizer, attr, None)
        tid = getattr(tokenizer, attr + "_id", None)
        if tok is not None and tid is not None:
            return int(tid), str(tok)
    return 0, tokenizer.convert_ids_to_tokens(0)


def _values_fn(loaded: Loaded, enc, target_id: Optional[int]):
    """f(model output, attention mask) -> the explained value per batch row, exactly (no relevance
    rule in it: the cosine similarity here is the ordinary one)."""
    if loaded.task == "similarity":

        def fn(out, mask, fixed):
            emb = mean_pooling(out.last_hidden_state, mask)
            return F.cosine_similarity(emb, fixed.expand_as(emb), dim=-1)
    elif loaded.task == "causal-lm":

        def fn(out, mask, fixed):
            last = mask.shape[1] - 1 - torch.flip(mask, dims=[1]).argmax(dim=1)
            return out.logits[torch.arange(out.logits.shape[0]), last, target_id]
    else:

        def fn(out, mask, fixed):
            return out.logits[:, target_id]

    return fn


def _fixed_embedding(loaded: Loaded, enc):
    """The mean-pooled embedding of the second text, unperturbed."""
    with torch.no_grad():
        ids, mask = enc.input_ids[1:2], enc.attention_mask[1:2]
        n = int(mask.sum())
        out = loaded.model(
            input_ids=ids[:, :n].to(loaded.model.device), attention_mask=mask[:, :n].to(loaded.model.device)
        )
        return mean_pooling(out.last_hidden_state, mask[:, :n].to(loaded.model.device))


def _gradient_x_input(loaded: Loaded, enc, ids, mask, target_id):
    """The plain gradient (no relevance rule) of the value AttnLRP explains, times the input
    embeddings, summed over the hidden dim: the same target as :func:`lrpcpp.attribute` gets (for a
    similarity, :func:`lrpcpp.targets.cosine_similarity` over both texts, norms held constant), so
    that only the propagation differs."""
    model = loaded.model
    device = model.device
    if loaded.task == "similarity":
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
    emb = emb.detach().requires_grad_()
    with torch.enable_grad():
        out = model(inputs_embeds=emb, attention_mask=mask)
        if loaded.task == "similarity":
            value = similarity_target(mask)(out)
        elif loaded.task == "causal-lm":
            value = out.logits[0, -1, target_id]
        else:
            value = out.logits[0, target_id]
        (grad,) = torch.autograd.grad(value.sum(), emb)
    return (grad * emb).sum(dim=-1)[0, : int(enc.attention_mask[0].sum())].detach()


def evaluate(
    loaded: Loaded,
    items: Sequence[Tuple[int, str, Optional[str]]],
    methods: Sequence[str] = METHODS,
    seed: int = 0,
    warn: Warn = lambda msg: None,
    progress: Optional[Callable] = None,
    batch_size: int = 64,
) -> EvalResult:
    """Perturbation curves and areas between them for every input of ``items`` (from
    :func:`read_items`); see the module's docstring for the procedure."""
    if loaded.task == "image-classifier":
        raise InputError("evaluate perturbs tokens: it needs a text model, not an image classifier")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"unknown method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    fill_id, fill_name = fill_token(loaded.tokenizer)
    result = EvalResult(model=loaded.name, task=loaded.task, replacement=fill_name)
    for m in methods:
        result.morf[m], result.lerf[m], result.abc[m] = [], [], []
    model = loaded.model
    device = model.device
    special_ids = set(loaded.tokenizer.all_special_ids)
    iterator = progress(items) if progress is not None else items
    for number, text, compare in iterator:
        texts = [text]
        if loaded.task == "similarity":
            if compare is None:
                raise InputError(f"line {number}: a similarity needs two texts (read_items pairs them)")
            texts.append(compare)
        enc, _ = encode(loaded, texts, warn)
        n_tokens = int(enc.attention_mask[0].sum())
        ids = enc.input_ids[0:1, :n_tokens].to(device)
        mask = enc.attention_mask[0:1, :n_tokens].to(device)
        positions = [p for p in range(n_tokens) if int(ids[0, p]) not in special_ids]
        if not positions:
            warn(f"line {number}: no token to remove (only special tokens); skipped")
            result.skipped += 1
            continue
        fixed = _fixed_embedding(loaded, enc) if loaded.task == "similarity" else None
        target_id = None
        rankings: Dict[str, torch.Tensor] = {}
        for m in methods:
            if m in ("attnlrp", "cp-lrp"):
                if loaded.task == "similarity":
                    full_mask = enc.attention_mask.to(device)
                    attr = attribute(
                        model,
                        input_ids=enc.input_ids.to(device),
                        attention_mask=full_mask,
                        target=similarity_target(full_mask),
                        method=m,
                    )
                else:
                    attr = attribute(model, input_ids=ids, attention_mask=mask, target=target_id, method=m)
                    assert attr.target is not None  # a class or token id (or none) gives the ids explained
                    target_id = int(attr.target[0])
                rankings[m] = attr.token_relevance[0, :n_tokens].float().cpu()
        if loaded.task != "similarity" and target_id is None:
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask)
            logits = out.logits[0, -1] if loaded.task == "causal-lm" else out.logits[0]
            target_id = int(logits.argmax())
        fn = _values_fn(loaded, enc, target_id)
        if "gradient" in methods:
            rankings["gradient"] = _gradient_x_input(loaded, enc, ids, mask, target_id).float().cpu()
        if "random" in methods:
            rng = random.Random(seed * 1_000_003 + number)
            rankings["random"] = torch.tensor([rng.random() for _ in range(n_tokens)])
        # every perturbed row of every method in a few batched forward passes
        rows, index = [], []
        for m in methods:
            scores = rankings[m]
            order = sorted(positions, key=lambda p: -float(scores[p]))  # most relevant first
            for kind, seq in (("morf", order), ("lerf", order[::-1])):
                for k in range(len(seq) + 1):
                    row = ids[0].clone()
                    if k:
                        row[torch.tensor(seq[:k], device=device)] = fill_id
                    rows.append(row)
                    index.append((m, kind, k))
        values = []
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = torch.stack(rows[start : start + batch_size])
                bmask = mask.expand(batch.shape[0], -1)
                out = model(input_ids=batch, attention_mask=bmask)
                values += fn(out, bmask, fixed).float().cpu().tolist()
        curves: Dict[Tuple[str, str], List[float]] = {}
        for (m, kind, _k), v in zip(index, values):
            curves.setdefault((m, kind), []).append(v)
        for m in methods:
            morf, lerf = curves[(m, "morf")], curves[(m, "lerf")]
            result.morf[m].append(morf)
            result.lerf[m].append(lerf)
            result.abc[m].append(area_between(lerf, morf))
        result.texts.append(text)
    if not result.texts:
        raise InputError("no input could be evaluated")
    return result


def notes(summary: Dict[str, dict]) -> List[str]:
    """What a reader of the results should know: that gradient x input ranks tokens worse than a
    random order (a smaller mean ABC), when it does, and why."""
    if "gradient" in summary and "random" in summary:
        gradient, chance = summary["gradient"]["abc_mean"], summary["random"]["abc_mean"]
        if gradient < chance:
            return [
                f"note: gradient x input is below the random order (ABC {gradient:.4f} < {chance:.4f}): the plain "
                "gradient through softmax attention and layer norms is a local, noisy signal whose sign often "
                "flips, so its ranking can be worse than chance; the LRP rules (AttnLRP, CP-LRP) propagate "
                "relevance through those layers instead"
            ]
    return []


def report(result: EvalResult, png: Optional[str] = None) -> str:
    """The table of areas between the curves, as text."""
    summary = result.summary()
    n = len(result.texts)
    lines = [
        f"perturbation faithfulness of {result.model}: {n} input{'s' if n != 1 else ''}",
        f"explained: {TASKS[result.task]}"
        + ("; the first text is perturbed, the second held fixed" if result.task == "similarity" else ""),
        f"removing a token: replacing it by {result.replacement}, one token per step, special tokens kept",
        "",
        f"{'method':<18} {'ABC':>8} {'± s.e.':>8} {'MoRF area':>10} {'LeRF area':>10}",
    ]
    for m, s in summary.items():
        lines.append(
            f"{LABELS[m]:<18} {s['abc_mean']:>8.4f} {s['abc_sem']:>8.4f} {s['morf_area']:>10.4f} "
            f"{s['lerf_area']:>10.4f}"
        )
    lines += [
        "",
        "ABC: area between the LeRF and MoRF curves over the fraction of tokens removed (larger is more",
        "faithful; a random order scores about 0). MoRF/LeRF area: area under each curve.",
    ]
    lines += notes(summary)
    if result.skipped:
        lines.append(f"{result.skipped} input(s) skipped: nothing to remove")
    if png:
        lines.append(f"curves: {png}")
    return "\n".join(lines) + "\n"


def curves_png(result: EvalResult, path: str) -> None:
    """MoRF (solid) and LeRF (dashed) curves of each method, averaged over the inputs."""
    # matplotlib: optional (the command line's extra), and slow to import: only when a plot is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result.summary()
    colours = {"attnlrp": "#c0392b", "cp-lrp": "#e67e22", "gradient": "#2471a3", "random": "#7f8c8d"}
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for m, s in summary.items():
        c = colours.get(m)
        ax.plot(GRID, s["morf_curve"], color=c, lw=2, label=f"{LABELS[m]} MoRF (ABC {s['abc_mean']:.3f})")
        ax.plot(GRID, s["lerf_curve"], color=c, lw=2, ls="--", label=f"{LABELS[m]} LeRF")
    ax.set_xlabel("fraction of tokens removed")
    ax.set_ylabel(TASKS[result.task])
    ax.set_title(f"{result.model}: {len(result.texts)} inputs, tokens replaced by {result.replacement}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    for note in notes(summary):  # under the axes, wrapped to the figure's width
        fig.subplots_adjust(bottom=0.3)
        fig.text(0.02, 0.02, textwrap.fill(note, 120), fontsize=7, va="bottom", ha="left", color="#7b241c")
    try:
        with atomic_write(path, binary=True) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)

"""Attribution of a whole dataset: :func:`attribute_dataset` explains many texts (or token id
lists) in padded batches, in input order, into a JSON-lines file that an interrupted run goes on
with, and across the processes of ``torchrun``.

How it works:

* Batches: the items are taken in windows of ``batch_size * 16``; inside a window they are sorted by
  length and cut into batches of ``batch_size``, padded on the side the model needs (the left for a
  causal decoder, the right otherwise) with an ``attention_mask``. :func:`lrpcpp.attribute` gives each
  row of a padded batch the relevance it has alone; the padding is cut off again.
* Order: the results of a window are handed out (yielded, or written) in input order.
* File: ``out`` gets one JSON object per line and item, in input order (``index``, ``input_ids``,
  ``relevance`` per token, ``target``, ``output``). Each line is appended and flushed as soon as its
  window is done. A rerun keeps the complete lines whose item is still the same, drops a last line
  cut short, and goes on: it recomputes the window of the first missing item whole, so the batches,
  and the file, are the same as those of a run that was never interrupted.
* Processes: when ``torch.distributed`` is initialised, or the environment of ``torchrun`` says
  ``WORLD_SIZE > 1`` (then a ``gloo`` process group is set up for the call and removed afterwards),
  rank ``r`` of ``N`` explains the items ``r, r + N, ...`` (of those not yet in ``out``) into its own
  part file ``OUT.rank{r}-of-{N}``, which a rerun goes on with as above; after a barrier, rank 0
  merges the parts into ``out`` in input order (written whole, in one step) and removes them.
"""

import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._files import atomic_write
from .attribution import attribute, is_causal_decoder

__all__ = ["attribute_dataset", "DatasetItem", "read_dataset"]

WINDOW_BATCHES = 16  # a window, sorted by length, holds this many batches
_CALLER = "lrpcpp.attribute_dataset"


@dataclass
class DatasetItem:
    """The explanation of one item of :func:`attribute_dataset`: its ``index`` in the input, its
    ``input_ids``, the ``relevance`` of each of its tokens (``[seq]``; ``[K, seq]`` for a list of K
    targets), the explained ``target`` id(s) and the explained ``output`` value(s)."""

    index: int
    input_ids: List[int]
    relevance: Tensor
    target: Any
    output: Any

    def to_json(self) -> str:
        record = {
            "index": self.index,
            "input_ids": self.input_ids,
            "relevance": self.relevance.tolist(),
            "target": self.target,
            "output": self.output,
        }
        return json.dumps(record)


def _ids_of(item: object, k: int, tokenizer) -> List[int]:
    """The token ids of item ``k``: a text (with ``tokenizer``) or a mapping with ``input_ids``."""
    if isinstance(item, str):
        if tokenizer is None:
            raise TypeError(f"{_CALLER}: item {k} is a text; texts need tokenizer=")
        ids = tokenizer(item)["input_ids"]
    elif isinstance(item, Mapping):
        extra = sorted(set(item) - {"input_ids"})
        if "input_ids" not in item or extra:
            raise ValueError(
                f"{_CALLER}: item {k} must be a text or a mapping with the one key 'input_ids', got the keys "
                f"{sorted(item)}"
            )
        ids = item["input_ids"]
    else:
        raise TypeError(
            f"{_CALLER}: item {k} must be a text or a mapping {{'input_ids': ...}}, got {type(item).__name__}"
        )
    ids = torch.as_tensor(ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.numel() == 0:
        raise ValueError(f"{_CALLER}: item {k} has no tokens")
    if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(
            f"{_CALLER}: item {k}: input_ids must be one row of integer token ids, got a {ids.dtype} tensor of "
            f"shape {tuple(ids.shape)}"
        )
    return [int(i) for i in ids.tolist()]


def _pad_id(model: nn.Module, tokenizer) -> int:
    for owner in (tokenizer, getattr(model, "config", None)):
        pad = getattr(owner, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    return 0  # any id: padded positions are masked, and their relevance is cut off


def _explain(
    model: nn.Module, rows: List[Tuple[int, List[int]]], left: bool, pad: int, kwargs: dict
) -> Iterator[DatasetItem]:
    """One padded batch of ``(index, ids)`` rows through :func:`lrpcpp.attribute`."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    width = max(len(ids) for _, ids in rows)
    batch = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (_, ids) in enumerate(rows):
        cols = slice(width - len(ids), width) if left else slice(0, len(ids))
        batch[b, cols] = torch.tensor(ids)
        mask[b, cols] = 1
    attr = attribute(model, input_ids=batch.to(device), attention_mask=mask.to(device), **kwargs)
    relevance = attr.token_relevance.detach().cpu()
    output = attr.output.detach().cpu()
    target = attr.target.cpu() if attr.target is not None else None
    for b, (index, ids) in enumerate(rows):
        cols = slice(width - len(ids), width) if left else slice(0, len(ids))
        yield DatasetItem(
            index=index,
            input_ids=ids,
            relevance=relevance[..., b, cols].clone(),
            target=None if target is None else target[b].tolist(),
            output=output[b].tolist(),
        )


def _windows(
    model: nn.Module, rows: List[Tuple[int, List[int]]], start: int, batch_size: int, left: bool, pad: int, kwargs
) -> Iterator[DatasetItem]:
    """The explanations of ``rows[start:]`` in order, computed window by window (the whole window of
    ``rows[start]`` is computed, so that its batches do not depend on ``start``)."""
    window = batch_size * WINDOW_BATCHES
    if start >= len(rows):
        return
    for w in range((start // window) * window, len(rows), window):
        part = rows[w : w + window]
        order = sorted(range(len(part)), key=lambda j: (len(part[j][1]), j))
        done: Dict[int, DatasetItem] = {}
        for b in range(0, len(order), batch_size):
            chosen = [part[j] for j in order[b : b + batch_size]]
            for item in _explain(model, chosen, left, pad, kwargs):
                done[item.index] = item
        for j, (index, _) in enumerate(part):
            if w + j >= start:
                yield done[index]


# ----------------------------------------------------------------------------- files
def _read_done(path: str, expected: Sequence[Tuple[int, List[int]]]) -> Tuple[int, int]:
    """(complete lines to keep, their bytes) of a results file at ``path``: its k-th line must be the
    result of ``expected[k]`` (the same index and ids); a last line without its newline (cut short by
    an interruption) is dropped. Any other content is refused, never overwritten."""
    if not os.path.exists(path):
        return 0, 0
    with open(path, "rb") as f:
        data = f.read()
    *complete, _partial = data.split(b"\n")
    keep = 0
    for k, raw in enumerate(complete):
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        again = f"remove {path} to start again, or choose another out="
        if not isinstance(record, dict) or "index" not in record or "input_ids" not in record:
            raise ValueError(
                f"{_CALLER}: {path} is not a results file of attribute_dataset (its line {k + 1}): {again}"
            )
        if k >= len(expected) or [record["index"], record["input_ids"]] != list(expected[k]):
            raise ValueError(
                f"{_CALLER}: line {k + 1} of {path} is the result of item {record['index']} with other input_ids "
                f"than the item at that place now: the items changed; {again}"
            )
        keep += len(raw) + 1
    return len(complete), keep


def _write_lines(path: str, keep: int, texts: Iterable[str], progress: Callable[[], None]) -> None:
    """Appends the JSON ``texts``, a line each, to ``path`` after its first ``keep`` bytes, each
    line written whole and at once."""
    with open(path, "r+b" if os.path.exists(path) else "wb", buffering=0) as f:
        f.truncate(keep)
        f.seek(keep)
        for text in texts:
            line = memoryview((text + "\n").encode("utf-8"))
            while line:
                line = line[f.write(line) :]
            progress()
        os.fsync(f.fileno())


def _progress(enabled: bool, total: int, initial: int, desc: str) -> Callable[[], None]:
    """A step callback: a tqdm bar on stderr if tqdm is installed, else one updated stderr line."""
    if not enabled or initial >= total:
        return lambda: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        count = [initial]

        def step():
            count[0] += 1
            sys.stderr.write(f"\r{desc}: {count[0]}/{total} items")
            if count[0] == total:
                sys.stderr.write("\n")
            sys.stderr.flush()

        return step
    bar = tqdm(total=total, initial=initial, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True)

    def update():
        bar.update(1)
        if bar.n >= total:
            bar.close()

    return update


def _rank_world() -> Tuple[int, int]:
    """(rank, world size): of the initialised ``torch.distributed`` process group, else of the
    environment of ``torchrun`` (``RANK``, ``WORLD_SIZE``), else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def distributed() -> bool:
    """Whether this process is one of several: an initialised ``torch.distributed`` process group of
    more than one rank, or the environment of ``torchrun`` with ``WORLD_SIZE > 1``."""
    return _rank_world()[1] > 1


def _world() -> Tuple[int, int, bool]:
    """(rank, world size, whether the process group was set up here)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_available():
            raise RuntimeError(f"{_CALLER}: WORLD_SIZE > 1, and this torch has no torch.distributed")
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def attribute_dataset(
    model: nn.Module,
    items: Iterable[Union[str, Mapping[str, Any]]],
    tokenizer=None,
    batch_size: int = 8,
    out: Optional[str] = None,
    progress: bool = True,
    **attribute_kwargs,
) -> Union[Iterator[DatasetItem], int]:
    """Explains every item of a dataset with :func:`lrpcpp.attribute`, in padded batches.

    ``items``: texts (tokenised with ``tokenizer``) or mappings ``{"input_ids": ids}`` (a list or a
    1-D tensor of token ids). They are sorted by length within windows of ``batch_size * 16`` items
    and explained ``batch_size`` at a time, padded on the left for a causal decoder and on the right
    otherwise; each item gets the relevance it has alone. ``attribute_kwargs`` go to
    :func:`lrpcpp.attribute` (``target``, ``method``, ``mode``, ``preset``, ...); the same for every
    batch.

    Without ``out``: an iterator of :class:`DatasetItem`, in input order (under ``torch.distributed``,
    the items of this rank). With ``out``: the results are written to that JSON-lines file, one line
    per item in input order, and the number of items written by this call is returned (on every
    rank). A run that was interrupted is gone on with: the lines already in ``out`` (or in a rank's
    part file) are kept, a line cut short is redone, and a file whose lines are the results of other
    items is refused. Under ``torchrun`` (or with an initialised process group) the items are split
    across the ranks and rank 0 merges their part files into ``out``; see :mod:`lrpcpp.dataset`.
    ``progress``: a progress bar (or line) on stderr, on rank 0.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"{_CALLER}: batch_size must be a positive int, got {batch_size!r}")
    taken = {"input_ids", "attention_mask", "inputs_embeds", "pixel_values"} & set(attribute_kwargs)
    if taken:
        raise TypeError(f"{_CALLER}: {', '.join(sorted(taken))} come from the items, not from keyword arguments")
    target = attribute_kwargs.get("target")
    if isinstance(target, Tensor) and target.numel() > 1:
        raise ValueError(
            f"{_CALLER}: target= is the same for every batch (an id, a list of ids or a callable); a tensor of one "
            "id per item does not follow the items into their batches"
        )
    if attribute_kwargs.get("latent"):
        raise ValueError(f"{_CALLER}: latent=True is not supported for datasets; explain single batches with attribute")
    rows = [(k, _ids_of(item, k, tokenizer)) for k, item in enumerate(items)]
    left, pad = is_causal_decoder(model), _pad_id(model, tokenizer)
    if out is None:  # the ranks need not talk to each other: no process group is set up
        rank, world = _rank_world()
        return _windows(model, rows[rank::world], 0, batch_size, left, pad, attribute_kwargs)
    return _to_file(model, rows, out, batch_size, left, pad, progress, attribute_kwargs)


def _to_file(model, rows, out: str, batch_size, left, pad, progress, kwargs) -> int:
    def lines(share, start):
        return (item.to_json() for item in _windows(model, share, start, batch_size, left, pad, kwargs))

    return write_sharded(os.fspath(out), rows, _read_done, lines, progress)


def write_sharded(
    out: str,
    keys: Sequence[Any],
    done_in: Callable[[str, Sequence[Any]], Tuple[int, int]],
    lines: Callable[[Sequence[Any], int], Iterable[str]],
    progress: bool = True,
) -> int:
    """The file mechanism of :func:`attribute_dataset`, for any JSON-lines results file of one line
    per item (the command line's ``explain --file --out`` uses it under ``torchrun``): returns the
    number of items written by this call.

    ``keys``: one per item, in input order; ``done_in(path, keys)``: the complete lines of ``path``
    that are the results of the first of ``keys`` and their bytes, ``(count, bytes)`` (an error for a
    file of other content); ``lines(keys, start)``: the JSON text of the results of ``keys[start:]``,
    in order. In one process ``out`` is appended to after the lines it has; across ``N`` processes
    (see :func:`attribute_dataset`) rank ``r`` writes the keys ``r, r + N, ...`` of those not yet in
    ``out`` to its part file ``OUT.rank{r}-of-{N}``, and rank 0 merges the parts into ``out``."""
    check_parts(out)
    rank, world, own_group = _world()
    try:
        done, keep = done_in(out, keys)
        if world == 1:
            step = _progress(progress, len(keys), done, "explaining")
            _write_lines(out, keep, lines(keys, done), step)
            return len(keys) - done
        import torch.distributed as dist

        remaining = keys[done:]
        share = remaining[rank::world]
        part = f"{out}.rank{rank}-of-{world}"
        mine, mine_keep = done_in(part, share)
        step = _progress(progress and rank == 0, len(share), mine, f"explaining (rank 0 of {world})")
        _write_lines(part, mine_keep, lines(share, mine), step)
        dist.barrier()
        if rank == 0:
            _merge(out, keep, [f"{out}.rank{r}-of-{world}" for r in range(world)], len(remaining))
        dist.barrier()
        return len(remaining)
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def check_parts(out: str, caller: str = _CALLER) -> None:
    """Refuses (``ValueError``) part files of ``out`` left by an interrupted run of another number of
    processes than this run's: their items are split otherwise, so this run cannot go on with them."""
    world = _rank_world()[1]
    folder, name = os.path.split(os.path.abspath(out))
    pattern = re.compile(re.escape(name) + r"\.rank(\d+)-of-(\d+)")
    others = sorted(f for f in os.listdir(folder) if (m := pattern.fullmatch(f)) and int(m.group(2)) != world)
    if others:
        raise ValueError(
            f"{caller}: {', '.join(os.path.join(folder, f) for f in others)}: part file(s) of an interrupted run with "
            f"another number of processes than this one ({world}); run it again with that number to go on, or remove "
            "them to start again"
        )


def _merge(out: str, keep: int, parts: List[str], count: int) -> None:
    """``out``: its first ``keep`` bytes, then the lines of the part files taken in turn (line j of
    the remaining items is in part ``j % N``), written whole in one step; the parts are removed."""
    lines: List[List[bytes]] = []
    for part in parts:
        with open(part, "rb") as f:
            lines.append(f.read().split(b"\n")[:-1])
    if sum(len(p) for p in lines) != count:
        raise RuntimeError(f"{_CALLER}: the part files {parts} hold {sum(map(len, lines))} results, expected {count}")
    prefix = b""
    if keep:
        with open(out, "rb") as f:
            prefix = f.read(keep)
    with atomic_write(out, binary=True) as f:
        f.write(prefix)
        for j in range(count):
            f.write(lines[j % len(parts)][j // len(parts)] + b"\n")
    for part in parts:
        os.unlink(part)


def read_dataset(path: str) -> List[Dict[str, Any]]:
    """The records of a results file of :func:`attribute_dataset`, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]

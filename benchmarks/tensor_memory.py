"""Tensor memory of one whole-model attribution against the plain gradient, independent of the allocator.

The peak RSS that ``bench_models.py`` reports depends on how glibc's malloc reuses and returns the freed
memory of a call (it moves by several MiB between fresh processes running the same call). This script
measures what the tensors themselves take, deterministically, on the models of ``bench_models.py``
(parameters frozen, one call after a warm-up call):

- **peak tensors**: the largest sum of live tensor bytes during the call (forward and backward), from the
  allocations and frees torch.profiler records (``profile_memory=True``), with what is live at that point
  listed by the op that allocated it where it differs from the plain gradient's;
- **saved**: the bytes of the unique storages the forward keeps for the backward
  (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded).

Usage (from the repository root)::

    PYTHONPATH=python .venv/bin/python benchmarks/tensor_memory.py [--quick] [--only KEY ...]
"""

import argparse
import collections
import gc
import os
import sys

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_models as bm  # noqa: E402  (the models, inputs and variants of the whole-model benchmark)

VARIANTS = {
    "plain": lambda c: c.plain(),
    "registry": lambda c: c.attribute(),
    "operations": lambda c: c.attribute(level="operations"),
}
LABELS = {"plain": "plain gradient", "registry": "lrpcpp.attribute", "operations": 'attribute, `level="operations"`'}


def _allocations(prof):
    """(time, bytes, address, allocating ops: the innermost three) of every allocation (+) and free (-)
    that the profiler saw, in order."""
    out = []

    def walk(node, ops):
        if node.tag == _EventType.Allocation:
            op = " > ".join(name.split("::")[-1].split(": ")[-1] for name in ops[-3:]) or "(outside ops)"
            out.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr, op))
        for child in node.children:
            walk(child, ops + (node.name,))

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, ())
    return sorted(out, key=lambda a: a[0])


def peak_tensors(fn):
    """(peak live tensor bytes of ``fn()``, Counter of (bytes, allocating op) live at the peak)."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    current = peak = 0
    live, at_peak = {}, {}
    for _, size, ptr, op in _allocations(prof):
        current += size
        if size > 0:
            live[ptr] = (size, op)
        else:
            live.pop(ptr, None)
        if current > peak:
            peak, at_peak = current, dict(live)
    return peak, collections.Counter(at_peak.values())


def saved_bytes(fn, params):
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def measure(key, quick):
    case = bm.build_case(key, bm.QUICK if quick else bm.FULL, quick)
    bm.set_frozen(case.model, True)
    params = {p.untyped_storage().data_ptr() for p in case.model.parameters()}
    rows = {}
    for variant, call in VARIANTS.items():
        call(case)  # warm-up
        peak, live = peak_tensors(lambda call=call: call(case))
        rows[variant] = dict(peak=peak, live=live, saved=saved_bytes(lambda call=call: call(case), params))
    return case, rows


def mib(n):
    return f"{n / 2**20:.2f}"


def render(results):
    lines = [
        "| model | input | variant | peak tensors (MiB) | peak / plain | saved for backward (MiB) | saved / plain |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    notes = []
    for case, rows in results:
        plain = rows["plain"]
        for variant, r in rows.items():
            lines.append(
                f"| {case.model_name} | {case.input_text} | {LABELS[variant]} | {mib(r['peak'])} | "
                f"{r['peak'] / plain['peak']:.3f} | {mib(r['saved'])} | {r['saved'] / plain['saved']:.3f} |"
            )
        for variant in ("registry", "operations"):
            diff = rows[variant]["live"].copy()
            diff.subtract(plain["live"])
            listed = [f"{n:+d} x {size / 2**10:.0f} KiB ({op})" for (size, op), n in diff.items() if n and size >= 4096]
            notes.append(
                f"- {case.key}, {variant} - plain, live at the peak: " + ("; ".join(sorted(listed)) or "the same")
            )
    return "\n".join(lines + [""] + notes)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models (a smoke test)")
    ap.add_argument("--only", nargs="+", default=None, help="model keys (llama-128 llama-512 minilm vit)")
    args = ap.parse_args()
    keys = [k for k in bm.case_keys(bm.QUICK if args.quick else bm.FULL) if k != "llama-batched"]
    if args.only:
        unknown = sorted(set(args.only) - set(keys))
        if unknown:
            ap.error(f"unknown keys {unknown}; choose from {keys}")
        keys = [k for k in keys if k in args.only]
    print(render([measure(key, args.quick) for key in keys]))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Relevance of the benchmark models, saved once and compared bitwise later: the check that a
refactoring left every number as it was.

Run from the repository root, before and after a change::

    PYTHONPATH=python .venv/bin/python scripts/relevance_snapshot.py save build/relevance-before.pt
    PYTHONPATH=python .venv/bin/python scripts/relevance_snapshot.py compare build/relevance-before.pt

The models are those of ``benchmarks/bench_models.py`` (LLaMA-style at sequence 128 and 512, the
16-target batch, all-MiniLM-L6-v2 with its real weights, ViT) and ``benchmarks/bench_vision.py``
(ViT with the ``vit`` preset, the ResNet-50-shaped CNN with ``epsilon_gamma_box``), at their full
sizes (``--quick``: the benchmarks' tiny sizes), each in gradient mode; the LLaMA model at sequence
128 also in explicit mode and with ``latent=True``. ``compare`` exits 1 and names every tensor that
differs in a single bit (``torch.equal`` on the same dtype and shape), 0 when all are equal.
"""

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_models  # noqa: E402
import bench_vision  # noqa: E402
import lrpcpp  # noqa: E402


def _tensors(prefix, attr):
    out = {f"{prefix}/relevance": attr.relevance, f"{prefix}/output": attr.output}
    for name, value in sorted((attr.latent or {}).items()):
        out[f"{prefix}/latent/{name}"] = value
    return {k: v.detach().clone() for k, v in out.items()}


def snapshot(quick: bool) -> dict:
    torch.manual_seed(0)
    sizes = bench_models.QUICK if quick else bench_models.FULL
    result, cache = {}, {}
    for key in bench_models.case_keys(sizes):
        case = bench_models.build_case(key, sizes, quick, cache)
        print(f"  {key}", flush=True)
        if key == "llama-batched":
            result.update(_tensors(key, case.attribute(target=case.targets)))
            continue
        result.update(_tensors(key, case.attribute()))
        if key == f"llama-{sizes['llama_seqs'][0]}":
            result.update(_tensors(f"{key}-explicit", case.attribute(mode="explicit")))
            result.update(_tensors(f"{key}-latent", case.attribute(latent=True)))
    for name in ("vit", "resnet50"):
        print(f"  vision {name}", flush=True)
        model, pixels, (preset, options) = bench_vision.build(name, quick)
        attr = lrpcpp.attribute(model, pixel_values=pixels, preset=lrpcpp.preset(preset, **options))
        result.update(_tensors(f"vision-{name}", attr))
    return result


def compare(saved: dict, now: dict) -> list:
    problems = [f"{k}: missing now" for k in saved if k not in now]
    problems += [f"{k}: new (not in the snapshot)" for k in now if k not in saved]
    for k in saved:
        if k in now:
            a, b = saved[k], now[k]
            if a.dtype != b.dtype or a.shape != b.shape:
                problems.append(f"{k}: {a.dtype} {tuple(a.shape)} before, {b.dtype} {tuple(b.shape)} now")
            elif not torch.equal(a, b):
                diff = (a.double() - b.double()).abs().max().item()
                problems.append(f"{k}: differs (max abs difference {diff:.3g})")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("save", "compare"))
    parser.add_argument("path")
    parser.add_argument("--quick", action="store_true", help="the benchmarks' tiny sizes")
    args = parser.parse_args()
    now = snapshot(args.quick)
    if args.action == "save":
        os.makedirs(os.path.dirname(os.path.abspath(args.path)), exist_ok=True)
        torch.save({"quick": args.quick, "tensors": now}, args.path)
        print(f"saved {len(now)} tensors to {args.path}")
        return 0
    saved = torch.load(args.path)
    if saved["quick"] != args.quick:
        print(f"{args.path} was saved with quick={saved['quick']}; compare with the same sizes")
        return 2
    problems = compare(saved["tensors"], now)
    for p in problems:
        print(p)
    print(f"{len(saved['tensors']) - len(problems)} of {len(saved['tensors'])} tensors bitwise equal")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""CPU benchmark: attribution through the compiled model against eager attribution.

Run from the repository root (see benchmarks/README.md)::

    PYTHONPATH=python .venv/bin/python benchmarks/bench_compile.py            # markdown to stdout
    PYTHONPATH=python .venv/bin/python benchmarks/bench_compile.py --write    # also benchmarks/RESULTS.md
    PYTHONPATH=python .venv/bin/python benchmarks/bench_compile.py --quick    # tiny model: a smoke test

Model: a LLaMA-style ``LlamaForCausalLM`` (random weights, float32, eval mode, SDPA attention):
8 layers, hidden 512, MLP 1376, 8 heads, vocabulary 32000; batch 1, sequence 512. Explained: the
top next-token logit after the last position (``target=None``).

Variants, each in its own copy of the model (same weights), all in one process:

* ``eager attribute``: ``lrpcpp.attribute(model, input_ids=ids)`` (patches and unpatches per call).
* ``compiled attribute``: ``lrpcpp.deploy.compile_attribute(model)`` (inductor, ``fullgraph=True``),
  called as ``explain(input_ids=ids)``; the model stays patched, its parameters frozen, and only
  the explained position's logits are computed (``logits_to_keep``).
* ``compiled attribute, all logits``: the same with ``all_logits=True``: the logits of every
  position, as ``lrpcpp.attribute`` computes them; what compiling alone changes.
* ``eager, explained logits only``: the model patched once (``lrpcpp.patch``), forward with
  ``logits_to_keep``, backward; what computing only the explained logits alone changes.
* ``plain gradient, eager`` and ``plain gradient, compiled``: the unpatched model with frozen
  parameters, forward, the same logit, ``torch.autograd.grad`` to the embeddings; compiled with
  ``torch.compile(model, fullgraph=True)``. What compiling does for the ordinary gradient, for
  comparison.

Timing: the first call of a compiled variant compiles (its time is reported as compile time, with an
empty inductor cache unless ``--warm-cache``), then
``--warmup`` calls of every variant, then ``--reps`` rounds in which every variant runs once, the
order alternating from round to round; the median is reported. The load average and the share of
CPU time that other processes used during the timed rounds (from /proc/stat) are printed with the
numbers. Checks: the compiled relevance against the eager relevance (largest difference relative
to the largest eager value), and the explained logit.
"""

import argparse
import atexit
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import results_file  # benchmarks/results_file.py
from machine import cpu_model  # benchmarks/machine.py

if "--warm-cache" not in sys.argv:
    # a cache of its own, empty: the compile times are those of a first compilation (set before
    # torch is imported, which reads it); removed at exit
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lrpcpp-bench-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
try:
    import lrpcpp
except ImportError:  # run from a checkout without PYTHONPATH=python
    sys.path.insert(0, os.path.join(_ROOT, "python"))
    import lrpcpp
import lrpcpp.deploy  # noqa: E402  (after the path fallback above)

SECTION = "## Compiled attribution (CPU)"
SIZES = {
    "full": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "quick": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1000,
        max_position_embeddings=128,
    ),
}


def progress(msg):
    print(msg, file=sys.stderr, flush=True)


def build(sizes, seed=0):
    import transformers as tfm

    torch.manual_seed(seed)
    config = tfm.LlamaConfig(**sizes)
    config._attn_implementation = "sdpa"
    return tfm.LlamaForCausalLM(config).eval()


class EagerExplainedOnly:
    """The model patched once; only the explained position's logits (``logits_to_keep``), eager."""

    def __init__(self, model):
        self.model = model
        self.handle = lrpcpp.patch(model)

    def __call__(self, input_ids):
        with torch.no_grad():
            leaf = self.model.get_input_embeddings()(input_ids)
        leaf.requires_grad_()
        logits = self.model(inputs_embeds=leaf, logits_to_keep=1).logits[:, -1]
        picked = logits.gather(-1, logits.detach().argmax(-1, keepdim=True))[:, 0]
        (grad,) = torch.autograd.grad(picked, leaf, torch.ones_like(picked))
        return grad * leaf.detach(), picked.detach()


class Plain:
    """The ordinary input gradient of the explained logit (no lrpcpp), eager or compiled."""

    def __init__(self, model, compiled):
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.forward = torch.compile(model, fullgraph=True) if compiled else model

    def __call__(self, input_ids):
        with torch.no_grad():
            leaf = self.model.get_input_embeddings()(input_ids)
        leaf.requires_grad_()
        logits = self.forward(inputs_embeds=leaf).logits[:, -1]
        picked = logits.gather(-1, logits.detach().argmax(-1, keepdim=True))[:, 0]
        (grad,) = torch.autograd.grad(picked, leaf, torch.ones_like(picked))
        return grad * leaf.detach(), picked.detach()


def busy_jiffies():
    """(all CPUs' busy time, this process's CPU time), in clock ticks."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    with open(f"/proc/{os.getpid()}/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()
    return busy, int(own[11]) + int(own[12])


def machine():
    return cpu_model(), results_file.commit()


def run(args):
    sizes = SIZES["quick" if args.quick else "full"]
    seq = args.seq or (32 if args.quick else 512)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    ids = torch.randint(3, sizes["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(1))
    load_before = os.getloadavg()

    progress("building the models")
    eager_model = build(sizes)
    explain = lrpcpp.deploy.compile_attribute(build(sizes))
    explain_all = lrpcpp.deploy.compile_attribute(build(sizes), all_logits=True)
    explained_only = EagerExplainedOnly(build(sizes))
    plain_eager, plain_compiled = Plain(build(sizes), False), Plain(build(sizes), True)

    def eager_attribute():
        a = lrpcpp.attribute(eager_model, input_ids=ids)
        return a.relevance, a.output

    def compiled(f):
        def run():
            a = f(input_ids=ids)
            return a.relevance, a.output

        return run

    variants = {
        "eager attribute": eager_attribute,
        "compiled attribute": compiled(explain),
        "compiled attribute, all logits": compiled(explain_all),
        "eager, explained logits only": lambda: explained_only(ids),
        "plain gradient, eager": lambda: plain_eager(ids),
        "plain gradient, compiled": lambda: plain_compiled(ids),
    }
    compile_s, results = {}, {}
    for name in ("compiled attribute", "compiled attribute, all logits", "plain gradient, compiled"):
        progress(f"first call (compiles): {name}")
        t = time.perf_counter()
        results[name] = variants[name]()
        compile_s[name] = time.perf_counter() - t
    for _ in range(args.warmup):
        for name, f in variants.items():
            results[name] = f()

    progress(f"timing: {args.reps} rounds")
    times = {name: [] for name in variants}
    names = list(variants)
    busy0, own0 = busy_jiffies()
    for r in range(args.reps):
        for name in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t)
    busy1, own1 = busy_jiffies()
    others = max(0, (busy1 - busy0) - (own1 - own0)) / max(1, busy1 - busy0)
    load_after = os.getloadavg()

    # where the eager attribution spends its time: matrix products and attention kernels, which
    # compiling leaves to the same library kernels, against the rest, which inductor can fuse
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        eager_attribute()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    heavy = sum(
        e.self_cpu_time_total
        for e in events
        if e.key in ("aten::mm", "aten::addmm", "aten::bmm") or "scaled_dot_product" in e.key
    )
    lm_head = sum(
        e.self_cpu_time_total
        for e in prof.events()
        if e.name == "aten::mm" and e.input_shapes and any(sizes["vocab_size"] in sh for sh in e.input_shapes)
    )
    explain.remove()
    explain_all.remove()
    explained_only.handle.remove()

    ref, ref_out = results["eager attribute"]
    got, got_out = results["compiled attribute"]
    rel_diff = max(
        float((results[k][0] - ref).abs().max() / ref.abs().max())
        for k in ("compiled attribute", "compiled attribute, all logits", "eager, explained logits only")
    )
    plain_diff = float(
        (results["plain gradient, compiled"][0] - results["plain gradient, eager"][0]).abs().max()
        / results["plain gradient, eager"][0].abs().max()
    )
    return dict(
        sizes=sizes,
        seq=seq,
        times={k: statistics.median(v) for k, v in times.items()},
        compile_s=compile_s,
        rel_diff=rel_diff,
        plain_diff=plain_diff,
        logit_diff=float((got_out - ref_out).abs().max()),
        finite=bool(torch.isfinite(got).all()),
        others=others,
        load=(load_before, load_after),
        gemm_share=heavy / max(total, 1),
        lm_head_share=lm_head / max(total, 1),
        threads=torch.get_num_threads(),
        reps=args.reps,
        warmup=args.warmup,
        warm_cache=args.warm_cache,
        flags="".join(" " + a for a in sys.argv[1:] if a != "--write"),
    )


def report(res, quick):
    cpu, commit = machine()
    t, c = res["times"], res["compile_s"]
    eager = t["eager attribute"]
    s = res["sizes"]
    ratio = t["compiled attribute"] / eager
    L = [SECTION, ""]
    L.append(f"- CPU: {cpu}, {os.cpu_count()} logical cores; torch.get_num_threads() = {res['threads']}")
    L.append(
        f"- torch {torch.__version__}, lrpcpp {lrpcpp.__version__}, Python {platform.python_version()}, commit {commit}"
    )
    L.append(f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    L.append(
        f"- Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in res['load'][0])}; after: "
        f"{', '.join(f'{v:.2f}' for v in res['load'][1])}. CPU time used by other processes during the "
        f"timed rounds: {res['others'] * 100:.0f}%"
    )
    if quick:
        L.append("- **--quick**: tiny model, not a measurement")
    L.append("")
    cache = "inductor's usual on-disk cache" if res["warm_cache"] else "an empty inductor cache"
    L.append(
        f"Produced by `benchmarks/bench_compile.py{res['flags']}` (see `benchmarks/README.md`). "
        f"LlamaForCausalLM, random weights, float32, SDPA: {s['num_hidden_layers']} layers, hidden "
        f"{s['hidden_size']}, MLP {s['intermediate_size']}, {s['num_attention_heads']} heads, vocabulary "
        f"{s['vocab_size']}; batch 1, sequence {res['seq']}; the top next-token logit. Median of {res['reps']} "
        f"rounds after {res['warmup']} warm-up calls; each round runs every variant once, alternating the order. "
        f"Compile times with {cache}."
    )
    L.append("")
    L.append("Goal: compiled attribution at most 0.8x eager attribution.")
    L.append("")
    L.append("| variant | time (ms) | / eager attribute | first call, compiling (s) |")
    L.append("|---|---:|---:|---:|")
    for name in (
        "eager attribute",
        "compiled attribute",
        "compiled attribute, all logits",
        "eager, explained logits only",
        "plain gradient, eager",
        "plain gradient, compiled",
    ):
        first = f"{c[name]:.1f}" if name in c else "—"
        L.append(f"| {name} | {t[name] * 1e3:.1f} | {t[name] / eager:.2f} | {first} |")
    L.append("")
    met = "met" if ratio <= 0.8 else "**not met**"
    L.append(
        "Compile times: the first compiled variant also pays inductor's one-off start-up (worker pool, "
        "headers); the later ones reuse what the earlier ones compiled in this run."
    )
    L.append("")
    L.append(
        f"Compiled / eager attribution: **{ratio:.2f}x** (goal <= 0.8x: {met}). Of that, compiling alone "
        f"(all logits): {t['compiled attribute, all logits'] / eager:.2f}x; computing only the explained "
        f"logits alone (eager): {t['eager, explained logits only'] / eager:.2f}x. Compiled / eager plain "
        f"gradient: {t['plain gradient, compiled'] / t['plain gradient, eager']:.2f}x."
    )
    L.append("")
    L.append(
        f"Where the eager attribution's CPU time goes (torch.profiler, one call): matrix products and "
        f"attention kernels {res['gemm_share'] * 100:.0f}%, of which the projection onto the vocabulary "
        f"(forward and backward) {res['lm_head_share'] * 100:.0f}%; everything else "
        f"{(1 - res['gemm_share']) * 100:.0f}%. Compiling fuses only that rest: the matrix products and the "
        "attention run the same library kernels compiled or not. Computing the logits of the explained "
        "position only removes most of the vocabulary projection."
    )
    L.append("")
    saved = eager - t["compiled attribute"]
    if saved > 0:
        L.append(
            f"Compiling took {c['compiled attribute']:.0f} s on the first call and saves {saved * 1e3:.0f} ms per "
            f"call after it: it pays for itself after about {c['compiled attribute'] / saved:.0f} calls with "
            "inputs of this shape (a new shape compiles again, once, with dynamic shapes)."
        )
    else:
        L.append(f"Compiling took {c['compiled attribute']:.0f} s and saves no time per call on this machine.")
    L.append("")
    L.append(
        f"Checks: the other attributions against the eager one, largest difference / largest value = "
        f"{res['rel_diff']:.1e} "
        f"(plain gradient: {res['plain_diff']:.1e}); explained logit differs by {res['logit_diff']:.1e}; "
        f"relevance finite: {'yes' if res['finite'] else '**no**'}."
    )
    return "\n".join(L) + "\n"


def write_section(text):
    progress(f"wrote the section '{SECTION}' of {results_file.write_section(SECTION, text)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, two repetitions (a smoke test)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 512; 32 with --quick)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 7; 2 with --quick)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up calls per variant after compiling (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument(
        "--warm-cache",
        action="store_true",
        help="use inductor's usual on-disk cache (default: an empty one, so compile times are cold)",
    )
    ap.add_argument("--write", action="store_true", help=f"also write the section '{SECTION}' of benchmarks/RESULTS.md")
    args = ap.parse_args()
    if args.reps is None:
        args.reps = 2 if args.quick else 7
    started = time.perf_counter()
    text = report(run(args), args.quick)
    text += f"\nTotal run time: {time.perf_counter() - started:.0f} s.\n"
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""CPU benchmark: whole-model attribution at long sequences, with and without activation checkpointing.

Run from the repository root (see benchmarks/README.md)::

    PYTHONPATH=python .venv/bin/python benchmarks/bench_long.py            # markdown to stdout
    PYTHONPATH=python .venv/bin/python benchmarks/bench_long.py --write    # also benchmarks/RESULTS.md
    PYTHONPATH=python .venv/bin/python benchmarks/bench_long.py --quick    # tiny sizes: a smoke test

What is measured
----------------
A LLaMA-style decoder (``LlamaForCausalLM`` from a ``LlamaConfig``, random weights, float32, eval mode,
``sdpa`` attention; the family of ``bench_models.py``, smaller: 4 layers, hidden 256, MLP 688, 4 heads
of 64, vocabulary 32000) at batch 1 and sequence 128, 512, 1024, 2048 and 4096. Explained: the top
next-token logit after the last position. Every call passes ``logits_to_keep=1`` (the head computes the
logits of the explained position only; at sequence 4096 all logits would be a [4096, 32000] tensor and
its gradient, 1 GiB that says nothing about the sequence length's cost) and ``use_cache=False``.

Six variants, every parameter ``requires_grad_(False)``:

* ``plain``: the embeddings looked up without a graph require grad; forward, explained value,
  ``torch.autograd.grad`` to the embeddings (as in ``bench_models.py``);
* ``registry``: ``lrpcpp.attribute(model, input_ids=...)`` (the family registry's rules);
* ``operations``: the same with ``level="operations"``;

each on a model without and on one with activation checkpointing (``activation_checkpointing_enable()``,
the new name of ``gradient_checkpointing_enable()``: every decoder layer keeps only its input and is
recomputed in the backward pass). Hugging Face checkpoints a layer in training mode only, so on the
plain side the layers' own ``training`` flag is on (everything in them is in eval mode), which is what
``lrpcpp.attribute`` does with such a model.

Time: the whole call, after ``--warmup`` calls of each variant, median of ``--reps`` rounds; a round
calls the six variants once, the order alternating between rounds, all in one process. Wall time and
the CPU time of the process (all its threads, ``time.process_time``) are both measured: with one
thread (``--threads 1``) the CPU time is the work of the call, which other processes' load moves
much less than the wall time (with more threads, OpenMP's waiting threads spin). The share of
CPU time other processes used during the kept rounds (/proc/stat) and the load average are reported;
rounds above ``--max-foreign`` are dropped and rerun up to ``--max-rounds`` (default: none rerun, a
round at sequence 4096 takes a minute on a loaded machine).

Memory: one fresh subprocess per sequence and variant (as in ``bench_models.py``): build the model and
input, one warm-up call, ``gc.collect()`` and ``malloc_trim(0)``, ``VmRSS``, reset the peak counter
(``echo 5 > /proc/self/clear_refs``), the measured call, ``VmHWM``. Reported is the increase of the peak
over the RSS before the call (what the call adds to the loaded model and input); ``--mem-runs``
subprocesses per row, the median reported.

Checks: the relevance (and the plain gradient) with checkpointing is bitwise equal to without it; the
operation level's relevance against the registry's; the explained value of ``attribute`` against the
plain side's; relevance finite.
"""

import argparse
import collections
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import results_file  # benchmarks/results_file.py
import torch
from machine import proc_status_kb  # benchmarks/machine.py

try:
    import lrpcpp
except ImportError:  # run from a checkout without PYTHONPATH=python
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
    import lrpcpp
import transformers as tfm  # noqa: E402  (after the path fallback above)
from bench_models import LIB_AT_IMPORT, clean_rounds, machine_lines, progress  # noqa: E402  (benchmarks/bench_models.py)

SECTION = "## Long sequences, with and without activation checkpointing (CPU)"

FULL = dict(
    config=dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    seqs=(128, 512, 1024, 2048, 4096),
)
QUICK = dict(
    config=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1000,
        max_position_embeddings=64,
    ),
    seqs=(16, 32),
)
METHODS = ("plain", "registry", "operations")
# (key, method, checkpointing)
VARIANTS = [(m + ("-ckpt" if ckpt else ""), m, ckpt) for ckpt in (False, True) for m in METHODS]
LABELS = {"plain": "plain gradient", "registry": "attribute", "operations": 'attribute, `level="operations"`'}
MODEL_KWARGS = dict(logits_to_keep=1, use_cache=False)


# ----------------------------------------------------------------------------- model, input, calls
def build_model(config, checkpointing):
    """The LLaMA-style model with random weights (the same for both settings), parameters frozen; with
    ``checkpointing``, activation checkpointing enabled and each checkpointing layer's own training flag
    on (Hugging Face checkpoints in training mode only), everything else in eval mode."""
    torch.manual_seed(0)
    cfg = tfm.LlamaConfig(**config)
    cfg._attn_implementation = "sdpa"
    model = tfm.LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        for m in model.modules():
            if getattr(m, "gradient_checkpointing", False) is True:
                m.training = True
    return model


def token_ids(vocab, seq):
    return torch.randint(1000 if vocab > 2000 else 3, vocab, (1, seq), generator=torch.Generator().manual_seed(1))


def plain(model, ids):
    """The plain input gradient and the explained value."""
    with torch.no_grad():
        leaf = model.get_input_embeddings()(ids)
    leaf.requires_grad_()
    value = model(inputs_embeds=leaf, **MODEL_KWARGS).logits[:, -1].max(dim=-1).values
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    return grad, value.detach()


def call(method, model, ids):
    """One call of a variant: (relevance or gradient, explained value)."""
    if method == "plain":
        return plain(model, ids)
    result = lrpcpp.attribute(model, input_ids=ids, level=method, **MODEL_KWARGS)
    return result.relevance, result.output


# ----------------------------------------------------------------------------- time
def times_and_checks(models, ids, reps, warmup, max_foreign, max_rounds):
    """Median seconds per variant over interleaved rounds, of wall time and of this process's CPU time
    ({variant: (wall, cpu)}), the kept rounds' foreign CPU share, the rounds run, and the checks on the
    last results of each variant."""
    last = {}

    def timed(key, method, ckpt):
        t0, c0 = time.perf_counter(), time.process_time()
        last[key] = call(method, models[ckpt], ids)
        return time.perf_counter() - t0, time.process_time() - c0

    for _ in range(warmup):
        for v in VARIANTS:
            timed(*v)

    def run_round(r):
        return {v[0]: timed(*v) for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1])}

    kept, shares, n = clean_rounds(run_round, reps, max_foreign, max_rounds)
    medians = {k: tuple(statistics.median(r[k][i] for r in kept) for i in (0, 1)) for k, _, _ in VARIANTS}
    reg = last["registry"][0]
    scale = max(float(reg.abs().max()), 1e-30)
    check = dict(
        ckpt_equal={m: torch.equal(last[m][0], last[m + "-ckpt"][0]) for m in METHODS},
        operations_vs_registry=float((last["operations"][0] - reg).abs().max()) / scale,
        output_diff=max(float((last[k][1] - last["plain"][1]).abs().max()) for k, _, _ in VARIANTS),
        finite=all(bool(torch.isfinite(last[k][0]).all()) for k, _, _ in VARIANTS),
    )
    return medians, statistics.mean(shares), n, check


# ----------------------------------------------------------------------------- memory
def mem_child(seq, key, quick):
    sizes = QUICK if quick else FULL
    _, method, ckpt = next(v for v in VARIANTS if v[0] == key)
    model = build_model(sizes["config"], ckpt)
    ids = token_ids(sizes["config"]["vocab_size"], int(seq))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        how = "VmHWM"
    except OSError:
        how = "ru_maxrss"
    if how == "VmHWM":
        call(method, model, ids)  # warm-up: one-off buffers and tables
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    before = proc_status_kb("VmRSS")
    if how == "VmHWM":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    result = call(method, model, ids)
    peak = proc_status_kb("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del result
    print(json.dumps(dict(seq=int(seq), key=key, before_kb=before, peak_kb=peak, method=how, lib=LIB_AT_IMPORT)))


def measure_memory(seqs, runs, quick, threads):
    """{(seq, variant): median peak increase in MiB}, one fresh subprocess per measurement."""
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(lrpcpp.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    out = collections.defaultdict(list)
    for seq in seqs:
        for _ in range(runs):
            for key, _, _ in VARIANTS:
                cmd = [sys.executable, os.path.abspath(__file__), "--mem-child", str(seq), key]
                cmd += ["--threads", str(threads)] if threads else []
                proc = subprocess.run(cmd + (["--quick"] if quick else []), capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise RuntimeError(f"memory subprocess seq {seq} / {key} failed:\n{proc.stderr[-3000:]}")
                m = json.loads(proc.stdout.strip().splitlines()[-1])
                out[(seq, key)].append((m["peak_kb"] - m["before_kb"]) / 1024)
        progress(
            f"  memory seq {seq}: "
            + ", ".join(f"{k} +{statistics.median(out[(seq, k)]):.0f} MiB" for k, _, _ in VARIANTS)
        )
    return {k: statistics.median(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- report
def fmt_mib(m):
    return "—" if m is None else (f"{m:.0f}" if abs(m) >= 10 else f"{m:.1f}")


def fmt_ratio(a, b):
    return "—" if a is None or not b else f"{a / b:.2f}"


def yes_no(ok):
    return "yes" if ok else "**no**"


def render(res, mem, load, args, wall):
    c = (QUICK if args.quick else FULL)["config"]
    seqs = list(res)
    L = [SECTION, ""]
    L += [ln.replace("(torch's default, not set)", "(`--threads`)") if args.threads else ln for ln in machine_lines()]
    L.append(
        f"- Load: `uptime` load average (1, 5, 15 min) {', '.join(f'{x:.2f}' for x in load[0])} before the run and "
        f"{', '.join(f'{x:.2f}' for x in load[1])} after it; the share of CPU time other processes used in the "
        "kept timing rounds: " + ", ".join(f"seq {s} {100 * res[s]['foreign']:.0f}%" for s in seqs)
    )
    L += [
        "",
        f"Produced by `benchmarks/bench_long.py{' --quick' if args.quick else ''}` (see `benchmarks/README.md`). "
        f"`LlamaForCausalLM`, random weights, float32, `sdpa` attention: {c['num_hidden_layers']} layers, hidden "
        f"{c['hidden_size']}, MLP {c['intermediate_size']}, {c['num_attention_heads']} heads, vocabulary "
        f"{c['vocab_size']}; batch 1; the top next-token logit, with `logits_to_keep=1` and `use_cache=False` on "
        "every side; every parameter frozen. Plain gradient: the embeddings require grad, forward, "
        "`torch.autograd.grad` to them. attribute: `lrpcpp.attribute(model, input_ids=...)` (AttnLRP, gradient "
        "mode), at the registry level and at the operation level. Checkpointing: `activation_checkpointing_enable()` "
        "(`gradient_checkpointing_enable()`), every decoder layer recomputed in the backward pass; the plain side "
        "runs the layers with their own training flag on, as `attribute` does. "
        f"Time: the whole call, the median over {args.reps} round(s) after {args.warmup} warm-up call(s); a round "
        "calls the six variants once (order alternating), one process. Memory: the peak RSS increase of one call over "
        f"the RSS with the model and input loaded, a fresh subprocess per row after one warm-up call (median of "
        f"{args.mem_runs}).",
        "",
        "Time: the median wall time of a call, and the ratios of wall time and of the CPU time of the process "
        "(all its threads). With one thread (`--threads 1`) the CPU time is the work of the call and moves little "
        "with other processes' load; with more, threads that wait for each other spin, for longer on a loaded "
        "machine.",
        "",
        "| sequence | checkpointing | plain gradient (ms) | attribute (ms) | operation level (ms) | attribute / plain "
        "| operation level / plain | CPU time: attribute / plain | operation level / plain |",
        "|---:|:---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in seqs:
        for suffix in ("", "-ckpt"):
            (wp, cp), (wr, cr), (wo, co) = (res[s]["times"][m + suffix] for m in METHODS)
            L.append(
                f"| {s} | {'yes' if suffix else 'no'} | {wp * 1e3:.0f} | {wr * 1e3:.0f} | {wo * 1e3:.0f} | "
                f"{wr / wp:.2f} | {wo / wp:.2f} | {cr / cp:.2f} | {co / cp:.2f} |"
            )
    L += [
        "",
        "Memory: the peak RSS increase of a call over the RSS before it.",
        "",
        "| sequence | checkpointing | plain gradient (MiB) | attribute (MiB) | operation level (MiB) | attribute / "
        "plain | operation level / plain |",
        "|---:|:---:|---:|---:|---:|---:|---:|",
    ]
    for s in seqs:
        for suffix in ("", "-ckpt"):
            mp, mr, mo = (mem.get((s, m + suffix)) for m in METHODS)
            L.append(
                f"| {s} | {'yes' if suffix else 'no'} | {fmt_mib(mp)} | {fmt_mib(mr)} | {fmt_mib(mo)} | "
                f"{fmt_ratio(mr, mp)} | {fmt_ratio(mo, mp)} |"
            )
    L += [
        "",
        "Checkpointing's effect: with / without checkpointing.",
        "",
        "| sequence | wall time: plain gradient | attribute | operation level | CPU time: plain gradient | attribute "
        "| operation level | peak increase: plain gradient | attribute | operation level |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in seqs:
        t = res[s]["times"]
        L.append(
            f"| {s} | "
            + " | ".join(f"{t[m + '-ckpt'][i] / t[m][i]:.2f}" for i in (0, 1) for m in METHODS)
            + " | "
            + " | ".join(fmt_ratio(mem.get((s, m + "-ckpt")), mem.get((s, m))) for m in METHODS)
            + " |"
        )
    ck = [res[s]["check"] for s in seqs]
    L += [
        "",
        "Checks (every sequence): relevance with checkpointing bitwise equal to without: "
        + ", ".join(f"{LABELS[m]} {yes_no(all(c['ckpt_equal'][m] for c in ck))}" for m in METHODS if m != "plain")
        + "; plain gradient with checkpointing bitwise equal to without: "
        + yes_no(all(c["ckpt_equal"]["plain"] for c in ck))
        + "; operation level vs registry, max |difference| / max |relevance|: "
        f"{max(c['operations_vs_registry'] for c in ck):.1e}; explained value, max |attribute - plain|: "
        f"{max(c['output_diff'] for c in ck):.1e}; relevance finite: {yes_no(all(c['finite'] for c in ck))}.",
        "",
        f"Total run time: {wall:.0f} s.",
    ]
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny model, sequences 16 and 32, one round, memory of the first (a smoke test)",
    )
    ap.add_argument("--seqs", type=int, nargs="+", default=None, help="sequence lengths (default 128 ... 4096)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 3; 1 with --quick)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up calls per variant (default 1)")
    ap.add_argument(
        "--max-foreign",
        type=float,
        default=0.05,
        help="a round during which other processes used more than this share of the CPU counts as loaded",
    )
    ap.add_argument(
        "--max-rounds", type=int, default=None, help="rerun loaded rounds up to this many rounds (default --reps)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--mem-runs", type=int, default=1, help="memory subprocesses per row (default 1)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--write", action="store_true", help=f"also write the section '{SECTION}' of benchmarks/RESULTS.md")
    ap.add_argument("--mem-child", nargs=2, metavar=("SEQ", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_child:
        mem_child(*args.mem_child, args.quick)
        return
    sizes = QUICK if args.quick else FULL
    args.reps = args.reps or (1 if args.quick else 3)
    seqs = args.seqs or sizes["seqs"]
    too_long = [s for s in seqs if not 0 < s <= sizes["config"]["max_position_embeddings"]]
    if too_long:
        ap.error(
            f"--seqs: {too_long} outside 1 to {sizes['config']['max_position_embeddings']} (the model's positions)"
        )

    t_start, load0 = time.perf_counter(), os.getloadavg()
    models = {ckpt: build_model(sizes["config"], ckpt) for ckpt in (False, True)}
    res = {}
    for seq in seqs:
        progress(f"seq {seq} ...")
        ids = token_ids(sizes["config"]["vocab_size"], seq)
        times, foreign, rounds, check = times_and_checks(
            models, ids, args.reps, args.warmup, args.max_foreign, args.max_rounds or args.reps
        )
        res[seq] = dict(times=times, foreign=foreign, rounds=rounds, check=check)
        progress(
            "  "
            + ", ".join(f"{k} {w * 1e3:.0f} ms ({c * 1e3:.0f} CPU)" for k, (w, c) in times.items())
            + f"; other processes {100 * foreign:.0f}% of the CPU time"
        )
    del models
    gc.collect()
    # the smoke test measures the memory of the first sequence only
    mem = (
        {}
        if args.no_memory
        else measure_memory(seqs[:1] if args.quick else seqs, args.mem_runs, args.quick, args.threads)
    )
    text = render(res, mem, (load0, os.getloadavg()), args, time.perf_counter() - t_start)
    print(text, end="")
    if args.write:
        progress(f"wrote the section '{SECTION}' of {results_file.write_section(SECTION, text)}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""CPU benchmark of the fused attention op: the LLaMA-style explicit block of ``bench_cpu.py`` with
its attention as one ``lf.scaled_dot_product_attention`` (relevance, explicit LRP) against the plain
input gradient of the same block with ``F.scaled_dot_product_attention`` (causal), side by side in
one process, and the unfused explicit block (``lf.matmul -> lf.softmax -> lf.matmul``) beside them.
Time of the whole call (forward, then backward, on a fresh graph: median, repetitions interleaved;
ratios as medians of the same round's ratios, in wall and in CPU time) with its forward and backward
alongside, and the activations each forward keeps for its backward (``bench_cpu.saved_mib``: the
tensor memory it leaves allocated).

Run from the repository root::

    PYTHONPATH=python .venv/bin/python benchmarks/bench_attention.py               # seq 512, 2048, 8192
    PYTHONPATH=python .venv/bin/python benchmarks/bench_attention.py --write       # also its RESULTS.md section
    PYTHONPATH=python .venv/bin/python benchmarks/bench_attention.py --seqs 128 --reps 1 --quick
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cpu as bc  # noqa: E402  (the block, its weights and the timing helpers)
import lrpcpp.functional as lf  # noqa: E402
import results_file  # noqa: E402  (benchmarks/results_file.py)

SECTION = "## LLaMA-style block with the fused attention (CPU)"
NOTE = (
    "Reading: the fused op keeps q, k, v, its output and one float per row (the log-sum-exp), as torch's "
    "SDPA does; the unfused block keeps the [T, T] scores, weights and normalised relevances. Beyond the "
    "attention, an epsilon-rule linear layer keeps its input and its output (R_x = x * ((R / stab(z)) W)) "
    "where torch's linear layer with frozen weights keeps nothing. Its input is kept by its recipe where "
    "an element-wise lrpcpp op computed it (lrpcpp/_recipes.py): the normalised inputs of the projections "
    "(from the block's input and the residual stream, which the additions keep) and the gated product "
    "(from the gate and up outputs, which their layers keep) are computed again in the backward pass, "
    "bitwise the same, once per block for q, k and v and once for gate and up. What the fused block keeps "
    "beyond the plain block: q and k before RoPE, and the o and down outputs (also the residual add2's "
    "operands; the merged heads are a view of the attention's output, which is laid out [T, H, E] in "
    "memory as torch's). mul2 keeps nothing (the uniform rule reads no values), add2 only its operands. "
    "The time beyond the plain block is the attention's relevance (a second score product and the "
    "element-wise rule per score, over tiles of 64 queries (128 where a head's keys and values take more "
    "than 2 MiB, as at 8192 here) x 512 keys, the key tiles outer), the recomputed inputs and the rest of "
    "the block's rules. The row 'every layer input kept' is the fused block with the recipes turned off "
    "(any saved-tensor hooks do that): what the recipes save in memory and cost in time, side by side. "
    "Saved activations: the tensor memory the forward leaves allocated, its output excluded (allocations "
    "minus frees, torch.profiler)."
)


def attention_block(x, p, attend, linear, rms, add, mul, silu):
    h = rms(x, p["ln1"])
    q = bc.rope(bc.heads(linear(h, p["q"])), p)
    k = bc.rope(bc.heads(linear(h, p["k"])), p)
    v = bc.heads(linear(h, p["v"]))
    x = add(x, linear(bc.merge(attend(q, k, v)), p["o"]))
    h = rms(x, p["ln2"])
    return add(x, linear(mul(silu(linear(h, p["gate"])), linear(h, p["up"])), p["down"]))


def block_fused(x, p):
    return attention_block(
        x,
        p,
        lambda q, k, v: lf.scaled_dot_product_attention(q, k, v, is_causal=True),
        lf.linear_epsilon,
        lambda t, w: lf.rms_norm_identity(t, [bc.H], w, bc.RMS_EPS),
        lf.add2,
        lf.mul2,
        lf.silu,
    )


def block_fused_kept(x, p):
    """The fused block with every layer input kept itself: any saved-tensor hooks turn the recipes off."""
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        return block_fused(x, p)


def block_sdpa(x, p):
    return attention_block(
        x,
        p,
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        F.linear,
        bc.rms_formula,
        torch.add,
        torch.mul,
        F.silu,
    )


VARIANTS = {
    "torch block, F.scaled_dot_product_attention (input gradient)": block_sdpa,
    "lrpcpp block, fused lf.scaled_dot_product_attention (relevance)": block_fused,
    "the same, every layer input kept (no recipes)": block_fused_kept,
    "lrpcpp block, lf.matmul -> lf.softmax -> lf.matmul (relevance)": bc.block_lf,
}


def timed_calls(fns, x, seed, reps):
    """Per callable and round: the forward, backward and whole-call wall seconds and the whole call's
    process CPU seconds (all threads) of one call on a fresh graph and a fresh leaf (forward, then the
    backward with the seed), the callables interleaved, order alternating, after one warm-up round: what
    a user's call costs. Returns per callable four lists, one entry per round."""
    times = [([], [], [], []) for _ in fns]
    order = list(range(len(fns)))
    for r in range(reps + 1):
        for i in order if r % 2 == 0 else order[::-1]:
            leaf = x.detach().clone().requires_grad_(True)
            c0, t0 = time.process_time(), time.perf_counter()
            y = fns[i](leaf)
            t1 = time.perf_counter()
            torch.autograd.grad(y, leaf, seed)
            t2, c2 = time.perf_counter(), time.process_time()
            del y
            if r:
                for out, t in zip(times[i], (t1 - t0, t2 - t1, t2 - t0, c2 - c0)):
                    out.append(t)
    return times


def paired_ratio(times, base):
    """The median over the rounds of a variant's time over the plain block's in the same round (the
    calls of one round run back to back, so a machine that is slower for a while slows both)."""
    return statistics.median(t / b for t, b in zip(times, base))


def measure(seq, batch, reps, unfused_max_seq):
    bc.B, bc.S = batch, seq
    p, x = bc.block_params()
    with torch.no_grad():
        seed = block_sdpa(x, p)
        err = (block_fused(x, p) - seed).abs().max().item() / seed.abs().max().item()
    variants = dict(VARIANTS)
    if seq > unfused_max_seq:  # its saved [T, T] scores, weights and relevances would not fit in memory
        variants = {name: fn for name, fn in variants.items() if fn is not bc.block_lf}
    fns = [lambda t, fn=fn: fn(t, p) for fn in variants.values()]
    saved = [bc.saved_mib(fn, [x]) for fn in fns]
    times = timed_calls(fns, x, seed, reps)
    base, base_m = times[0], saved[0]
    lines = [
        f"### batch {batch}, sequence {seq}",
        "",
        f"Forward check: max |fused block - torch block| / max |y| = {err:.1e}.",
        "",
        "| variant | forward + backward (ms) | time / plain | CPU time / plain | forward (ms) | forward / plain "
        "| backward (ms) | backward / plain | saved activations (MiB) | memory / plain |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (f, b, t, c), m in zip(variants, times, saved):
        med = statistics.median
        lines.append(
            f"| {name} | {med(t) * 1e3:.1f} | {paired_ratio(t, base[2]):.2f} | {paired_ratio(c, base[3]):.2f} "
            f"| {med(f) * 1e3:.1f} | {paired_ratio(f, base[0]):.2f} | {med(b) * 1e3:.1f} "
            f"| {paired_ratio(b, base[1]):.2f} | {m:.0f} | {m / base_m:.2f} |"
        )
    if len(variants) < len(VARIANTS):
        lines += [
            "",
            f"(The unfused block is not run above sequence {unfused_max_seq}: it saves [T, T] tensors per head.)",
        ]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--unfused-max-seq", type=int, default=2048, help="longest sequence of the unfused block")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="hidden 256, 4 heads (a smoke test)")
    parser.add_argument("--write", action="store_true", help=f"also write the section '{SECTION}' of RESULTS.md")
    parser.add_argument("--one-length", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        bc.H, bc.NH, bc.INTER = 256, 4, 512
    if args.one_length:  # a child of the run below: the table of one sequence length, as JSON lines
        print(json.dumps(measure(args.seqs[0], args.batch, args.reps, args.unfused_max_seq)))
        return
    lines = [SECTION, ""] + bc.machine_lines(args.threads)
    if hasattr(os, "getloadavg"):  # a shared machine: the load the times were taken under
        lines.append(f"- Load: 1-minute load average {os.getloadavg()[0]:.1f} at the start")
    lines += [
        "",
        f"Hidden {bc.H}, {bc.NH} heads x {bc.HD}, MLP {bc.INTER}, causal; float32; {args.reps} rounds after "
        "a warm-up round, each round one call per variant (order alternating), each call a fresh graph: the "
        "forward, then the backward from the torch block's output as the seed; the forward and the "
        "backward of the same calls beside the whole. Times: medians over the rounds. Ratios: the median "
        "over the rounds of the variant's time over the torch block's in the same round (wall time; 'CPU "
        "time': the process's CPU time over all threads, which another process on the machine does not "
        "add to).",
        "",
    ]
    for seq in args.seqs:
        # each length in a fresh process: the unfused block's [T, T] tensors at 2048 leave a heap that
        # the next length's graphs would be added to (a 22 GiB peak RSS at 8192 in one process)
        argv = [sys.argv[0], "--one-length", "--seqs", str(seq), "--batch", str(args.batch), "--reps", str(args.reps)]
        argv += ["--threads", str(args.threads), "--unfused-max-seq", str(args.unfused_max_seq)]
        argv += ["--quick"] if args.quick else []
        child = subprocess.run([sys.executable] + argv, capture_output=True, text=True, check=True)
        lines += json.loads(child.stdout.strip().splitlines()[-1]) + [""]
    lines += [NOTE]
    text = "\n".join(lines)
    print(text)
    if args.write:
        results_file.write_section(SECTION, text)


if __name__ == "__main__":
    main()

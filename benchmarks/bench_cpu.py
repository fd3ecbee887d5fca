#!/usr/bin/env python
"""CPU benchmark: lrpcpp relevance passes against torch's plain input gradients.

Run from the repository root (see benchmarks/README.md)::

    PYTHONPATH=python .venv/bin/python benchmarks/bench_cpu.py           # markdown to stdout
    PYTHONPATH=python .venv/bin/python benchmarks/bench_cpu.py --write   # also benchmarks/RESULTS.md

What is measured
----------------
1. Single operators at transformer-activation sizes. For each op the lrpcpp
   version (explicit LRP: its backward carries relevance) and its torch
   equivalent (its backward carries the gradient) get the same inputs and the
   same output seed. Inputs require grad, weights do not, so both sides run an
   input-only backward.
2. One LLaMA-style decoder block written with lrpcpp ops and the same block
   written with plain torch ops (same weights, same input): relevance pass vs
   input gradient, the activations each forward saves for its backward, and
   the peak memory of one full forward + backward of each.

Timing method: the forward graph is built once, then only
``torch.autograd.grad(y, inputs, seed, retain_graph=True)`` is timed, repeatedly.
Plain and relevance repetitions are interleaved (alternating which goes first)
so that a change in machine load hits both alike; the median is reported.
The script also reports how much CPU other processes used while it ran: on a
small machine a concurrent compile inflates every multi-threaded op by a
scheduler time slice, so rerun when that share is high.

Memory method: each variant's forward + backward runs in a fresh Python
subprocess. After the weights and input are built and one no-grad forward has
warmed the kernels, the subprocess returns freed heap pages to the system
(``malloc_trim(0)``), resets its peak-RSS counter (``echo 5 >
/proc/self/clear_refs``), runs forward + backward once and reads ``VmHWM`` from
``/proc/self/status``: the peak resident set during forward + backward. Where
clear_refs is not available it falls back to ``ru_maxrss``. Three subprocesses
per variant; the one with the median increase is reported. The saved
activations are counted exactly, in this process: the tensor memory the
forward leaves allocated, its output excluded (allocations minus frees, from
torch.profiler; saved-tensor hooks would turn off what lrpcpp.functional keeps
by its recipe).

After the timings (so that the profiler cannot disturb them), every op whose
ratio exceeds the element-wise goal is profiled with torch.profiler and timed
again on one thread, and the ``stab_div`` primitive is timed on its own.
"""

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

import results_file  # benchmarks/results_file.py
import torch
import torch.nn.functional as F
from machine import cpu_model, proc_status_kb  # benchmarks/machine.py

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
try:
    import lrpcpp  # noqa: F401
except ImportError:  # run from a checkout without PYTHONPATH=python
    sys.path.insert(0, os.path.join(_ROOT, "python"))
    import lrpcpp  # noqa: F401
import lrpcpp.functional as lf  # noqa: E402  (after the path fallback above)

# transformer sizes
B, S, H = 2, 512, 1024
NH, HD = 16, 64
INTER = 2816
FFN = 4096  # out_features of the single linear_epsilon benchmark
RMS_EPS = 1e-6

ELEMENTWISE_GOAL = 1.2
BLOCK_GOAL = 1.3
NOISY_SHARE = 0.05  # warn when other processes used more than this share of the CPU time
SERIAL_SPEEDUP = 1.3  # a relevance kernel that gains less than this from more threads is called serial


# ----------------------------------------------------------------------------- helpers
def machine_lines(threads):
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        cap = "unknown"
    version = getattr(sys.modules.get("lrpcpp._build_info"), "VERSION", "?")
    return (
        [
            f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores, ATen CPU capability {cap}",
            f"- Threads: torch.set_num_threads({threads})",
            f"- torch {torch.__version__}, lrpcpp {version}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}",
        ]
        + build_lines()
        + [
            f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        ]
    )


def build_lines():
    """Which build of the library was measured: the compiled library's date and the checkout's commit."""
    lines = []
    pkg = os.path.dirname(os.path.abspath(lrpcpp.__file__))
    libs = [f for f in os.listdir(pkg) if f.startswith("_C") and f.endswith((".so", ".pyd"))]
    built = ""
    if libs:
        mtime = os.path.getmtime(os.path.join(pkg, libs[0]))
        built = f", compiled library dated {datetime.datetime.fromtimestamp(mtime).astimezone():%Y-%m-%d %H:%M %Z}"
    try:

        def git(*a):
            return subprocess.run(["git", "-C", _ROOT, *a], capture_output=True, text=True, check=True).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--", "csrc", "setup.py"))
        lines.append(f"- Build: commit {commit}{' with local changes under csrc/ or setup.py' if dirty else ''}{built}")
    except (OSError, subprocess.CalledProcessError):
        if built:
            lines.append(f"- Build:{built[1:]}")
    return lines


class CpuMonitor:
    """Share of the machine's CPU time that other processes used since construction (from /proc/stat)."""

    def __init__(self):
        self.start = self._snap()

    @staticmethod
    def _snap():
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(vals) - vals[3] - vals[4]) / hz  # everything but idle and iowait, steal included
        t = os.times()
        return busy, t.user + t.system + t.children_user + t.children_system, time.monotonic()

    def foreign_share(self):
        end = self._snap()
        if self.start is None or end is None:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self.start))
        return max(0.0, busy - own) / max(1e-9, wall * (os.cpu_count() or 1))


def interleaved_times(fns, reps, warmup):
    """Median seconds of each callable in ``fns``, repetitions interleaved, order alternating."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    order = list(range(len(fns)))
    for r in range(reps):
        for i in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def backward_fn(fn, inputs, seed):
    """Builds ``fn``'s forward graph once on fresh leaves; returns (output, timed-backward callable)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*leaves)

    def run():
        return torch.autograd.grad(y, leaves, seed, retain_graph=True)

    return y, run


def saved_mib(fn, inputs):
    """MiB of tensor memory that ``fn``'s forward leaves allocated, its output excluded: what it keeps
    for the backward pass. The allocations minus the frees during the forward, from torch.profiler; no
    saved-tensor hooks, which would turn off what lrpcpp.functional keeps by its recipe
    (lrpcpp/_recipes.py)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(*leaves)
    total = 0
    nodes = list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        if node.tag == _EventType.Allocation:
            total += node.extra_fields.alloc_size  # negative for a free
        nodes += node.children
    return (total - out.untyped_storage().nbytes()) / 2**20


def _short(name):
    return re.sub(r"torch::autograd::CppNode<.*::(\w+)>", r"CppNode<\1>", name)


def profile_top(run, calls=3, top=5):
    """Top ops by self CPU time of ``run``: [(name, ms per call, % of total, calls per run)]."""
    from torch.profiler import ProfilerActivity, profile

    run()
    sys.stderr.flush()
    saved = os.dup(2)  # the profiler logs its start/stop on fd 2; keep the progress output readable
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                run()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    events = [e for e in prof.key_averages() if not e.key.startswith("autograd::engine::evaluate_function")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = []
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        pct = 100.0 * e.self_cpu_time_total / total
        if rows and pct < 1.0:
            break
        rows.append((_short(e.key), e.self_cpu_time_total / 1e3 / calls, pct, max(1, e.count // calls)))
    return rows


def fmt_profile(rows):
    return ", ".join(f"`{k}` {ms:.2f} ms ({pct:.0f}%{'' if n == 1 else f', {n} calls'})" for k, ms, pct, n in rows)


def progress(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- single ops
def make_cases():
    """[(name, shape text, inputs requiring grad, lrpcpp fn, torch fn, goal or None, note)]."""
    g = torch.Generator().manual_seed(0)

    def rn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g).mul_(scale)

    x = rn(B, S, H)
    w_norm = 1.0 + rn(H, scale=0.1)
    b_norm = rn(H, scale=0.1)
    scores = rn(B, NH, S, S)
    a, b = rn(B, S, H), rn(B, S, H)
    w_lin = rn(FFN, H, scale=1.0 / math.sqrt(H))
    qa, kb = rn(B, NH, S, HD), rn(B, NH, HD, S)

    act = f"[{B},{S},{H}]"
    E = ELEMENTWISE_GOAL
    return [
        (
            "softmax (dim=-1)",
            f"[{B},{NH},{S},{S}]",
            [scores],
            lambda s: lf.softmax(s, -1),
            lambda s: torch.softmax(s, -1),
            E,
            "",
        ),
        (
            "layer_norm (weight, bias)",
            act,
            [x],
            lambda t: lf.layer_norm(t, [H], w_norm, b_norm),
            lambda t: F.layer_norm(t, [H], w_norm, b_norm),
            E,
            "",
        ),
        (
            "rms_norm_identity vs F.rms_norm",
            act,
            [x],
            lambda t: lf.rms_norm_identity(t, [H], w_norm, RMS_EPS),
            lambda t: F.rms_norm(t, [H], w_norm, RMS_EPS),
            E,
            "",
        ),
        (
            "rms_norm_identity vs LLaMA formula",
            act,
            [x],
            lambda t: lf.rms_norm_identity(t, [H], w_norm, RMS_EPS),
            lambda t: rms_formula(t, w_norm),
            E,
            "",
        ),
        ("silu", act, [x], lf.silu, F.silu, E, ""),
        ("gelu (erf)", act, [x], lf.gelu, F.gelu, E, ""),
        (
            "add2 vs a + b",
            act,
            [a, b],
            lf.add2,
            lambda p, q: p + q,
            E,
            "torch's add backward hands the seed on to both inputs without running a kernel, so any real "
            "relevance computation shows as a large ratio; compare the absolute time instead",
        ),
        ("mul2 vs a * b", act, [a, b], lf.mul2, lambda p, q: p * q, E, ""),
        (
            "mean (dim=-1)",
            act,
            [x],
            lambda t: lf.mean(t, [-1]),
            lambda t: t.mean(-1),
            E,
            "the relevance reads x as well as R (the row sums, then x * R / stab(sum) per element); the gradient "
            "only spreads R / n",
        ),
        (
            "linear_epsilon vs F.linear",
            f"{act} x [{FFN},{H}]",
            [x],
            lambda t: lf.linear_epsilon(t, w_lin),
            lambda t: F.linear(t, w_lin),
            None,
            "",
        ),
        ("matmul", f"[{B},{NH},{S},{HD}] @ [{B},{NH},{HD},{S}]", [qa, kb], lf.matmul, torch.matmul, None, ""),
    ]


def bench_ops(reps, warmup):
    results = []
    for name, shape, inputs, f_lf, f_torch, goal, note in make_cases():
        seed = f_torch(*inputs).detach()  # explain the output: seed = y, the same tensor on both sides
        y_lf, run_lf = backward_fn(f_lf, inputs, seed)
        y_pt, run_pt = backward_fn(f_torch, inputs, seed)
        fwd_err = (y_lf.detach() - y_pt.detach()).abs().max().item()
        rel = run_lf()
        finite = all(bool(torch.isfinite(r).all()) for r in rel)
        del rel
        t_pt, t_lf = interleaved_times([run_pt, run_lf], reps, warmup)
        ratio = t_lf / t_pt
        results.append(
            dict(
                name=name,
                shape=shape,
                plain_ms=t_pt * 1e3,
                rel_ms=t_lf * 1e3,
                ratio=ratio,
                goal=goal,
                met=None if goal is None else ratio <= goal,
                fwd_err=fwd_err,
                finite=finite,
                note=note,
            )
        )
        progress(
            f"  {name:36s} plain {t_pt * 1e3:8.2f} ms   relevance {t_lf * 1e3:8.2f} ms   ratio {ratio:6.2f}"
            f"   max|fwd diff| {fwd_err:.1e}"
        )
        del y_lf, y_pt, run_lf, run_pt
    return results


def diagnose_ops(results, threads, reps):
    """Profiles (and times on one thread) the ops whose ratio exceeds the element-wise goal."""
    slow = {r["name"] for r in results if r["ratio"] > ELEMENTWISE_GOAL}
    for name, _shape, inputs, f_lf, f_torch, _goal, _note in make_cases():
        if name not in slow:
            continue
        row = next(r for r in results if r["name"] == name)
        seed = f_torch(*inputs).detach()
        _, run_lf = backward_fn(f_lf, inputs, seed)
        _, run_pt = backward_fn(f_torch, inputs, seed)
        row["prof_rel"] = profile_top(run_lf)
        row["prof_plain"] = profile_top(run_pt)
        if threads > 1:
            torch.set_num_threads(1)
            t_pt1, t_lf1 = interleaved_times([run_pt, run_lf], reps, 1)
            torch.set_num_threads(threads)
            row["plain_1t_ms"], row["rel_1t_ms"] = t_pt1 * 1e3, t_lf1 * 1e3
        progress(f"  profiled {name}")
        del run_lf, run_pt


def diagnose_stab_div(threads, reps):
    """The epsilon rule's stab_div primitive on [B, S, FFN]: sign pattern and thread count."""
    g = torch.Generator().manual_seed(1)
    r = torch.randn(B, S, FFN, generator=g)
    z = torch.randn(B, S, FFN, generator=g)
    zpos = z.abs()
    sd = torch.ops.lrpcpp.stab_div
    out = {}
    t = interleaved_times(
        [lambda: sd(r, z, 1e-6, 1.0, None), lambda: sd(r, zpos, 1e-6, 1.0, None), lambda: torch.div(r, z)], reps, 2
    )
    out["random_ms"], out["positive_ms"], out["torch_div_ms"] = (v * 1e3 for v in t)
    if threads > 1:
        torch.set_num_threads(1)
        out["random_1t_ms"] = interleaved_times([lambda: sd(r, z, 1e-6, 1.0, None)], reps, 1)[0] * 1e3
        out["torch_div_1t_ms"] = interleaved_times([lambda: torch.div(r, z)], reps, 1)[0] * 1e3
        torch.set_num_threads(threads)
    return out


# ----------------------------------------------------------------------------- LLaMA-style block
def block_params(seed=0):
    g = torch.Generator().manual_seed(seed)

    def w(o, i):
        return torch.randn(o, i, generator=g).mul_(1.0 / math.sqrt(i))

    p = dict(
        ln1=1.0 + 0.1 * torch.randn(H, generator=g),
        ln2=1.0 + 0.1 * torch.randn(H, generator=g),
        q=w(H, H),
        k=w(H, H),
        v=w(H, H),
        o=w(H, H),
        gate=w(INTER, H),
        up=w(INTER, H),
        down=w(H, INTER),
    )
    pos = torch.arange(S, dtype=torch.float32)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD))
    ang = torch.outer(pos, inv_freq)
    ang = torch.cat([ang, ang], dim=-1)  # [S, HD]
    p["cos"], p["sin"] = ang.cos(), ang.sin()
    p["mask"] = torch.full((S, S), float("-inf")).triu(1)
    x = torch.randn(B, S, H, generator=g)
    return p, x


def rope(t, p):
    # rotary embedding with plain torch ops (linear in t), the same code in both blocks
    t1, t2 = t[..., : HD // 2], t[..., HD // 2 :]
    return t * p["cos"] + torch.cat([-t2, t1], dim=-1) * p["sin"]


def heads(t):
    return t.view(B, S, NH, HD).transpose(1, 2)


def merge(t):
    return t.transpose(1, 2).reshape(B, S, H)


def rms_formula(t, w):
    # LLaMA's RMSNorm: fp32 arithmetic, cast back, then the weight
    tf = t.float()
    return w * (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + RMS_EPS)).to(t.dtype)


SCALE_AS_MUL = False  # --scale-as-mul: lrpcpp block scales the scores with a plain `* scale`


def block_lf(x, p):
    h = lf.rms_norm_identity(x, [H], p["ln1"], RMS_EPS)
    q = rope(heads(lf.linear_epsilon(h, p["q"])), p)
    k = rope(heads(lf.linear_epsilon(h, p["k"])), p)
    v = heads(lf.linear_epsilon(h, p["v"]))
    if SCALE_AS_MUL:
        attn = lf.softmax(lf.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(HD)) + p["mask"], -1)
    else:
        # softmax(QK^T / sqrt(d)) with the 1/sqrt(d) as softmax's temperature, so the scaling is inside the
        # Deep Taylor rule; a plain `* scale` would pass the gradient, shrinking the relevance that reaches q and
        # k by sqrt(d)
        attn = lf.softmax(lf.matmul(q, k.transpose(-1, -2)) + p["mask"], -1, temperature=math.sqrt(HD))
    ctx = merge(lf.matmul(attn, v))
    x = lf.add2(x, lf.linear_epsilon(ctx, p["o"]))
    h = lf.rms_norm_identity(x, [H], p["ln2"], RMS_EPS)
    m = lf.mul2(lf.silu(lf.linear_epsilon(h, p["gate"])), lf.linear_epsilon(h, p["up"]))
    return lf.add2(x, lf.linear_epsilon(m, p["down"]))


def block_torch(x, p):
    h = rms_formula(x, p["ln1"])
    q = rope(heads(F.linear(h, p["q"])), p)
    k = rope(heads(F.linear(h, p["k"])), p)
    v = heads(F.linear(h, p["v"]))
    attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(HD)) + p["mask"], -1)
    ctx = merge(torch.matmul(attn, v))
    x = x + F.linear(ctx, p["o"])
    h = rms_formula(x, p["ln2"])
    m = F.silu(F.linear(h, p["gate"])) * F.linear(h, p["up"])
    return x + F.linear(m, p["down"])


BLOCKS = {"lrpcpp": block_lf, "torch": block_torch}


def mem_child(variant, threads):
    """Forward + backward of one block variant in this (fresh) process; prints one JSON line."""
    torch.set_num_threads(threads)
    p, x = block_params()
    x.requires_grad_(True)
    with torch.no_grad():  # one-off buffers of the kernels, without a graph
        BLOCKS[variant](x, p)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    before = proc_status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM"
    except OSError:
        method = "ru_maxrss"
    y = BLOCKS[variant](x, p)
    y.backward(y.detach())
    peak = proc_status_kb("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(variant=variant, before_kb=before, peak_kb=peak, method=method)))


def measure_memory(threads, runs=3):
    """Median (by peak increase) of ``runs`` fresh-subprocess measurements per variant, runs interleaved."""
    out = {v: [] for v in BLOCKS}
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(lrpcpp.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    for _ in range(runs):
        for variant in BLOCKS:
            cmd = [sys.executable, os.path.abspath(__file__), "--mem-child", variant, "--threads", str(threads)]
            if SCALE_AS_MUL:
                cmd.append("--scale-as-mul")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            out[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {v: sorted(ms, key=lambda m: m["peak_kb"] - m["before_kb"])[len(ms) // 2] for v, ms in out.items()}


def bench_block(reps, warmup):
    p, x = block_params()
    with torch.no_grad():
        y_pt0 = block_torch(x, p)
        y_lf0 = block_lf(x, p)
    fwd_err = (y_lf0 - y_pt0).abs().max().item()
    res = dict(
        fwd_err=fwd_err,
        fwd_rel=fwd_err / y_pt0.abs().max().item(),
        fwd_ok=torch.allclose(y_lf0, y_pt0, rtol=1e-4, atol=1e-4),
    )
    seed = y_pt0.clone()  # explain the block's output
    del y_lf0
    res["saved_lf_mib"] = saved_mib(lambda t: block_lf(t, p), [x])
    res["saved_pt_mib"] = saved_mib(lambda t: block_torch(t, p), [x])

    y_lf, run_lf = backward_fn(lambda t: block_lf(t, p), [x], seed)
    y_pt, run_pt = backward_fn(lambda t: block_torch(t, p), [x], seed)
    (r_x,) = run_lf()
    res["finite"] = bool(torch.isfinite(r_x).all())
    res["rel_in"], res["rel_out"] = r_x.double().sum().item(), seed.double().sum().item()
    del r_x

    xg = x.clone().requires_grad_(True)
    t_fwd_pt, t_fwd_lf = interleaved_times([lambda: block_torch(xg, p), lambda: block_lf(xg, p)], 3, 1)
    res["fwd_pt_ms"], res["fwd_lf_ms"] = t_fwd_pt * 1e3, t_fwd_lf * 1e3
    t_pt, t_lf = interleaved_times([run_pt, run_lf], reps, warmup)
    res.update(plain_ms=t_pt * 1e3, rel_ms=t_lf * 1e3, ratio=t_lf / t_pt)
    res["_runs"] = (run_lf, run_pt)
    return res


def diagnose_block(block):
    run_lf, run_pt = block.pop("_runs")
    block["prof_rel"] = profile_top(run_lf, calls=2, top=8)
    block["prof_plain"] = profile_top(run_pt, calls=2, top=8)


# ----------------------------------------------------------------------------- report
def yes_no(met):
    return "—" if met is None else ("yes" if met else "**no**")


def render(ops, block, mem, sd, threads, reps, block_reps, foreign):
    L = ["# lrpcpp CPU benchmark: relevance pass vs plain input gradient", ""]
    L += machine_lines(threads)
    share = "unknown" if foreign is None else f"{100 * foreign:.0f}%"
    L.append(
        f"- CPU time used by other processes during the timings: {share}"
        + (
            " — **the machine was busy; these numbers are noisy, rerun on an idle machine**"
            if foreign is not None and foreign > NOISY_SHARE
            else ""
        )
    )
    L += [
        "",
        "Produced by `benchmarks/bench_cpu.py --write` (see `benchmarks/README.md`); float32 throughout.",
        "",
        "Timing: each forward graph is built once, then only `torch.autograd.grad(y, inputs, seed, "
        f"retain_graph=True)` is timed; median of {reps} repetitions ({block_reps} for the block), plain and "
        "relevance repetitions interleaved. The seed is the output itself (`seed = y`), the same tensor on both "
        "sides. Inputs require grad, weights do not, so the plain side is an input-only gradient. "
        "'relevance' is the lrpcpp op's backward (explicit LRP), 'plain' the torch op's gradient.",
        "",
        "## Single operators",
        "",
        f"Goal for the element-wise and row-wise ops: relevance / plain <= {ELEMENTWISE_GOAL}. "
        "No goal is set for the GEMM-bound ops (linear_epsilon, matmul).",
        "",
        "| op | shape | plain backward (ms) | relevance (ms) | relevance / plain | goal met | max abs fwd diff |",
        "|---|---|---:|---:|---:|:---:|---:|",
    ]
    for r in ops:
        goal = "" if r["goal"] is None else f" (<= {r['goal']})"
        L.append(
            f"| {r['name']} | {r['shape']} | {r['plain_ms']:.2f} | {r['rel_ms']:.2f} | {r['ratio']:.2f} | "
            f"{yes_no(r['met'])}{goal} | {r['fwd_err']:.1e} |"
        )
    bad = [r["name"] for r in ops if not r["finite"]]
    L += ["", "Relevance finite for every op: " + ("yes." if not bad else "**no**: " + ", ".join(bad))]
    L += [f"- {r['name']}: {r['note']}." for r in ops if r["note"]]
    L += [
        "- The identity-rule ops (rms_norm_identity, silu, gelu) return a copy of the incoming relevance, so "
        "their relevance pass costs one copy, less than the torch gradients here.",
    ]

    L += [
        "",
        f"## LLaMA-style block (batch {B}, sequence {S}, hidden {H}, {NH} heads x {HD}, MLP {INTER}, SiLU gating)",
        "",
        "lrpcpp block: rms_norm_identity -> q/k/v linear_epsilon -> RoPE (plain torch ops) -> "
        + (
            "lf.matmul(q, k^T) * scale + causal -inf mask -> lf.softmax"
            if SCALE_AS_MUL
            else "lf.matmul(q, k^T) + causal -inf mask -> lf.softmax(temperature=sqrt(64)) (the 1/sqrt(d) scaling "
            "as softmax's temperature, inside the Deep Taylor rule: a plain `* scale` would pass the gradient and "
            "shrink the relevance reaching q and k by sqrt(d); `--scale-as-mul` times that variant)"
        )
        + " -> lf.matmul(attn, v) -> o linear_epsilon -> lf.add2 residual -> rms_norm_identity -> gate/up "
        "linear_epsilon -> lf.mul2(lf.silu(gate), up) -> down linear_epsilon -> lf.add2 residual. "
        "torch block: the same with F.linear, torch.matmul, `* scale`, torch.softmax, `+`, `*`, F.silu and the "
        "LLaMA RMSNorm formula (fp32 `x * rsqrt(mean(x^2) + eps)`, cast back, times the weight). Same weights, "
        "same input; the seed is the block's output.",
        "",
        f"Forward check: max |lrpcpp block - torch block| = {block['fwd_err']:.2e} "
        f"({block['fwd_rel']:.1e} of max |y|); torch.allclose(rtol=1e-4, atol=1e-4): "
        f"{'pass' if block['fwd_ok'] else '**FAIL**'}. Relevance of the input finite: "
        f"{'yes' if block['finite'] else '**no**'}; sum R_x = {block['rel_in']:.4g} for sum R_y = "
        f"{block['rel_out']:.4g} (not conserved exactly: the epsilon and softmax rules absorb some relevance, "
        "and RoPE passes the gradient).",
        "",
        f"Goal: relevance / plain <= {BLOCK_GOAL}.",
        "",
        "| variant | backward (ms) | relevance / plain | goal met | forward (ms) | saved activations (MiB) | "
        "RSS before fwd (MiB) | peak RSS fwd+bwd (MiB) | peak - before (MiB) |",
        "|---|---:|---:|:---:|---:|---:|---:|---:|---:|",
    ]
    for label, key, ms, fwd, saved in (
        ("torch (input gradient)", "torch", block["plain_ms"], block["fwd_pt_ms"], block["saved_pt_mib"]),
        ("lrpcpp (relevance)", "lrpcpp", block["rel_ms"], block["fwd_lf_ms"], block["saved_lf_mib"]),
    ):
        m = mem[key]
        is_rel = key == "lrpcpp"
        ratio = f"{block['ratio']:.2f}" if is_rel else "1.00"
        met = f"{yes_no(block['ratio'] <= BLOCK_GOAL)} (<= {BLOCK_GOAL})" if is_rel else ""
        L.append(
            f"| {label} | {ms:.1f} | {ratio} | {met} | {fwd:.1f} | {saved:.0f} | {m['before_kb'] / 1024:.0f} | "
            f"{m['peak_kb'] / 1024:.0f} | {(m['peak_kb'] - m['before_kb']) / 1024:.0f} |"
        )
    inc = {k: v["peak_kb"] - v["before_kb"] for k, v in mem.items()}
    L += [
        "",
        "Forward: median of 3 graph-building forwards. Saved activations: the tensor memory the forward leaves "
        "allocated for the backward, its output excluded (allocations minus frees, torch.profiler). "
        f"Peak RSS: one forward + backward in a fresh subprocess (median of 3 subprocesses per variant), "
        f"peak = {mem['lrpcpp']['method']} "
        "(see the script's docstring); 'peak - before' is what forward + backward added on top of the weights "
        f"and input: lrpcpp / torch = {inc['lrpcpp'] / max(1, inc['torch']):.2f}.",
    ]

    # ------------------------------------------------------------------ where the time goes
    L += ["", "## Where the time goes", ""]
    slow = [r for r in ops if "prof_rel" in r]
    if slow:
        L += [
            f"Ops whose ratio exceeds {ELEMENTWISE_GOAL}, profiled with torch.profiler (top ops by self CPU time "
            "per backward call), and timed again on one thread (speed-up = 1-thread time / "
            f"{threads}-thread time):",
            "",
        ]
        for r in slow:
            scaling = ""
            if "rel_1t_ms" in r:
                scaling = (
                    f" Speed-up from {threads} threads: relevance {r['rel_1t_ms'] / r['rel_ms']:.2f}x, "
                    f"plain {r['plain_1t_ms'] / r['plain_ms']:.2f}x."
                )
            L.append(
                f"- **{r['name']}** ({r['ratio']:.2f}x). Relevance: {fmt_profile(r['prof_rel'])}. "
                f"Plain: {fmt_profile(r['prof_plain'])}.{scaling}"
            )
    if "prof_rel" in block:
        L += [
            "",
            "Block backward (top ops by self CPU time per call):",
            "",
            f"- relevance: {fmt_profile(block['prof_rel'])}",
            f"- plain: {fmt_profile(block['prof_plain'])}",
        ]
    if sd:
        L += [
            "",
            f"`lrpcpp::stab_div` (R / stab(z), the first step of every epsilon-rule relevance) on "
            f"[{B},{S},{FFN}]: {sd['random_ms']:.2f} ms with z of random sign, {sd['positive_ms']:.2f} ms with "
            f"z >= 0; torch's `r / z`: {sd['torch_div_ms']:.2f} ms."
            + (
                f" On one thread: stab_div {sd['random_1t_ms']:.2f} ms, `r / z` {sd['torch_div_1t_ms']:.2f} ms."
                if "random_1t_ms" in sd
                else ""
            ),
        ]
    L += [
        "",
        "Reading (the measured numbers above; the causes named are those of the CPU kernels in the measured "
        "build's sources):",
        "",
    ]
    L += findings(ops, block, sd, threads)
    return "\n".join(L) + "\n"


def findings(ops, block, sd, threads):
    """Plain-language notes derived from the measured numbers above (each only when the numbers show it)."""
    out = []
    by = {r["name"]: r for r in ops}

    def speedup(name):
        r = by.get(name, {})
        return r["rel_1t_ms"] / r["rel_ms"] if "rel_1t_ms" in r else None

    serial = [
        n
        for n in ("softmax (dim=-1)", "layer_norm (weight, bias)")
        if speedup(n) is not None and speedup(n) < SERIAL_SPEEDUP
    ]
    if sd and "random_1t_ms" in sd and sd["random_1t_ms"] / sd["random_ms"] < SERIAL_SPEEDUP:
        serial.append("stab_div")
    if threads > 1 and serial:
        out.append(
            f"- No speed-up from {threads} threads for the hand-written CPU loops ({', '.join(serial)}): they use "
            "`at::parallel_for`, whose OpenMP body is only compiled in when the extension itself is built with "
            "`-fopenmp` (ATen/Parallel-inl.h falls back to one serial call without `INTRA_OP_PARALLEL`). The "
            "TensorIterator-based kernels (add2, mean) do run in parallel, since that loop lives in libtorch."
        )
    if sd and sd["random_ms"] > 2.0 * sd["positive_ms"]:
        out.append(
            f"- stab_div costs {sd['random_ms'] / sd['positive_ms']:.1f}x more when the sign of z is random (as for "
            "real pre-activations) than when it is constant: the sign-aware stabiliser `z >= 0 ? z + eps : z - eps` "
            "is a data-dependent branch in a scalar loop, and mispredicts about every other element. A branch-free "
            "form (e.g. `z + copysign(eps, z)` with sign(0) handled, or an `at::vec` blend) would also let the "
            "division vectorise, as torch's `r / z` does."
        )
    for name, what in (
        ("linear_epsilon vs F.linear", "the GEMM is shared with the gradient"),
        ("matmul", "both batched GEMMs are shared with the gradient"),
    ):
        r = by.get(name)
        if r and "prof_rel" in r:
            sdrow = [x for x in r["prof_rel"] if x[0] == "lrpcpp::stab_div"]
            if sdrow:
                out.append(
                    f"- {name}: {what}; the extra time is mostly `lrpcpp::stab_div` "
                    f"({sdrow[0][1]:.1f} ms, {sdrow[0][2]:.0f}% of the relevance backward) over the "
                    "op's output."
                )
    r = by.get("softmax (dim=-1)")
    if r and "prof_rel" in r:
        out.append(
            "- softmax: the rule R_x = x' (R - s sum R) reads three tensors (x, R, s) and writes one, where "
            "torch's `_softmax_backward_data` reads two (grad, s): 4/3 of the memory traffic, a floor of "
            "about 1.33x for this memory-bound size. Both passes per row are vectorised (`omp simd`)."
        )
    r = by.get("layer_norm (weight, bias)")
    if r and "prof_rel" in r:
        out.append(
            "- layer_norm: `lrpcpp::layer_norm_relevance` recomputes each row's mean and variance from x "
            "(the forward op keeps no statistics) and makes four vectorised passes per row; torch's "
            "`native_layer_norm_backward` reuses the saved mean and rstd."
        )
    r = by.get("mean (dim=-1)")
    if r and "prof_rel" in r and r["ratio"] > ELEMENTWISE_GOAL:
        out.append(
            "- mean: the relevance is the row sums of x, R / stab(sum) on the reduced shape, and one "
            "broadcast product with x; the gradient only spreads R / n, without reading x."
        )
    r = by.get("add2 vs a + b")
    if r and "prof_rel" in r:
        out.append(
            f"- add2: {r['rel_ms']:.2f} ms is one vectorised pass that reads R, a and b and writes two "
            "relevances; the gradient of `a + b` costs nothing, so no ratio goal can be met here."
        )
    if block.get("prof_rel"):
        top = block["prof_rel"][0]
        out.append(
            f"- Block: the largest self time in the relevance backward is `{top[0]}` "
            f"({top[1]:.1f} ms per call, {top[2]:.0f}%)."
        )
    return out or ["- Every op meets its goal."]


def main():
    global SCALE_AS_MUL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="also write benchmarks/RESULTS.md")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions per op (default 15)")
    ap.add_argument("--block-reps", type=int, default=7, help="timed repetitions of the block (default 7)")
    ap.add_argument("--no-diagnose", action="store_true", help="skip the profiler and one-thread diagnostics")
    ap.add_argument(
        "--scale-as-mul",
        action="store_true",
        help="lrpcpp block: scale the scores with a plain `* scale` instead of softmax's temperature",
    )
    ap.add_argument("--mem-child", choices=sorted(BLOCKS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    SCALE_AS_MUL = args.scale_as_mul
    if args.mem_child:
        mem_child(args.mem_child, args.threads)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    monitor = CpuMonitor()
    progress("single operators ...")
    ops = bench_ops(args.reps, warmup=2)
    progress("LLaMA-style block ...")
    block = bench_block(args.block_reps, warmup=1)
    foreign = monitor.foreign_share()
    progress(
        f"  block: plain {block['plain_ms']:.1f} ms, relevance {block['rel_ms']:.1f} ms, "
        f"ratio {block['ratio']:.2f}; forward check max|diff| {block['fwd_err']:.2e} "
        f"({'pass' if block['fwd_ok'] else 'FAIL'})"
    )
    if foreign is not None:
        progress(f"  other processes used {100 * foreign:.0f}% of the CPU time during the timings")
    sd = None
    if not args.no_diagnose:
        progress("diagnostics (profiler, one thread) ...")
        diagnose_ops(ops, args.threads, reps=5)
        diagnose_block(block)
        sd = diagnose_stab_div(args.threads, reps=7)
    block.pop("_runs", None)
    gc.collect()
    progress("peak memory (subprocesses) ...")
    mem = measure_memory(args.threads)
    text = render(ops, block, mem, sd, args.threads, args.reps, args.block_reps, foreign)
    text += f"\nTotal run time: {time.perf_counter() - t_start:.0f} s.\n"
    print(text)
    if args.write:  # its own sections; the other benchmarks' stay
        progress(f"wrote {results_file.write_sections(text)}")


if __name__ == "__main__":
    main()

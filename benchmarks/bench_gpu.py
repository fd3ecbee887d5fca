"""GPU benchmark of lrpcpp's CUDA kernels (run by scripts/gpu_check.sh on a machine with an NVIDIA GPU).

1. Each element-wise or row-wise relevance kernel: bytes moved (reads + writes of its tensors) over time,
   against the device-to-device copy bandwidth measured in the same run. Goal: >= 70% of it, at sizes
   well past the L2 cache.
2. The LLaMA-style block of bench_cpu.py at batch 4, sequence 2048, hidden 2048 (16 heads x 128,
   MLP 5632), bf16: the relevance pass against the plain autograd gradient of the same block, same
   inputs and seed. Goal: ratio <= 1.15. Then the same block with its attention fused
   (bench_attention.py: lf.scaled_dot_product_attention against F.scaled_dot_product_attention).
   Goal: ratio <= 1.05.

Each kernel is timed over N back-to-back calls between two CUDA events (no synchronisation between
the calls, so Python and dispatch overlap the GPU work instead of landing inside the measurement);
the figure is the median over a few such batches. Prints a markdown table row by row; `--out FILE`
also appends each row to FILE as soon as it is measured (a run that is stopped keeps its rows).
`--dry-run` runs every row on the CPU at a tiny size (wall-clock timing): a check of the script.
"""

import argparse
import os
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
import bench_attention  # noqa: E402  (the block with the fused attention)
import bench_cpu  # noqa: E402  (the block definitions; imports lrpcpp)

ops = torch.ops.lrpcpp


def cuda_time(fn, reps=20, batches=3, warmup=3):
    """Milliseconds per call of fn(): `reps` back-to-back calls between two CUDA events, the median
    over `batches` such batches."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[len(times) // 2]


def wall_time(fn, reps=3, batches=3, warmup=1):
    """cuda_time's counterpart on the CPU (the dry run): wall-clock milliseconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


def kernels(n_elems, row, device="cuda"):
    """(name, fn, bytes moved) for each element-wise / row-wise relevance kernel."""
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        size = torch.finfo(dtype).bits // 8
        r = torch.randn(n_elems, device=device, dtype=dtype)
        z = torch.randn(n_elems, device=device, dtype=dtype)
        a = torch.randn(n_elems, device=device, dtype=dtype)
        rows = r.view(-1, row)
        s = torch.softmax(z.view(-1, row).float(), -1).to(dtype)
        w = torch.randn(row, device=device, dtype=dtype)
        tag = str(dtype).replace("torch.", "")
        out += [
            (f"stab_div {tag}", lambda r=r, z=z: ops.stab_div(r, z, 1e-6, 1.0, None), 3 * n_elems * size),
            (
                f"add2_relevance {tag}",
                lambda r=r, a=a, z=z: ops.add2_relevance(r, a, z, 1e-8, [True, True]),
                5 * n_elems * size,
            ),
            (
                f"softmax_relevance {tag} (rows of {row})",
                lambda rows=rows, z=z, s=s: ops.softmax_relevance(rows, z.view(-1, row), s, -1, 1.0),
                4 * n_elems * size,
            ),
            (
                f"layer_norm_relevance {tag} (rows of {row})",
                lambda rows=rows, z=z, w=w: ops.layer_norm_relevance(rows, z.view(-1, row), [row], w, w, 1e-5, 1e-6),
                3 * n_elems * size,
            ),
            (f"identity_relevance {tag}", lambda r=r, d=dtype: ops.identity_relevance(r, d), 2 * n_elems * size),
        ]
    return out


def block_ratio(dtype, device="cuda", shape=(4, 2048, 2048, 16, 128, 5632), timer=cuda_time, blocks=None):
    """Milliseconds of (plain gradient, relevance) of the block; shape = batch, seq, hidden, heads,
    head dim, MLP width (bench_cpu's block functions read these module globals). ``blocks``: the
    "torch" and "lrpcpp" block functions (default bench_cpu's; bench_attention's for the fused
    attention)."""
    bench_cpu.B, bench_cpu.S, bench_cpu.H, bench_cpu.NH, bench_cpu.HD, bench_cpu.INTER = shape
    p, x = bench_cpu.block_params()
    p = {k: v.to(device, dtype) for k, v in p.items()}
    x = x.to(device, dtype).requires_grad_()
    times = {}
    for name, block in (blocks or bench_cpu.BLOCKS).items():
        y = block(x, p)
        times[name] = timer(lambda y=y: torch.autograd.grad(y, x, y.detach(), retain_graph=True), reps=5)
        del y
    return times["torch"], times["lrpcpp"]


class Table:
    """Markdown lines printed, and appended to `path` when given, as soon as they exist."""

    def __init__(self, path):
        self.path = path
        if path:
            open(path, "w").close()

    def add(self, *lines):
        for line in lines:
            print(line, flush=True)
            if self.path:
                with open(self.path, "a") as f:
                    f.write(line + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also append each row to this file as it is measured")
    parser.add_argument("--elements", type=int, default=1 << 27, help="elements per tensor (default 2^27)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="every row on the CPU at a tiny size, timed by the wall clock (checks the script)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    table = Table(args.out)
    if args.dry_run:
        device, timer, n, row = "cpu", wall_time, 1 << 12, 64
        block_dtype, block_shape = torch.float32, (1, 16, 64, 4, 16, 128)
        table.add("dry run on the CPU (tiny sizes, wall-clock times: not a measurement)", "")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu.py needs a CUDA device (--dry-run checks the script on the CPU)")
        device, timer, n, row = "cuda", cuda_time, args.elements, 2048
        block_dtype, block_shape = torch.bfloat16, (4, 2048, 2048, 16, 128, 5632)
        props = torch.cuda.get_device_properties(0)
        table.add(f"GPU: {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}", "")
    src = torch.empty(n * 4, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / timer(lambda src=src, dst=dst: dst.copy_(src)) / 1e6
    del src, dst
    table.add(
        f"device-to-device copy: {copy_gbs:.0f} GB/s (bytes read + written)",
        "",
        "| kernel | ms | GB/s | % of copy | goal >= 70% |",
        "|---|---:|---:|---:|:---:|",
    )
    for name, fn, nbytes in kernels(n, row, device):
        ms = timer(fn)
        gbs = nbytes / ms / 1e6
        table.add(
            f"| {name} | {ms:.3f} | {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% | "
            f"{'yes' if gbs >= 0.7 * copy_gbs else 'no'} |"
        )
        if device == "cuda":
            torch.cuda.empty_cache()
    b, s_, h = block_shape[:3]
    table.add(
        "",
        f"| LLaMA-style block, {str(block_dtype).replace('torch.', '')}, batch {b}, seq {s_}, hidden {h} | ms |",
        "|---|---:|",
    )
    plain, rel = block_ratio(block_dtype, device, block_shape, timer)
    table.add(
        f"| plain autograd gradient | {plain:.2f} |",
        f"| lrpcpp relevance | {rel:.2f} |",
        f"| ratio (goal <= 1.15) | {rel / plain:.2f} |",
    )
    if device == "cuda":
        torch.cuda.empty_cache()
    fused = {"torch": bench_attention.block_sdpa, "lrpcpp": bench_attention.block_fused}
    plain, rel = block_ratio(block_dtype, device, block_shape, timer, fused)
    table.add(
        f"| plain autograd gradient, F.scaled_dot_product_attention | {plain:.2f} |",
        f"| lrpcpp relevance, fused lf.scaled_dot_product_attention | {rel:.2f} |",
        f"| ratio, fused attention (goal <= 1.05) | {rel / plain:.2f} |",
    )


if __name__ == "__main__":
    main()

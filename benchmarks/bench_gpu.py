"""GPU benchmark of lrpcpp's CUDA kernels (run by scripts/gpu_check.sh on a machine with an NVIDIA GPU).

1. Each element-wise or row-wise relevance kernel: bytes moved (reads + writes of its tensors) over time,
   against the device-to-device copy bandwidth measured in the same run. Goal: >= 70% of it, at sizes
   well past the L2 cache.
2. The LLaMA-style block of bench_cpu.py at batch 4, sequence 2048, hidden 2048 (16 heads x 128,
   MLP 5632), bf16: the relevance pass against the plain autograd gradient of the same block, same
   inputs and seed. Goal: ratio <= 1.15.

Prints a markdown table; `--out FILE` also writes it to FILE.
"""

import argparse
import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
import bench_cpu  # noqa: E402  (the block definitions; imports lrpcpp)

ops = torch.ops.lrpcpp


def cuda_time(fn, reps=20, warmup=3):
    """Median milliseconds of fn() over reps, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
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
            (f"add2_relevance {tag}", lambda r=r, a=a, z=z: ops.add2_relevance(r, a, z, 1e-8, [True, True]),
             5 * n_elems * size),
            (f"softmax_relevance {tag} (rows of {row})",
             lambda rows=rows, z=z, s=s: ops.softmax_relevance(rows, z.view(-1, row), s, -1, 1.0), 4 * n_elems * size),
            (f"layer_norm_relevance {tag} (rows of {row})",
             lambda rows=rows, z=z, w=w: ops.layer_norm_relevance(rows, z.view(-1, row), [row], w, w, 1e-5, 1e-6),
             3 * n_elems * size),
            (f"identity_relevance {tag}", lambda r=r, d=dtype: ops.identity_relevance(r, d), 2 * n_elems * size),
        ]
    return out


def block_ratio(dtype, device="cuda", shape=(4, 2048, 2048, 16, 128, 5632)):
    """Milliseconds of (plain gradient, relevance) of the block; shape = batch, seq, hidden, heads,
    head dim, MLP width (bench_cpu's block functions read these module globals)."""
    bench_cpu.B, bench_cpu.S, bench_cpu.H, bench_cpu.NH, bench_cpu.HD, bench_cpu.INTER = shape
    p, x = bench_cpu.block_params()
    p = {k: v.to(device, dtype) for k, v in p.items()}
    x = x.to(device, dtype).requires_grad_()
    times = {}
    for name, block in bench_cpu.BLOCKS.items():
        y = block(x, p)
        seed = y.detach()
        times[name] = cuda_time(lambda: torch.autograd.grad(y, x, seed, retain_graph=True), reps=10)
        del y
    return times["torch"], times["lrpcpp"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--elements", type=int, default=1 << 27, help="elements per tensor (default 2^27)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    n = args.elements
    src = torch.empty(n * 4, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / cuda_time(lambda: dst.copy_(src)) / 1e6
    del src, dst
    lines = [f"GPU: {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}", "",
             f"device-to-device copy: {copy_gbs:.0f} GB/s (bytes read + written)", "",
             "| kernel | ms | GB/s | % of copy | goal >= 70% |", "|---|---:|---:|---:|:---:|"]
    for name, fn, nbytes in kernels(n, 2048):
        ms = cuda_time(fn)
        gbs = nbytes / ms / 1e6
        lines.append(f"| {name} | {ms:.3f} | {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% | "
                     f"{'yes' if gbs >= 0.7 * copy_gbs else 'no'} |")
        torch.cuda.empty_cache()
    plain, rel = block_ratio(torch.bfloat16)
    lines += ["", "| LLaMA-style block, bf16, batch 4, seq 2048, hidden 2048 | ms |", "|---|---:|",
              f"| plain autograd gradient | {plain:.2f} |", f"| lrpcpp relevance | {rel:.2f} |",
              f"| ratio (goal <= 1.15) | {rel / plain:.2f} |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

"""Vision rules on whole image models, side by side with the plain input gradient, on the CPU.

* ViT-B/16 at 224 px (Hugging Face ViTForImageClassification, random weights, 1000 classes) with
  ``lrpcpp.attribute(..., preset="vit")`` (CP-LRP attention, gamma 0.05 on linear and 0.25 on
  convolution layers);
* a ResNet-50-shaped CNN (bottleneck blocks 3-4-6-3, widths 64 to 2048, batch norms, random
  weights and statistics; built here with torch.nn) at 224 px with ``preset="epsilon_gamma_box"``
  (z-box on the first convolution, gamma 0.25 on the others, batch norms merged);
* a small 3-D CNN (two nn.Conv3d with ReLU, nn.MaxPool3d, nn.AdaptiveAvgPool3d, nn.Linear) on a
  16 x 64 x 64 clip with ``preset="epsilon_gamma_box"``;
* a ConvTranspose decoder (three nn.ConvTranspose2d, 256 channels at 16 x 16 to an RGB image at
  128 x 128, then the channel means) with ``preset="epsilon_plus"`` (z-plus on the transposed
  convolutions).

Both sides explain the top class of one image, with every parameter frozen
(``requires_grad_(False)``): the plain side is forward, top logit, ``torch.autograd.grad`` to the
pixels; the lrpcpp side is one ``lrpcpp.attribute`` call (patching, forward, backward, unpatching).
Time: warm-up calls, then the median of interleaved repetitions (alternating which goes first).
Peak memory: a fresh child process per variant and run, which builds the model, makes one call
(warm-up: the weight transforms are built and cached), then resets the peak-RSS counter and reads
VmHWM after a second call; reported are the peak itself and its increase over the RSS before the
call, with the size of the cached weight transforms (part of that RSS) alongside.

    PYTHONPATH=python .venv/bin/python benchmarks/bench_vision.py            # report on stdout
    PYTHONPATH=python .venv/bin/python benchmarks/bench_vision.py --write    # also (re)writes its RESULTS.md section
    PYTHONPATH=python .venv/bin/python benchmarks/bench_vision.py --quick    # tiny models: a smoke test
"""

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import results_file  # benchmarks/results_file.py
import torch
from machine import cpu_model  # benchmarks/machine.py
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SECTION = "## Vision rules (CPU)"
MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).reshape(3, 1, 1)


# ----------------------------------------------------------------------------- models
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet50Shaped(nn.Module):
    def __init__(self, blocks=(3, 4, 6, 3), base: int = 64, classes: int = 1000):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], base
        for i, n in enumerate(blocks):
            width = base * 2**i
            stage = []
            for j in range(n):
                stage.append(Bottleneck(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * Bottleneck.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CNN3d(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv3d(3, width, 3, padding=1), nn.Conv3d(width, 2 * width, 3, padding=1)
        self.relu, self.pool, self.avgpool = nn.ReLU(), nn.MaxPool3d(2), nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        return self.fc(torch.flatten(self.avgpool(self.relu(self.conv2(x))), 1))


class Decoder(nn.Module):
    def __init__(self, width: int = 256):
        super().__init__()
        self.up1 = nn.ConvTranspose2d(width, width // 2, 4, 2, 1)
        self.up2 = nn.ConvTranspose2d(width // 2, width // 4, 4, 2, 1)
        self.up3 = nn.ConvTranspose2d(width // 4, 3, 4, 2, 1)
        self.relu, self.avgpool = nn.ReLU(), nn.AdaptiveAvgPool2d(1)

    def forward(self, z):
        x = self.up3(self.relu(self.up2(self.relu(self.up1(z)))))
        return torch.flatten(self.avgpool(x), 1)  # the channel means of the decoded image


def build(name: str, quick: bool):
    """(model, pixels, (preset name, preset options))."""
    torch.manual_seed(0)
    size = 32 if quick else 224
    if name == "vit":
        import transformers as tfm

        kwargs = (
            dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
            )
            if quick
            else {}
        )
        config = tfm.ViTConfig(num_labels=1000, **kwargs)
        config._attn_implementation = "sdpa"
        model = tfm.ViTForImageClassification(config).eval()
        preset = ("vit", dict(gamma_linear=0.05, gamma_conv=0.25))
    elif name == "cnn3d":
        model = (CNN3d(width=4) if quick else CNN3d()).eval().requires_grad_(False)
        g = torch.Generator().manual_seed(1)
        shape = (1, 3, 4, 16, 16) if quick else (1, 3, 16, 64, 64)
        pixels = (torch.rand(*shape, generator=g) - MEAN[..., None]) / STD[..., None]
        low, high = (0 - MEAN[..., None]) / STD[..., None], (1 - MEAN[..., None]) / STD[..., None]
        return model, pixels, ("epsilon_gamma_box", dict(low=low, high=high))
    elif name == "decoder":
        model = (Decoder(width=16) if quick else Decoder()).eval().requires_grad_(False)
        g = torch.Generator().manual_seed(1)
        side = 8 if quick else 16
        return model, torch.randn(1, model.up1.in_channels, side, side, generator=g), ("epsilon_plus", {})
    else:
        model = ResNet50Shaped(blocks=(1, 1, 1, 1), base=8) if quick else ResNet50Shaped()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        model.eval()
        preset = ("epsilon_gamma_box", dict(low=(0 - MEAN) / STD, high=(1 - MEAN) / STD))
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    pixels = (torch.rand(1, 3, size, size, generator=g) - MEAN) / STD
    return model, pixels, preset


def logits_of(model, x):
    out = model(pixel_values=x) if hasattr(model, "config") else model(x)
    return getattr(out, "logits", out)


def plain(model, pixels, preset):
    x = pixels.detach().requires_grad_()
    logits = logits_of(model, x)
    top = logits.gather(1, logits.argmax(1, keepdim=True))[:, 0]
    (grad,) = torch.autograd.grad(top, x, torch.ones_like(top))
    return (grad * x.detach()).detach(), top.detach()


def lrp(model, pixels, preset):
    import lrpcpp

    name, options = preset
    attr = lrpcpp.attribute(model, pixel_values=pixels, preset=lrpcpp.preset(name, **options))
    return attr.relevance, attr.output


VARIANTS = {"plain gradient": plain, "lrpcpp preset": lrp}


# ----------------------------------------------------------------------------- memory (child process)
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def child(model_name: str, variant: str, quick: bool) -> dict:
    import lrpcpp.modules as lm

    model, pixels, preset = build(model_name, quick)
    VARIANTS[variant](model, pixels, preset)  # warm-up: allocator pools, cached weight transforms
    _trim()
    before = _status("VmRSS")
    cache = sum(t.numel() * t.element_size() for entries in lm._TRANSFORMS.values() for _, t in entries.values())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        exact = True
    except OSError:
        exact = False
    VARIANTS[variant](model, pixels, preset)
    peak = _status("VmHWM")
    return {"before": before, "peak": peak, "increase": peak - before, "cache": cache, "exact": exact}


def measure_memory(model_name: str, variant: str, quick: bool, runs: int) -> dict:
    results = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", model_name, variant]
            + (["--quick"] if quick else []),
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")),
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        k: statistics.median(r[k] for r in results) if k != "exact" else all(r[k] for r in results) for k in results[0]
    }


# ----------------------------------------------------------------------------- time (this process)
def measure_time(model_name: str, quick: bool, reps: int, warmup: int) -> dict:
    model, pixels, preset = build(model_name, quick)
    outputs = {name: fn(model, pixels, preset) for name, fn in VARIANTS.items()}
    rel_plain, out_plain = outputs["plain gradient"]
    rel_lrp, out_lrp = outputs["lrpcpp preset"]
    # bitwise for the ViT; with batch norms merged into the convolutions, equal up to rounding
    diff = float(((out_lrp - out_plain).abs() / out_plain.abs().clamp_min(1e-30)).max())
    checks = {
        "explained logit bitwise equal" if diff == 0 else f"explained logit within {diff:.1e} (relative)": diff < 1e-4,
        "relevance finite": bool(torch.isfinite(rel_lrp).all()),
    }
    for _ in range(warmup):
        for fn in VARIANTS.values():
            fn(model, pixels, preset)
    times = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    load_before = _cpu_busy()
    for i in range(reps):
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            VARIANTS[name](model, pixels, preset)
            times[name].append(time.perf_counter() - t0)
    other = _other_share(load_before, cpu_before, wall_before)
    return {"times": {k: statistics.median(v) for k, v in times.items()}, "checks": checks, "other_cpu": other}


def _cpu_busy():
    with open("/proc/stat") as f:
        parts = [int(v) for v in f.readline().split()[1:]]
    return sum(parts) - parts[3] - parts[4], sum(parts)


def _other_share(before, cpu_before, wall_before) -> float:
    """Share of the machine's CPU time that other processes used while the timings ran."""
    busy0, total0 = before
    busy1, total1 = _cpu_busy()
    ticks = os.sysconf("SC_CLK_TCK")
    ours = (time.process_time() - cpu_before) * ticks
    total = max(total1 - total0, 1)
    return max(0.0, (busy1 - busy0 - ours) / total)


# ----------------------------------------------------------------------------- report
def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} CPUs"


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def report(results: dict, args) -> str:
    load = open("/proc/loadavg").read().split()[:3]
    lines = [
        SECTION,
        "",
        f"Machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"commit {results_file.commit()}; "
        f"load average before the run {', '.join(load)} (`uptime`; other builds may have been running).",
        f"`benchmarks/bench_vision.py`{' --quick' if args.quick else ''}: one image, top class, every parameter "
        f"frozen; time: median of {args.reps} interleaved repetitions after {args.warmup} warm-up calls; memory: "
        f"fresh process per variant, median of {args.mem_runs}.",
        "",
        "| model | preset | plain gradient | lrpcpp | time ratio (goal) | peak RSS plain / lrpcpp | "
        "peak increase plain / lrpcpp | memory ratio: peak / increase (goal) | cached transforms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        t = r["time"]["times"]
        tp, tl = t["plain gradient"], t["lrpcpp preset"]
        goal_t = {"ViT-B/16": "1.6", "ResNet-50-shaped": "1.8"}.get(name, "report")
        row = [name, r["preset"], f"{tp * 1e3:.0f} ms", f"{tl * 1e3:.0f} ms", f"{tl / tp:.2f}x ({goal_t})"]
        if "memory" in r:
            mp, ml = r["memory"]["plain gradient"], r["memory"]["lrpcpp preset"]
            goal_m = "increase 1.3" if name == "ViT-B/16" else "report"
            row += [
                f"{mib(mp['peak'])} / {mib(ml['peak'])}",
                f"{mib(mp['increase'])} / {mib(ml['increase'])}",
                f"{ml['peak'] / mp['peak']:.2f}x / {ml['increase'] / max(mp['increase'], 1):.2f}x ({goal_m})",
                mib(ml["cache"]),
            ]
        else:
            row += ["-", "-", "-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for name, r in results.items():
        checks = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in r["time"]["checks"].items())
        lines.append(
            f"- {name}: {checks}; other processes used {r['time']['other_cpu'] * 100:.0f} % of the CPU "
            "time while it was timed."
        )
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    results_file.write_section(SECTION, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, one repetition")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mem-runs", type=int, default=3)
    parser.add_argument(
        "--only",
        nargs="*",
        choices=["vit", "resnet", "cnn3d", "decoder"],
        default=["vit", "resnet", "cnn3d", "decoder"],
    )
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--write", action="store_true", help="also write the section into benchmarks/RESULTS.md")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.quick)))
        return
    if args.quick:
        args.reps, args.warmup = 1, 0
    names = {
        "vit": ("ViT-B/16", "vit"),
        "resnet": ("ResNet-50-shaped", "epsilon_gamma_box"),
        "cnn3d": ("3-D CNN", "epsilon_gamma_box"),
        "decoder": ("ConvTranspose decoder", "epsilon_plus"),
    }
    results = {}
    for key in args.only:
        label, preset = names[key]
        print(f"timing {label} ...", file=sys.stderr)
        results[label] = {"preset": preset, "time": measure_time(key, args.quick, args.reps, args.warmup)}
        if not args.no_memory:
            print(f"memory of {label} ...", file=sys.stderr)
            results[label]["memory"] = {v: measure_memory(key, v, args.quick, args.mem_runs) for v in VARIANTS}
    text = report(results, args)
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()

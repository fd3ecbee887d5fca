"""One rank of a sharded attribution under torchrun, for tests/test_distributed.py: a small float32
LLaMA model (tests/models.py) sharded with FSDP2 or split with tensor parallelism over a CPU
``DeviceMesh`` (gloo) must give the relevance of the same model in one process, at both levels.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py {fsdp,tp,tp-dtensor}

``tp`` is transformers' own plan for LLaMA (query, key, value, gate and up projections column-wise,
output and down projections row-wise, plain local tensors between them); ``tp-dtensor`` keeps the
column-wise outputs of the MLP as DTensors, so that the activation and the product of the gated MLP
(the lrpcpp ops) run on sharded DTensors. Each rank prints its largest relative difference and exits
with 1 when it is above the tolerance.
"""

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("LRPCPP_TEST_INSTALLED") != "1":  # the in-place build, unless the tests check a wheel
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

import lrpcpp  # noqa: E402
from models import build, inputs  # noqa: E402

RTOL = 1e-5
LEVELS = ("registry", "operations")


def shard_fsdp(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def shard_tp(model, mesh, dtensor_mlp: bool = False):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    # the attention reads its number of heads from the shape (view(..., -1, head_dim)): each rank
    # holds heads / N query heads and kv_heads / N key/value heads, whose ratio stays the same
    mlp_in = ColwiseParallel(use_local_output=not dtensor_mlp)
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": mlp_in,
        "mlp.up_proj": mlp_in,
        "mlp.down_proj": RowwiseParallel(),
    }
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("case", choices=("fsdp", "tp", "tp-dtensor"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = build("llama", dtype=torch.float32)
    kw = inputs("llama", dtype=torch.float32)
    expected = {level: lrpcpp.attribute(model, level=level, **kw).relevance for level in LEVELS}
    sharded = copy.deepcopy(model)
    if args.case == "fsdp":
        shard_fsdp(sharded, mesh)
    else:
        shard_tp(sharded, mesh, dtensor_mlp=args.case == "tp-dtensor")
    failed = False
    for level in LEVELS:
        got = lrpcpp.attribute(sharded, level=level, **kw).relevance
        if isinstance(got, torch.distributed.tensor.DTensor):
            got = got.full_tensor()
        scale = float(expected[level].abs().max())
        diff = float((got - expected[level]).abs().max()) / scale
        print(f"rank {rank} {args.case} {level}: relative difference {diff:.3g}", flush=True)
        failed |= not diff <= RTOL
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

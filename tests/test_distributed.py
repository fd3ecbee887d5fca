"""Sharded models (FSDP2, tensor parallelism) give the relevance of the model in one process, and the
DTensor sharding rule of every lrpcpp op in :mod:`lrpcpp.distributed` computes what the op computes
on the full tensors. The sharded runs are two gloo processes on CPU under torchrun
(tests/distributed_worker.py), each bounded in time."""

import os
import subprocess
import sys

import lrpcpp
import lrpcpp.distributed
import pytest
import torch
from conftest import fails_in_torch_before_2_13, subprocess_env
from distributed_worker import _rule_cases

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "distributed_worker.py")

needs_distributed = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)


def _torchrun(case, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", WORKER, case]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env())


@pytest.mark.slow
@needs_distributed
@pytest.mark.parametrize(
    "case",
    [
        "fsdp",
        "tp",
        pytest.param(
            "tp-dtensor",
            marks=fails_in_torch_before_2_13("DTensor refuses to flatten dimensions of which one is sharded"),
        ),
    ],
)
def test_sharded_model_gives_the_relevance_of_one_process(case):
    run = _torchrun(case)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    for level in ("registry", "operations") + (("explicit",) if case != "tp-dtensor" else ()):  # both ranks, each run
        assert run.stdout.count(f"{case} {level}: relative difference") == 2, run.stdout


@pytest.fixture(scope="module")
def rule_results():
    run = _torchrun("rules")
    lines = dict(line.split(" ", 1)[::-1] for line in run.stdout.splitlines() if line.startswith("ok "))
    fails = {line[5:].split(":", 1)[0]: line for line in run.stdout.splitlines() if line.startswith("FAIL ")}
    return run, lines, fails


@pytest.mark.slow
@needs_distributed
@pytest.mark.parametrize("op", sorted(_rule_cases()) + ["placed_like"])
def test_sharding_rule_equals_the_op_on_full_tensors(rule_results, op):
    run, ok, fails = rule_results
    assert op not in fails, fails[op]
    assert op in ok, run.stdout + run.stderr[-4000:]


@needs_distributed
def test_every_rule_is_checked():
    lrpcpp.distributed.register()
    checked = {case[0] for case in _rule_cases().values()}
    registered = {getattr(torch.ops.lrpcpp, name) for name in lrpcpp.distributed.RULES}
    assert registered == checked


def test_plain_tensors_pass_unchanged():
    x, scale = torch.randn(2, 3), torch.ones(3)
    assert lrpcpp.distributed.placed_like(scale, x) is scale
    embedding = torch.nn.Embedding(4, 2)
    model = torch.nn.Sequential(embedding)
    with lrpcpp.distributed.unsharded(model, embedding):  # no FSDP2: nothing gathered
        assert embedding(torch.tensor([1])).shape == (1, 2)


@pytest.mark.slow
def test_importing_lrpcpp_imports_no_dtensor():
    code = "import sys, lrpcpp; print('torch.distributed.tensor' in sys.modules, lrpcpp.distributed._registered)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert run.stdout.split() == ["False", "False"], run.stderr

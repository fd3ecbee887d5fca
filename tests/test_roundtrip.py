"""TorchScript (script and trace, saved and loaded in a fresh process), torch.compile(fullgraph=True)
and torch.export give the same relevance as eager."""

import subprocess
import sys

import pytest
import torch
from block import Head, relevance
from conftest import recording_backend, subprocess_env


@pytest.fixture(scope="module")
def model_and_input():
    torch.manual_seed(0)
    model = Head(8).eval()
    x = torch.randn(2, 5, 8)
    return model, x, relevance(model, x)


def test_eager_relevance_is_finite_and_nonzero(model_and_input):
    _, _, r = model_and_input
    assert torch.isfinite(r).all() and r.abs().sum() > 0


@pytest.mark.subprocess
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_in_a_fresh_process(model_and_input, how, tmp_path):
    model, x, expected = model_and_input
    ts = torch.jit.script(model) if how == "script" else torch.jit.trace(model, x)
    torch.testing.assert_close(relevance(ts, x), expected, rtol=1e-6, atol=1e-7)
    archive, inputs, out = tmp_path / "model.pt", tmp_path / "x.pt", tmp_path / "r.pt"
    ts.save(str(archive))
    torch.save(x, inputs)
    code = (
        "import sys, torch\n"
        "import lrpcpp\n"  # registers the lrpcpp ops the archive calls
        f"m = torch.jit.load({str(archive)!r})\n"
        f"x = torch.load({str(inputs)!r}).requires_grad_()\n"
        "y = m(x); y.backward(y)\n"
        f"torch.save(x.grad, {str(out)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env(), cwd=str(tmp_path))
    torch.testing.assert_close(torch.load(out), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.compile
def test_compile_fullgraph(model_and_input):
    model, x, expected = model_and_input
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(relevance(compiled, x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.compile
def test_compile_dynamic_shapes(model_and_input):
    model, _, _ = model_and_input
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for t in (3, 6):
        x = torch.randn(2, t, 8)
        torch.testing.assert_close(relevance(compiled, x), relevance(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.compile
def test_compiled_backward_graph_calls_the_relevance_ops(model_and_input):
    model, x, _ = model_and_input
    seen = []
    backend = recording_backend(seen)

    torch._dynamo.reset()
    relevance(torch.compile(model, backend=backend, fullgraph=True), x)
    for op in (
        "linear_epsilon_relevance",
        "softmax_relevance",
        "matmul_relevance",
        "add2_relevance",
        "mul2_relevance",
        "layer_norm_relevance",
        "identity_relevance",
        "mean_relevance",
    ):
        assert any(f"lrpcpp.{op}" in s for s in seen), op


@pytest.mark.compile
def test_export_and_saved_program(model_and_input, tmp_path):
    model, x, expected = model_and_input
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(relevance(program.module(), x), expected, rtol=1e-6, atol=1e-7)
    path = tmp_path / "head.pt2"
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path))
    torch.testing.assert_close(relevance(loaded.module(), x), expected, rtol=1e-6, atol=1e-7)

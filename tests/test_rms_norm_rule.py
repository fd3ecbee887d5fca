"""RMSNorms written as transformers' LlamaRMSNorm (about 140 families' RMSNorm classes) get their
gradient-mode rule from the forward's own ops with the rsqrt factor held constant (RULES.md section 2):
the same value, bitwise, and a backward that keeps one factor per row and the weight, not the identity
rule's factor y / x of the input's size. Other norms, and float64 inputs (which LlamaRMSNorm rounds to
float32), keep the identity rule."""

import copy

import lrpcpp
import pytest
import torch
from conftest import assert_relevance_close
from lrpcpp.models.patching import computes_llama_rms_norm
from models import build, inputs
from test_gradient_input import saving
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm


class DifferentRMSNorm(nn.Module):
    """A norm with an RMSNorm's name whose forward is not LlamaRMSNorm's."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class Renamed(DifferentRMSNorm):
    """A class of another name whose forward is LlamaRMSNorm's."""

    forward = LlamaRMSNorm.forward


def test_the_layout_is_recognised_by_the_forward_and_not_by_the_name():
    assert computes_llama_rms_norm(LlamaRMSNorm(8)) and computes_llama_rms_norm(Qwen2RMSNorm(8))
    # a user's class with that forward, under another name
    assert computes_llama_rms_norm(Renamed(8))
    assert not computes_llama_rms_norm(GemmaRMSNorm(8))  # (1 + weight), in float32
    assert not computes_llama_rms_norm(DifferentRMSNorm(8))
    assert not computes_llama_rms_norm(nn.RMSNorm(8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_norm_keeps_one_factor_per_row_and_gives_the_held_constant_gradient(dtype):
    model = build("llama", dtype=dtype)
    norm = model.model.layers[0].input_layernorm
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
    norm.weight.requires_grad_(False)
    x = torch.randn(2, 5, 32, dtype=dtype, requires_grad=True)
    before = norm(x.detach())
    with lrpcpp.patch(model):
        y, saved = saving(lambda: norm(x))
    assert torch.equal(y, before)  # the module's value, bitwise
    assert all(t.shape[-1] != 32 or t is norm.weight for t in saved), [tuple(t.shape) for t in saved]
    assert any(t.shape == (2, 5, 1) for t in saved)
    g = torch.randn(2, 5, 32, dtype=dtype)
    y.backward(g)
    # RULES.md section 2, from the float64 values of the inputs: g * w * rsqrt(mean(x^2) + eps)
    x64 = x.detach().double()
    want = g.double() * norm.weight.double() * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    assert_relevance_close(x.grad, want, dtype)


def test_a_float64_input_keeps_the_identity_rule():
    # LlamaRMSNorm computes in float32: through its casts the gradient would be rounded to float32
    model = build("llama", dtype=torch.float64)
    norm = model.model.layers[0].input_layernorm
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    with lrpcpp.patch(model):
        y, saved = saving(lambda: norm(x))
    assert any(t.shape == x.shape for t in saved)  # gi_identity's factor y / x
    y.backward(torch.ones_like(y))
    x2 = x.detach().clone().requires_grad_()
    lrpcpp.functional.gi_identity(x2, y.detach()).backward(torch.ones_like(y))
    assert torch.equal(x.grad, x2.grad)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_model_relevance_is_that_of_the_identity_rule(family, dtype):
    """The held-constant rsqrt and the identity rule y / x are the same rule: the float32 and bfloat16
    models' relevance equals the float64 model's (which keeps the identity rule) within the dtype's
    tolerance, and the patched forward is the model's, bitwise."""
    reference_model = build(family, dtype=torch.float64)
    model = copy.deepcopy(reference_model).to(dtype)
    kw = inputs(family)
    reference = lrpcpp.attribute(reference_model, **kw)
    before = model(**kw).logits
    with lrpcpp.patch(model):
        assert torch.equal(model(**kw).logits, before)
    got = lrpcpp.attribute(model, **kw)
    assert got.relevance.dtype == dtype
    assert_relevance_close(got.relevance, reference.relevance, dtype)

"""Mixtures of experts (Mixtral, Qwen3-MoE) at the operation level, under transformers 5.x and 4.x.

RULES.md section 4: the router's softmax and the top-k weights take the rules of softmax and
selection, the renormalisation of the top-k weights by their sum holds the sum constant, each
expert's output times its routing weight is a product split evenly (with either method), and the
experts' outputs are summed. Under transformers 5.x the registry applies this with hooks on the
router and the experts, and the operation level must give its numbers; under 4.x a block computes
its routing weights in its own forward, which the registry cannot reach, so ``level="auto"``
explains it at the operation level, checked against a float64 transcription of the rules.
"""

import lrpcpp
import pytest
import torch
from models import FAMILIES, MOE, MOE_4X, TRANSFORMERS_4, attribute_ruled, inputs
from torch.nn import functional as F

METHODS = ["attnlrp", "cp-lrp"]


def build(family: str, dtype=torch.float64, experts: str = "eager", **overrides):
    """The tiny random model of tests/models.py in either transformers layout (5.x: ``experts``
    picks the experts' implementation)."""
    config_cls, model_cls, kwargs = MOE_4X[family] if TRANSFORMERS_4 else FAMILIES[family]
    if not TRANSFORMERS_4:
        overrides["experts_implementation"] = experts
    torch.manual_seed(0)
    config = config_cls(**dict(kwargs, **overrides))
    config._attn_implementation = "sdpa"
    model = model_cls(config).to(dtype).eval()
    with torch.no_grad():  # larger weights than the default init, so that outputs are far from zero
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


# ----------------------------------------------------------------------------- transformers 5.x
@pytest.mark.skipif(TRANSFORMERS_4, reason="the registry patches the mixture-of-experts blocks of transformers 5 only")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("experts", ["eager", "batched_mm"])
@pytest.mark.parametrize("family", sorted(MOE))
def test_operation_level_equals_the_registry(family, experts, method):
    model, kw = build(family, experts=experts), inputs(family)
    got = attribute_ruled(model, method=method, level="operations", **kw)
    ref = lrpcpp.attribute(model, method=method, level="registry", **kw)
    assert got.coverage.unruled == {} and ref.coverage is None
    assert got.coverage.ruled["Tensor.mul"] > 0  # the products of routing weights and experts' outputs
    torch.testing.assert_close(got.relevance, ref.relevance, rtol=1e-10, atol=1e-12)
    assert torch.equal(got.output, ref.output)


@pytest.mark.skipif(TRANSFORMERS_4, reason="the grouped experts' kernel is transformers 5's")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", sorted(MOE))
def test_grouped_experts_kernel_is_ruled(family, method):
    # torch._grouped_mm takes no float64: float32, where both levels run the same kernels
    model, kw = build(family, dtype=torch.float32, experts="grouped_mm"), inputs(family)
    got = attribute_ruled(model, method=method, level="operations", **kw)
    ref = lrpcpp.attribute(model, method=method, level="registry", **kw)
    assert got.coverage.unruled == {} and got.coverage.passed["torch._grouped_mm"] > 0
    scale = float(ref.relevance.abs().max())
    torch.testing.assert_close(got.relevance, ref.relevance, rtol=1e-6, atol=1e-6 * scale)


def test_a_grouped_product_of_two_carriers_is_split():
    # both operands carrying relevance: a product (half the gradient each with attnlrp)
    a = torch.randn(6, 8, dtype=torch.float32, requires_grad=True)
    b = torch.randn(2, 8, 4, dtype=torch.float32, requires_grad=True)  # grouped_mm: 16-byte strides
    offs = torch.tensor([2, 6], dtype=torch.int32)
    with lrpcpp.models.operations.GradientRules() as mode:
        out = torch._grouped_mm(a, b, offs=offs)
    seed = torch.randn_like(out)  # a contiguous one: grouped_mm's backward takes no expanded gradient
    ga, gb = torch.autograd.grad(out, (a, b), seed)
    plain = torch.autograd.grad(torch._grouped_mm(a, b, offs=offs), (a, b), seed)
    assert mode.coverage().ruled == {"torch._grouped_mm": 1}
    torch.testing.assert_close(ga, 0.5 * plain[0])
    torch.testing.assert_close(gb, 0.5 * plain[1])


# ----------------------------------------------------------------------------- both layouts
@pytest.mark.parametrize("family", sorted(MOE))
def test_patched_forward_is_bitwise_the_plain_forward(family):
    model, kw = build(family), inputs(family)
    x = model.get_input_embeddings()(kw["input_ids"]).detach()
    plain = model(inputs_embeds=x).logits
    for method in METHODS:
        with lrpcpp.patch(model, method=method) as handle:
            assert handle.level == ("operations" if TRANSFORMERS_4 else "registry")
            assert torch.equal(model(inputs_embeds=x.clone().requires_grad_()).logits, plain)
        with lrpcpp.patch(model, method=method, level="operations"):
            assert torch.equal(model(inputs_embeds=x.clone().requires_grad_()).logits, plain)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", sorted(MOE))
def test_auto_explains_either_layout(family, method):
    model, kw = build(family), inputs(family)
    got = attribute_ruled(model, method=method, **kw)  # level="auto"
    assert torch.isfinite(got.relevance).all() and got.relevance.abs().sum() > 0
    if TRANSFORMERS_4:  # the registry cannot patch the 4.x layout: the operation level explains it
        assert got.coverage is not None and got.coverage.unruled == {}
        ops = attribute_ruled(model, method=method, level="operations", **kw)
        assert torch.equal(got.relevance, ops.relevance)
    else:
        assert got.coverage is None


@pytest.mark.skipif(not TRANSFORMERS_4, reason="transformers 4.x only: the layout the registry cannot patch")
@pytest.mark.parametrize("family", sorted(MOE))
def test_transformers_4_registry_level_refuses_clearly(family):
    model, kw = build(family), inputs(family)
    with pytest.raises(
        lrpcpp.UnsupportedModelError, match=r"SparseMoeBlock \(model\.layers\.0\.\w+\).*operation level"
    ):
        lrpcpp.patch(model, level="registry")
    with pytest.raises(lrpcpp.UnsupportedModelError, match="routing weights in its own forward"):
        lrpcpp.attribute(model, mode="explicit", **kw)
    assert all("forward" not in m.__dict__ and not m._forward_hooks for m in model.modules())  # nothing left patched


# ----------------------------------------------------------------------------- one block by hand
def _first_block(model):
    # layers[0].mlp, or 4.x Mixtral's layers[0].block_sparse_moe
    return next(m for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock"))


def _block_weights(block, family: str, generator: torch.Generator):
    """Writes the same random weights into a block of either layout; returns them as
    ``(router [E, H], [(gate [I, H], up [I, H], down [H, I]) per expert])``."""
    router = block.gate.weight
    experts = block.experts
    n, hidden = router.shape
    if TRANSFORMERS_4:
        first = experts[0]
        inter = (first.w1 if family == "mixtral" else first.gate_proj).out_features
    else:
        inter = experts.gate_up_proj.shape[1] // 2

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * 0.3

    w_router = rand(n, hidden)
    per_expert = [(rand(inter, hidden), rand(inter, hidden), rand(hidden, inter)) for _ in range(n)]
    with torch.no_grad():
        router.copy_(w_router)
        for e, (gate, up, down) in enumerate(per_expert):
            if not TRANSFORMERS_4:
                experts.gate_up_proj[e].copy_(torch.cat([gate, up]))
                experts.down_proj[e].copy_(down)
            elif family == "mixtral":
                experts[e].w1.weight.copy_(gate), experts[e].w3.weight.copy_(up), experts[e].w2.weight.copy_(down)
            else:
                experts[e].gate_proj.weight.copy_(gate), experts[e].up_proj.weight.copy_(up)
                experts[e].down_proj.weight.copy_(down)
    return w_router, per_expert


def _reference(x, c, w_router, per_expert, top_k, renormalise, uniform):
    """RULES.md sections 1 and 4 for one block, written out in float64: the relevance of ``x``
    [N, H] when the output ``y`` gets ``R_y = c * y`` (gradient mode seeded with ``c``). The routing
    weights are computed as the model computes them (softmax in float32), so the forward values
    are the model's; everything else is float64."""
    logits = x @ w_router.T
    p32 = torch.softmax(logits.float(), dim=-1)
    top32, idx = torch.topk(p32, top_k, dim=-1)
    if renormalise:
        top32 = top32 / top32.sum(-1, keepdim=True)  # the sum is a constant
    p, w = p32.double(), top32.double()
    rel_x = torch.zeros_like(x)
    rel_w = torch.zeros_like(w)
    for t in range(x.shape[0]):
        for j in range(top_k):
            gate, up, down = per_expert[int(idx[t, j])]
            g, u = x[t] @ gate.T, x[t] @ up.T
            a = F.silu(g)
            o = (a * u) @ down.T
            # sum of the experts' outputs (add): R_z = c * z for z = w o; the product w * o is
            # uniform: R_o = R_z / 2, R_w = sum(R_z) / 2
            rel_w[t, j] = 0.5 * (c[t] * w[t, j] * o).sum()
            v = (0.5 * c[t] * w[t, j]) @ down  # (R_o / o) through the down projection (epsilon rule)
            # R_h = h * v for h = act(g) * u: split evenly (attnlrp) or the gate held (cp-lrp);
            # the identity rule through the activation: R_g / g = R_a / g = share * sigmoid(g) * u * v
            share_a, share_u = (0.5, 0.5) if uniform else (0.0, 1.0)
            rel_x[t] += x[t] * ((share_a * torch.sigmoid(g) * u * v) @ gate + (share_u * a * v) @ up)
    # the routing weights: the division by the held sum and the top-k selection pass R_w on to the
    # softmax's outputs; the softmax rule (Prop. 3.1) gives R_logits = logits * (R_p - p sum(R_p));
    # the router is linear: R_x = x * ((R_logits / logits) @ W)
    rel_p = torch.zeros_like(p).scatter(-1, idx, rel_w)
    rel_x += x * ((rel_p - p * rel_p.sum(-1, keepdim=True)) @ w_router)
    return rel_x


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", sorted(MOE))
def test_one_block_equals_a_float64_reference_of_the_rules(family, method):
    # the same weights, written into the block of whichever layout is installed: the operation
    # level gives the same relevance under transformers 4.x and 5.x
    model = build(family)
    block = _first_block(model)
    g = torch.Generator().manual_seed(5)
    w_router, per_expert = _block_weights(block, family, g)
    x = torch.randn(1, 7, w_router.shape[1], generator=g, dtype=torch.float64)
    c = torch.randn(1, 7, w_router.shape[1], generator=g, dtype=torch.float64)
    renormalise = family == "mixtral" or bool(model.config.norm_topk_prob)
    leaf = x.clone().requires_grad_()
    with lrpcpp.patch(block, method=method, level="operations") as handle:
        out = block(leaf)
    y = out[0] if isinstance(out, tuple) else out  # 4.x returns the router logits as well
    (grad,) = torch.autograd.grad(y, leaf, c)
    assert handle.coverage.unruled == {}
    ref = _reference(
        x[0], c[0], w_router, per_expert, model.config.num_experts_per_tok, renormalise, method == "attnlrp"
    )
    # the router's softmax runs in float32 (forward and backward): its share of the relevance is
    # float32-accurate, the experts' share float64-accurate
    scale = float(ref.abs().max())
    torch.testing.assert_close((x * grad)[0], ref, rtol=1e-5, atol=1e-6 * scale)


def test_qwen3_moe_block_with_renormalised_top_k_weights():
    # Qwen3-MoE renormalises only with norm_topk_prob=True: the held sum there too
    model = build("qwen3_moe", norm_topk_prob=True)
    block = _first_block(model)
    g = torch.Generator().manual_seed(6)
    w_router, per_expert = _block_weights(block, "qwen3_moe", g)
    x = torch.randn(1, 5, w_router.shape[1], generator=g, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    with lrpcpp.patch(block, level="operations") as handle:
        out = block(leaf)
    y = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(y, leaf, torch.ones_like(y))
    assert handle.coverage.ruled.get("Tensor.div_", 0) > 0  # the renormalisation's held divisor
    ref = _reference(x[0], torch.ones_like(x[0]), w_router, per_expert, 2, True, True)
    torch.testing.assert_close((x * grad)[0], ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))

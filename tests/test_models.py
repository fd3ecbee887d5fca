"""Whole-model attribution on every supported family (random weights from transformers configs).

References come from the rules themselves: CP-LRP on a bias-free model must conserve the explained
logit exactly (RULES.md section 2: every remaining operation is linear in the input), a padded batch
item must get the relevance of the item alone, eager and SDPA attention the same relevance, and K
batched targets the same maps as K single calls.
"""

import lrpcpp
import pytest
import torch
from torch import nn

pytest.importorskip("transformers", reason="whole-model tests need transformers (requirements-dev.txt)")
from models import FAMILIES, MOE, MOE_4X, VISION, bias_free, build, inputs

ALL = sorted(FAMILIES)
TEXT = [f for f in ALL if f not in VISION]


def _hooks_and_forwards(model):
    state = []
    for name, m in model.named_modules():
        state.append((name, len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__))
    return state


@pytest.mark.parametrize("family", ALL)
def test_patched_forward_equals_unpatched(family):
    model = build(family, dtype=torch.float32)
    kw = inputs(family, dtype=torch.float32)
    before = model(**kw).logits
    with lrpcpp.patch(model):
        patched = model(**kw).logits
    with lrpcpp.patch(model, method="cp-lrp"):
        cp = model(**kw).logits
    assert torch.equal(before, patched)
    assert torch.equal(before, cp)


@pytest.mark.parametrize("family", ALL)
def test_patch_then_remove_leaves_model_unchanged(family):
    model = build(family)
    kw = inputs(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hooks_and_forwards(model)
    children = [id(m) for m in model.modules()]
    before = model(**kw).logits
    handle = lrpcpp.patch(model, method="cp-lrp")
    assert len(handle.patched) > 0
    handle.remove()
    handle.remove()  # idempotent
    lrpcpp.attribute(model, **kw)  # patches and restores again
    assert _hooks_and_forwards(model) == hooks
    assert [id(m) for m in model.modules()] == children
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert torch.equal(before, model(**kw).logits)


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_relevance_finite_and_deterministic(family, method):
    model = build(family)
    kw = inputs(family)
    a = lrpcpp.attribute(model, method=method, **kw)
    b = lrpcpp.attribute(model, method=method, **kw)
    assert torch.isfinite(a.relevance).all()
    assert a.relevance.abs().sum() > 0
    assert torch.equal(a.relevance, b.relevance)
    assert a.token_relevance.shape == (a.relevance.sum(-3).shape if family in VISION else a.relevance.shape[:-1])


@pytest.mark.parametrize("family", [f for f in ALL if f not in MOE])
def test_cp_lrp_conserves_on_bias_free_model(family):
    # MoE routing weights carry relevance through the router's softmax, which absorbs some by design
    model = bias_free(build(family))
    attr = lrpcpp.attribute(model, method="cp-lrp", **inputs(family))
    total = attr.relevance.flatten(1).sum(1)
    torch.testing.assert_close(total, attr.output, rtol=1e-4, atol=0)


@pytest.mark.parametrize("family", ALL)
def test_attnlrp_differs_from_cp_lrp(family):
    # the two methods treat the products differently: identical maps would mean a rule is missing
    model = build(family)
    kw = inputs(family)
    a = lrpcpp.attribute(model, **kw).relevance
    c = lrpcpp.attribute(model, method="cp-lrp", **kw).relevance
    assert not torch.allclose(a, c, rtol=1e-3, atol=0)


@pytest.mark.parametrize("family", TEXT)
def test_padded_batch_equals_single_items(family):
    model = build(family)
    ids = inputs(family, batch=2, seq=7)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # item 1 is 4 tokens long, right-padded
    batch = lrpcpp.attribute(model, input_ids=ids, attention_mask=mask)
    for i, length in ((0, 7), (1, 4)):
        single = lrpcpp.attribute(model, input_ids=ids[i : i + 1, :length])
        torch.testing.assert_close(batch.output[i : i + 1], single.output, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(batch.relevance[i : i + 1, :length], single.relevance, rtol=1e-7, atol=1e-10)
    assert torch.all(batch.relevance[1, 4:] == 0)


@pytest.mark.parametrize("family", ALL)
def test_eager_and_sdpa_give_the_same_relevance(family):
    kw = inputs(family)
    eager = lrpcpp.attribute(build(family, attn="eager"), **kw)
    sdpa = lrpcpp.attribute(build(family, attn="sdpa"), **kw)
    # eager attention computes its softmax in float32 even in a float64 model
    scale = float(sdpa.relevance.abs().max())
    torch.testing.assert_close(eager.relevance, sdpa.relevance, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("family", ALL)
def test_batched_targets_equal_single_calls(family):
    model = build(family)
    kw = inputs(family)
    targets = [0, 2, 1]
    many = lrpcpp.attribute(model, target=targets, **kw)
    assert many.relevance.shape[0] == len(targets)
    for k, t in enumerate(targets):
        one = lrpcpp.attribute(model, target=t, **kw)
        torch.testing.assert_close(many.relevance[k], one.relevance, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(many.output[:, k], one.output)


@pytest.mark.parametrize("family", [f for f in ("llama", "bert", "vit", "mixtral") if f in FAMILIES])
def test_bf16_matches_fp32(family):
    model = build(family, dtype=torch.float32)
    kw = inputs(family, dtype=torch.float32)
    ref = lrpcpp.attribute(model, **kw)
    low = lrpcpp.attribute(
        model.to(torch.bfloat16),
        target=ref.target,
        **{k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in kw.items()},
    )
    assert low.relevance.dtype == torch.bfloat16 and torch.isfinite(low.relevance).all()
    a, b = ref.token_relevance.flatten().double(), low.token_relevance.flatten().double()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9


def test_latent_relevance_per_layer():
    model = bias_free(build("llama"))
    attr = lrpcpp.attribute(model, method="cp-lrp", latent=True, **inputs("llama"))
    assert list(attr.latent) == ["model.layers.0", "model.layers.1"]
    for rel in attr.latent.values():
        assert rel.shape == attr.relevance.shape
        # CP-LRP conserves layer by layer on a bias-free model
        torch.testing.assert_close(rel.flatten(1).sum(1), attr.output, rtol=1e-4, atol=0)


def test_two_models_patched_with_different_methods_do_not_interfere():
    kw = inputs("llama")
    a, b = build("llama"), build("llama")
    ref_a = lrpcpp.attribute(a, method="attnlrp", **kw).relevance
    ref_b = lrpcpp.attribute(b, method="cp-lrp", **kw).relevance
    with lrpcpp.patch(a, method="attnlrp"), lrpcpp.patch(b, method="cp-lrp"):
        for model, ref in ((a, ref_a), (b, ref_b)):
            x = model.get_input_embeddings()(kw["input_ids"]).detach().requires_grad_()
            logits = model(inputs_embeds=x).logits[:, -1]
            picked = logits.gather(-1, logits.argmax(-1, keepdim=True)).sum()
            (g,) = torch.autograd.grad(picked, x)
            torch.testing.assert_close(x * g, ref, rtol=1e-9, atol=1e-12)


def test_patching_twice_is_an_error_and_nothing_global_changes():
    model = build("llama")
    linear_forward, norm_forward = nn.Linear.forward, type(model.model.norm).forward
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with lrpcpp.patch(model):
        with pytest.raises(RuntimeError, match="already patched"):
            lrpcpp.patch(model)
    assert nn.Linear.forward is linear_forward and type(model.model.norm).forward is norm_forward
    assert torch.nn.functional.scaled_dot_product_attention is sdpa


@pytest.mark.skipif(not MOE_4X, reason="transformers 4.x only: the mixture-of-experts layout the registry cannot patch")
@pytest.mark.parametrize("family", sorted(MOE))
def test_transformers_4_mixture_of_experts_is_explained_at_the_operation_level(family):
    config_cls, model_cls, kwargs = MOE_4X[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs)).double().eval()
    with pytest.raises(lrpcpp.UnsupportedModelError, match="the registry cannot apply their rule"):
        lrpcpp.attribute(model, level="registry", **inputs(family))
    assert all("forward" not in m.__dict__ and not m._forward_hooks for m in model.modules())  # nothing left patched
    attr = lrpcpp.attribute(model, **inputs(family))  # level="auto": the operation level
    assert attr.coverage is not None and attr.coverage.unruled == {}
    assert torch.isfinite(attr.relevance).all() and attr.relevance.abs().sum() > 0
    # the numbers: tests/test_operation_moe.py (a block against a float64 reference of the rules)


def test_unknown_architecture_is_an_error():
    class Config:
        model_type = "mystery"

    model = nn.Linear(3, 3)
    model.config = Config()
    with pytest.raises(lrpcpp.UnsupportedModelError, match="register_family"):
        lrpcpp.patch(model, level="registry")  # level="auto" explains it at the operation level


def test_unknown_attention_module_in_plain_model_is_an_error():
    class FancyAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return torch.softmax(self.proj(x) @ x.transpose(-1, -2), -1) @ x

    with pytest.raises(lrpcpp.UnsupportedModelError, match="FancyAttention"):
        lrpcpp.patch(nn.Sequential(FancyAttention()), level="registry")  # "auto": the operation level


def test_wrappers_of_a_described_attention_module_are_no_unknown_attention():
    """A module named ...Attention that holds a described one (here torch's nn.MultiheadAttention) is
    its wrapper, not an attention of its own: also a second wrapper of the same module, which
    ``named_modules()`` lists under the first wrapper's name only."""

    class WrapAttention(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    class Unrelated(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

    mha = nn.MultiheadAttention(4, 2, batch_first=True)
    model = nn.Sequential(WrapAttention(mha), WrapAttention(mha))
    with lrpcpp.patch(model, level="registry") as handle:
        assert handle.patched["0.inner"].startswith("attention")
    unknown = nn.Sequential(WrapAttention(mha), type("OtherAttention", (Unrelated,), {})())
    with pytest.raises(lrpcpp.UnsupportedModelError, match=r"1 \(OtherAttention\)"):
        lrpcpp.patch(unknown, level="registry")


def test_register_family_makes_a_new_architecture_work():
    model = build("llama")
    model.config.model_type = "llama_clone"
    with pytest.raises(lrpcpp.UnsupportedModelError):
        lrpcpp.patch(model, level="registry")
    lrpcpp.register_family(
        "llama_clone",
        model_types=("llama_clone",),
        attention=("LlamaAttention",),
        gated_mlp=("LlamaMLP",),
        norms=("LlamaRMSNorm",),
    )
    try:
        ref = lrpcpp.attribute(build("llama"), **inputs("llama")).relevance
        torch.testing.assert_close(lrpcpp.attribute(model, **inputs("llama")).relevance, ref)
    finally:
        del lrpcpp.models.families.FAMILIES["llama_clone"]


def test_family_matches_subclasses_wrappers_and_alternative_child_names():
    """One entry describes both transformers layouts: 5.x's attention with q_proj/k_proj/v_proj, and
    4.x's per-kernel subclass (BertSdpaSelfAttention) or inner module (ViTAttention holding
    ViTSelfAttention) with query/key/value."""

    class SelfAttention(nn.Module):  # the 4.x layout
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return torch.softmax(self.query(x) @ self.key(x).transpose(-1, -2), -1) @ self.value(x)

    class SdpaSelfAttention(SelfAttention):
        pass

    class WrapperAttention(nn.Module):  # holds the attention (4.x) or is it (5.x)
        def __init__(self, inner):
            super().__init__()
            self.attention = inner

        def forward(self, x):
            return self.attention(x)

    class Config:
        model_type = "two_layouts"

    model = nn.Sequential(WrapperAttention(SelfAttention()), SdpaSelfAttention())
    model.config = Config()
    lrpcpp.register_family(
        "two_layouts",
        model_types=("two_layouts",),
        attention=("WrapperAttention", "SelfAttention"),
        q=("q_proj", "query"),
        k=("k_proj", "key"),
        v=("v_proj", "value"),
    )
    try:
        with lrpcpp.patch(model) as handle:
            shares = {n: w for n, w in handle.patched.items() if w.startswith("output share")}
        assert shares == {
            f"{a}.{p}": f"output share [(4, {s})]"
            for a in ("0.attention", "1")
            for p, s in (("query", 0.25), ("key", 0.25), ("value", 0.5))
        }
        model[0].attention = nn.Identity()  # a wrapper with neither layout's children
        with pytest.raises(lrpcpp.UnsupportedModelError, match="'q_proj' or 'query'"):
            lrpcpp.patch(model, level="registry")
        # the default level: the operation level, saying why (an entry is no gate)
        with pytest.warns(UserWarning, match=r"'q_proj' or 'query'.*level='auto' explains the model at the operation"):
            with lrpcpp.patch(model) as handle:
                assert handle.level == "operations"
        assert all("forward" not in m.__dict__ for m in model.modules())  # nothing left patched
    finally:
        del lrpcpp.models.families.FAMILIES["two_layouts"]


def test_family_with_a_fused_projection_needs_its_split():
    fields = dict(model_types=("llama_fused",), attention=("LlamaAttention",), qkv="q_proj", norms=("LlamaRMSNorm",))
    with pytest.raises(ValueError, match=r"'llama_fused' names a fused projection qkv='q_proj' but no qkv_split"):
        lrpcpp.register_family("llama_fused", **fields)
    assert "llama_fused" not in lrpcpp.models.families.FAMILIES


@pytest.mark.parametrize("level", ["registry", "auto"])
def test_plain_torch_transformer_conserves_with_cp_lrp(level):
    # the registry patches nn.MultiheadAttention; the default level explains a plain torch model (no family
    # entry describes it) operation by operation
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, bias=False, activation=nn.GELU())
    model = nn.Sequential(
        nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(), nn.Linear(16 * 5, 3, bias=False)
    ).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with lrpcpp.patch(model, method="cp-lrp", level=level) as handle:
        if level == "registry":
            assert any("attention" in w for w in handle.patched.values())
        else:
            assert handle.level == "operations"
        leaf = x.clone().requires_grad_()
        out = model(leaf)[:, 1]
        (g,) = torch.autograd.grad(out.sum(), leaf)
    torch.testing.assert_close((leaf * g).flatten(1).sum(1), out.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "bad", [dict(), dict(input_ids=torch.zeros(1, 2, dtype=torch.long), inputs_embeds=torch.zeros(1, 2, 32))]
)
def test_attribute_needs_exactly_one_input(bad):
    with pytest.raises(ValueError, match="exactly one"):
        lrpcpp.attribute(build("llama"), **bad)


def test_attribute_rejects_out_of_range_targets():
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        lrpcpp.attribute(build("llama"), target=1000, **inputs("llama"))


def test_attribute_restores_training_mode():
    model = build("bert").train()
    lrpcpp.attribute(model, **inputs("bert"))
    assert model.training


@pytest.mark.parametrize("mode", ["gradient", "explicit"])
def test_attribute_freezes_parameters_for_the_call_in_gradient_mode(mode):
    model = build("llama")
    model.lm_head.weight.requires_grad_(False)  # a mix of flags, each restored as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []

    def target(out):
        seen.append(any(p.requires_grad for p in model.parameters()))
        return out.logits[:, -1, 3]

    got = lrpcpp.attribute(model, target=target, mode=mode, **inputs("llama"))
    assert seen == [mode == "explicit"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    if mode == "gradient":  # the relevance is that of a model frozen by its owner
        frozen = build("llama").requires_grad_(False)
        torch.testing.assert_close(
            lrpcpp.attribute(frozen, target=target, **inputs("llama")).relevance, got.relevance, rtol=0, atol=0
        )

    def failing(out):
        raise RuntimeError("target failed")

    with pytest.raises(RuntimeError, match="target failed"):
        lrpcpp.attribute(model, target=failing, mode=mode, **inputs("llama"))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_explicit_and_gradient_modes_agree(family, method):
    # RULES.md section 2: with epsilon -> 0 the explicit rules and gradient-times-input give the
    # same input relevance. The explicit run maps every product, softmax and linear layer to the
    # explicit lrpcpp ops; the gradient run keeps torch's own.
    model = build(family)
    kw = inputs(family)
    grad = lrpcpp.attribute(model, method=method, **kw)
    explicit = lrpcpp.attribute(model, method=method, mode="explicit", epsilon=1e-12, **kw)
    torch.testing.assert_close(explicit.output, grad.output)
    scale = float(grad.relevance.abs().max())
    torch.testing.assert_close(explicit.relevance, grad.relevance, rtol=1e-5, atol=1e-5 * scale)


def test_explicit_mode_batched_targets_and_latent():
    model = build("llama")
    kw = inputs("llama")
    many = lrpcpp.attribute(model, mode="explicit", target=[1, 2], latent=True, epsilon=1e-12, **kw)
    grad = lrpcpp.attribute(model, target=[1, 2], latent=True, **kw)
    scale = float(grad.relevance.abs().max())
    torch.testing.assert_close(many.relevance, grad.relevance, rtol=1e-5, atol=1e-5 * scale)
    for name in grad.latent:
        s = float(grad.latent[name].abs().max())
        torch.testing.assert_close(many.latent[name], grad.latent[name], rtol=1e-5, atol=1e-5 * s)


@pytest.mark.compile
def test_patched_model_compiles_fullgraph_with_the_gradient_input_ops():
    from conftest import recording_backend

    model = build("llama", dtype=torch.float32)
    ids = inputs("llama")["input_ids"]
    x = model.get_input_embeddings()(ids).detach()

    def relevance(m):
        leaf = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(m(inputs_embeds=leaf).logits[:, -1, 0].sum(), leaf)
        return (leaf * g).detach()

    seen = []
    with lrpcpp.patch(model):
        expected = relevance(model)
        torch._dynamo.reset()
        got = relevance(torch.compile(model, backend=recording_backend(seen), fullgraph=True))
    torch._dynamo.reset()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    assert any("lrpcpp.gi_scale_backward" in s for s in seen)


def test_a_family_kind_matches_a_class_or_a_base_class_by_name_however_the_names_are_given():
    """``families.is_a`` (cached per class and names): a tuple or a list of names, or one name (whose
    test is a substring test, as it always was); a subclass matches by its base class's name."""
    from lrpcpp.models.families import is_a

    class SdpaSelfAttention(nn.Linear):  # a subclass per kernel, as transformers 4.x writes them
        pass

    module = SdpaSelfAttention(2, 2)
    for names in (("Linear",), ["Linear"], "Linear", ("Other", "SdpaSelfAttention")):
        assert is_a(module, names) and is_a(module, names)  # the second from the cache
    for names in (("Conv2d",), ["Conv2d"], "Conv2d", ()):
        assert not is_a(module, names) and not is_a(module, names)


class _Lookups(nn.Module):
    """A module with an attribute of every kind the patch looks up by name."""

    kind = "class attribute"

    def __init__(self):
        super().__init__()
        self.inplace = True
        self.child = nn.Linear(2, 2)
        self.weight_p = nn.Parameter(torch.ones(2))
        self.register_buffer("scale", torch.ones(2))
        self.empty = None  # a registered name may hold None
        self.register_module("gap", None)

    @property
    def view(self):
        return self.child

    @property
    def broken(self):
        raise AttributeError("computed from something missing")


@pytest.mark.parametrize(
    "name", ["inplace", "child", "weight_p", "scale", "empty", "gap", "kind", "view", "broken", "missing", "forward"]
)
def test_the_patch_looks_names_up_as_getattr_does(name):
    """The patch's lookup of a module's attributes by name (which avoids the exception nn.Module raises
    for a missing one) finds what ``getattr(module, name, None)`` finds."""
    from lrpcpp.models.patching import _attribute

    module = _Lookups()
    expected = getattr(module, name, None)
    got = _attribute(module, name)
    assert got is expected or (callable(got) and got == expected)

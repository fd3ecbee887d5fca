"""The operation level of gradient mode (lrpcpp.models.operations): the same relevance as the family
registry where both apply, and any model explained without a family entry."""

import warnings

import lrpcpp
import pytest
import torch
from lrpcpp.models.operations import UnruledOperationError, UnruledOperationWarning
from models import build, inputs
from torch import nn
from torch.nn import functional as F

CHEAP = ["llama", "gpt2", "bert", "vit"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("family", CHEAP)
def test_operation_level_equals_the_registry(family, method, attn):
    model, kw = build(family, attn=attn), inputs(family)
    ref = lrpcpp.attribute(model, method=method, level="registry", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnruledOperationWarning)
        got = lrpcpp.attribute(model, method=method, level="operations", **kw)
    torch.testing.assert_close(got.relevance, ref.relevance, rtol=1e-10, atol=1e-12)
    assert ref.coverage is None
    assert got.coverage.unruled == {} and got.coverage.seen > 0
    assert any("scaled_dot_product_attention" in n or "matmul" in n for n in got.coverage.ruled)  # the products


@pytest.mark.parametrize("family", CHEAP)
def test_patched_forward_is_bitwise_the_plain_forward(family):
    model, kw = build(family), inputs(family)
    key = "pixel_values" if "pixel_values" in kw else "inputs_embeds"
    x = kw[key] if key == "pixel_values" else model.get_input_embeddings()(kw["input_ids"]).detach()
    plain = model(**{key: x}).logits
    with lrpcpp.patch(model, level="operations") as handle:
        assert handle.level == "operations"
        patched = model(**{key: x.clone().requires_grad_()}).logits
    assert torch.equal(patched, plain)


def test_cp_lrp_holds_the_gate_and_the_attention_weights_constant():
    # float64 transcription of RULES.md section 2 on one gated block with eager attention
    torch.manual_seed(0)
    lin = [nn.Linear(4, 4, bias=False).double() for _ in range(5)]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.gate, self.up = lin
            self.act = nn.SiLU()

        def forward(self, x):
            a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1)
            h = a @ self.v(x)
            return (self.act(self.gate(h)) * self.up(h)).sum(-1)

    x = torch.randn(1, 3, 4, dtype=torch.float64)
    for method in ("attnlrp", "cp-lrp"):
        leaf = x.clone().requires_grad_()
        with lrpcpp.patch(Block(), method=method, level="operations") as handle:
            handle.model(leaf).sum().backward()
        # reference: the registry's shares, written by hand
        q, k, v, gate, up = (m.weight for m in lin)
        ref = x.clone().requires_grad_()
        share = (lambda t, s: t.detach() + s * (t - t.detach())) if method == "attnlrp" else None
        qs, ks, vs = q @ ref.mT, k @ ref.mT, v @ ref.mT
        qs, ks, vs = (t.mT for t in (qs, ks, vs))
        if method == "attnlrp":
            qs, ks, vs = share(qs, 0.25), share(ks, 0.25), share(vs, 0.5)
        else:
            qs, ks = qs.detach(), ks.detach()
        h = torch.softmax(qs @ ks.transpose(-1, -2), -1) @ vs
        g, u = h @ gate.T, h @ up.T
        act = F.silu(g)
        if method == "attnlrp":
            stab = g + 1e-10 * torch.where(g >= 0, 1.0, -1.0)
            ident = g * (act / stab).detach()  # the identity rule: g_x = g_y * y / stab(x)
            out = share(ident, 0.5) * share(u, 0.5)
        else:
            out = act.detach() * u
        out.sum().backward()
        torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-9, atol=1e-12)


def test_unknown_architecture_is_explained_instead_of_refused():
    model = build("llama")
    kw = inputs("llama")
    ref = lrpcpp.attribute(model, **kw).relevance
    model.config.model_type = "llama_renamed"  # no family entry
    with pytest.raises(lrpcpp.UnsupportedModelError, match="register_family"):
        lrpcpp.patch(model, level="registry")
    got = lrpcpp.attribute(model, **kw)
    assert got.coverage is not None and got.coverage.unruled == {}
    torch.testing.assert_close(got.relevance, ref, rtol=1e-10, atol=1e-12)


def test_plain_torch_model_with_an_unknown_attention_class():
    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = nn.Linear(8, 24).double(), nn.Linear(8, 3).double()

        def forward(self, inputs_embeds):
            x = inputs_embeds
            q, k, v = self.qkv(x).view(*x.shape[:2], 3, 2, 4).permute(2, 0, 3, 1, 4)
            h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            return self.out(F.layer_norm(h, (8,)) + x).mean(1)

    torch.manual_seed(0)
    model, x = SelfAttention(), torch.randn(2, 5, 8, dtype=torch.float64)
    with pytest.raises(lrpcpp.UnsupportedModelError, match="SelfAttention"):
        lrpcpp.patch(model, level="registry")
    got = lrpcpp.attribute(model, inputs_embeds=x, target=1)
    assert got.coverage.unruled == {} and got.coverage.ruled["torch._C._nn.scaled_dot_product_attention"] == 1
    # reference: the shares and the layer norm's constant standard deviation by hand
    leaf = x.clone().requires_grad_()
    share = lambda t, s: t.detach() + s * (t - t.detach())  # noqa: E731
    q, k, v = model.qkv(leaf).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    h = F.scaled_dot_product_attention(share(q, 0.25), share(k, 0.25), share(v, 0.5)).transpose(1, 2).flatten(2)
    mu, sd = h.mean(-1, keepdim=True), torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5).detach()
    model.out((h - mu) / sd + leaf).mean(1)[:, 1].sum().backward()
    torch.testing.assert_close(got.relevance, leaf.grad * x, rtol=1e-9, atol=1e-12)


class _Mixer(nn.Module):
    """An attention in a class whose name does not say so."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, h):
        return self.o(F.scaled_dot_product_attention(*self.qkv(h).chunk(3, -1)))


class _MixerModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix, self.head = _Mixer(), nn.Linear(8, 2)

    def forward(self, inputs_embeds):
        h = inputs_embeds + self.mix(inputs_embeds)
        return self.head(h * torch.tanh(h)).mean(1)  # a functional activation, a product of two carriers


def test_the_default_level_explains_a_plain_torch_model_call_by_call():
    # no family entry describes a plain torch model: level="auto" is the operation level, whatever the model's
    # classes are named (the registry's module patches would leave its attention, torch.tanh and the product
    # with their plain gradient, unnoticed)
    torch.manual_seed(0)
    model, x = _MixerModel().double(), torch.randn(2, 5, 8, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, target=0)
    want = lrpcpp.attribute(model, inputs_embeds=x, target=0, level="operations")
    assert torch.equal(got.relevance, want.relevance) and got.coverage == want.coverage
    assert dict(got.coverage.ruled) == {
        "torch._C._nn.scaled_dot_product_attention": 1,
        "torch.tanh": 1,
        "Tensor.mul": 1,
    }
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(leaf)[:, 0].sum(), leaf)
    assert (got.relevance - leaf * grad).abs().max() > 0.1 * got.relevance.abs().max()  # not the plain gradient
    for level, resolved in (("auto", "operations"), ("registry", "registry")):
        with lrpcpp.patch(model, level=level) as handle:
            assert handle.level == resolved


class _Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class _WithCustomFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3).double()

    def forward(self, inputs_embeds):
        return self.lin(_Twice.apply(inputs_embeds)).sum(1)


class _SavesInputs(torch.autograd.Function):
    """As torch's checkpoint before 2.13 keeps a layer's inputs: an empty output off the relevance path."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, g):
        return None


class _ReadsGraph(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3).double()

    def forward(self, inputs_embeds):
        saver = _SavesInputs.apply(inputs_embeds)
        # what a tensor is, not a call: its graph node, whether it requires grad, whether it is a leaf
        assert saver.grad_fn is not None and saver.requires_grad and not saver.is_leaf
        return self.lin(inputs_embeds).sum(1)


def test_reading_a_custom_functions_graph_node_uses_no_function():
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    model = _ReadsGraph()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnruledOperationWarning)
        got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    assert got.coverage.unruled == {}
    plain = _ReadsGraph()
    plain.lin = model.lin
    plain.forward = lambda inputs_embeds: plain.lin(inputs_embeds).sum(1)  # the same model without the saver
    want = lrpcpp.attribute(plain, inputs_embeds=x, level="operations", strict=True)
    assert torch.equal(got.relevance, want.relevance) and got.relevance.abs().sum() > 0


def test_an_unknown_operation_is_named_in_a_warning_and_strict_raises():
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    model = _WithCustomFunction()
    with pytest.warns(UnruledOperationWarning, match=r"no rule for .*_Twice\.apply .*strict=True") as record:
        got = lrpcpp.attribute(model, inputs_embeds=x, level="operations")
    assert len([r for r in record if issubclass(r.category, UnruledOperationWarning)]) == 1
    assert got.coverage.unruled == {f"{__name__}._Twice.apply (a custom autograd.Function)": 1}
    with pytest.raises(UnruledOperationError, match=r"strict=True.*_Twice\.apply") as error:
        lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    assert isinstance(error.value, RuntimeError)
    assert error.value.names == (f"{__name__}._Twice.apply (a custom autograd.Function)",)
    assert all("forward" not in m.__dict__ for m in model.modules())  # the patch is undone


def test_level_is_checked():
    with pytest.raises(ValueError, match="level must be one of"):
        lrpcpp.patch(nn.Linear(2, 2), level="ops")
    with pytest.raises(ValueError, match="mode='gradient'"):
        lrpcpp.patch(nn.Linear(2, 2), mode="explicit", level="operations")


def test_a_shared_operand_keeps_its_memory_layout():
    # the heads of an attention are a transposed view: the share keeps that layout (no copies after it)
    from lrpcpp.models.operations import GradientRules

    rules = GradientRules()
    base = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    for x in (base.transpose(1, 2), base.permute(3, 0, 2, 1), base, base[..., ::2]):
        y = rules.share(x, 0.25)
        assert torch.equal(y, x)
        if x.is_contiguous() or x.permute(sorted(range(4), key=lambda d: -x.stride(d))).is_contiguous():
            assert y.stride() == x.stride()
        g = torch.randn_like(y)
        (got,) = torch.autograd.grad(y, base, g)
        (plain,) = torch.autograd.grad(x, base, g)
        assert torch.equal(got, 0.25 * plain)


def test_a_shared_operand_passes_its_gradient_on_in_the_layout_it_arrives_in():
    # as an element-wise product does: the gradients that F.scaled_dot_product_attention returns for
    # transposed heads, in the memory order of the projection that made them, reach it without a copy
    from lrpcpp.models.operations import GradientRules

    rules = GradientRules()
    base = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    for x in (base.transpose(1, 2), base.permute(3, 0, 2, 1), base * 1):
        reversed_layout = torch.randn(x.shape[::-1], dtype=x.dtype).permute(3, 2, 1, 0)
        for g in (torch.randn_like(x), torch.randn(x.shape, dtype=x.dtype), reversed_layout):
            arrived = []
            x.register_hook(arrived.append)
            (got,) = torch.autograd.grad(rules.share(x, 0.5), base, g, retain_graph=True)
            assert arrived[0].stride() == g.stride()
            assert torch.equal(got, torch.autograd.grad(x, base, 0.5 * g, retain_graph=True)[0])


def test_unruled_torch_functions_are_counted_and_named():
    class Angles(nn.Module):  # (atan2 of two carriers: a function of both that no rule describes)
        def forward(self, inputs_embeds):
            return torch.atan2(torch.atan2(inputs_embeds, inputs_embeds.flip(1)), inputs_embeds).sum(1)

    x = torch.randn(2, 5, 4, dtype=torch.float64)
    with pytest.warns(UnruledOperationWarning, match=r"no rule for torch\.atan2 \(x2\)"):
        got = lrpcpp.attribute(Angles(), inputs_embeds=x, level="operations")
    assert dict(got.coverage.unruled) == {"torch.atan2": 2}
    assert dict(got.coverage.passed) == {"Tensor.flip": 1, "Tensor.sum": 1}
    with pytest.raises(RuntimeError, match=r"strict=True\): torch\.atan2 has no gradient-mode rule"):
        lrpcpp.attribute(Angles(), inputs_embeds=x, level="operations", strict=True)


class _Ensembled(nn.Module):
    """A function of the hidden states vectorised with torch.vmap inside the forward (as an ensemble's
    members are, with torch.func.functional_call)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, inputs_embeds):
        h = self.a(inputs_embeds)
        return self.b(torch.vmap(lambda row: torch.tanh(row) * row)(h) + h).sum(1)


def test_calls_inside_torch_vmap_are_named_unruled():
    # inside the transform the tensors are wrappers that require no grad: the rules do not reach the
    # calls there (their plain gradient is used), which the coverage names instead of passing them silently
    torch.manual_seed(0)
    model, x = _Ensembled().double(), torch.randn(2, 5, 4, dtype=torch.float64)
    inside = " (inside a torch.func transform, such as torch.vmap)"
    with pytest.warns(UnruledOperationWarning, match=r"no rule for Tensor\.mul \(inside a torch\.func transform"):
        got = lrpcpp.attribute(model, inputs_embeds=x, level="operations")
    assert dict(got.coverage.unruled) == {"torch.tanh" + inside: 1, "Tensor.mul" + inside: 1}
    with pytest.raises(UnruledOperationError, match=r"strict=True\): torch\.tanh \(inside a torch\.func"):
        lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    # a vmap of calls whose arguments carry no relevance counts nothing
    constant = torch.vmap(torch.cos)
    model.forward = lambda inputs_embeds: _Ensembled.forward(model, inputs_embeds) + constant(x).sum((1, 2))[:, None]
    with pytest.warns(UnruledOperationWarning):
        again = lrpcpp.attribute(model, inputs_embeds=x, level="operations")
    assert dict(again.coverage.unruled) == dict(got.coverage.unruled)


class _Checkpointed(nn.Module):
    """A block checkpointed with torch.utils.checkpoint in the model's own forward."""

    def __init__(self, reentrant):
        super().__init__()
        self.a, self.b, self.reentrant = nn.Linear(4, 4), nn.Linear(4, 2), reentrant

    def forward(self, inputs_embeds):
        block = lambda h: torch.tanh(self.a(h)) * h  # noqa: E731
        h = torch.utils.checkpoint.checkpoint(block, inputs_embeds, use_reentrant=self.reentrant)
        return self.b(h).sum(1)


def test_a_block_checkpointed_by_the_forward_itself_is_recomputed_in_the_rules():
    # attribute runs the backward pass in the rules' mode: the non-reentrant checkpoint's recomputation
    # computes the tensors of the ruled forward (without it, other ones, and the backward fails), counted
    # once; the reentrant checkpoint is a custom autograd.Function, named unruled
    torch.manual_seed(0)
    model, x = _Checkpointed(False).double(), torch.randn(2, 5, 4, dtype=torch.float64)
    # (one target, and two: one backward pass of a batched seed, torch.vmap over the backward)
    got = [lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True, target=t) for t in (0, [0, 1])]
    model.forward = lambda inputs_embeds: model.b(torch.tanh(model.a(inputs_embeds)) * inputs_embeds).sum(1)
    for g, t in zip(got, (0, [0, 1])):
        want = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True, target=t)
        assert torch.equal(g.relevance, want.relevance) and g.coverage == want.coverage
    checkpointed = _Checkpointed(False).double()
    checkpointed.load_state_dict(model.state_dict())
    with lrpcpp.patch(checkpointed, level="operations"):  # a backward pass outside the mode fails, saying why
        leaf = x.clone().requires_grad_()
        explained = checkpointed(leaf)[:, 0]
        with pytest.raises(RuntimeError, match=r"checkpoints runs its forward again .* `with handle\.backward\(\):`"):
            lrpcpp.attribution.relevance_backward(explained, [leaf], explicit=False, many=False)
    # a backward pass of one's own in the patch's handle.backward(): the relevance of attribute, with torch's
    # non-reentrant checkpoint (torch.autograd.grad) and the reentrant one (Tensor.backward; named unruled, as
    # the forward cannot know where its backward runs)
    for reentrant in (False, True):
        checkpointed = _Checkpointed(reentrant).double()
        checkpointed.load_state_dict(model.state_dict())
        checkpointed.requires_grad_(False)
        leaf = x.clone().requires_grad_()
        with lrpcpp.patch(checkpointed, level="operations") as handle, warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            explained = checkpointed(leaf)[:, 0].sum()
            with handle.backward():
                if reentrant:
                    explained.backward()
                else:
                    (leaf.grad,) = torch.autograd.grad(explained, leaf)
        assert torch.allclose(leaf * leaf.grad, got[0].relevance, rtol=1e-12, atol=0)
        unruled = [str(w.message) for w in seen if issubclass(w.category, UnruledOperationWarning)]
        assert len(unruled) == reentrant and all("CheckpointFunction.apply" in m for m in unruled)
    with pytest.raises(UnruledOperationError, match=r"CheckpointFunction\.apply \(a custom autograd\.Function\)"):
        lrpcpp.attribute(_Checkpointed(True).double(), inputs_embeds=x, level="operations", strict=True)


class _Gated(nn.Module):
    def forward(self, h):
        return torch.tanh(h) * h


class _WithScripted(nn.Module):
    """A submodule compiled to TorchScript, called on the hidden states and on a constant."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)
        self.scripted = torch.jit.script(_Gated())

    def forward(self, inputs_embeds):
        h = self.a(inputs_embeds)
        return self.b(self.scripted(h) + self.scripted(torch.ones_like(h))).sum(1)


def test_a_torchscript_module_is_named_unruled_where_relevance_enters_it():
    # its calls run without Python's torch function dispatch: the rules see none of them
    model, x = _WithScripted().double(), torch.randn(2, 5, 4, dtype=torch.float64)
    own = model.scripted.__dict__.get("forward")  # (a TorchScript module keeps its method there)
    name = "scripted (a TorchScript module: the rules do not see its calls)"
    with pytest.warns(UnruledOperationWarning, match=r"no rule for scripted \(a TorchScript module"):
        got = lrpcpp.attribute(model, inputs_embeds=x, level="operations")
    assert dict(got.coverage.unruled) == {name: 1}  # (its call on a constant counted nothing)
    with pytest.raises(UnruledOperationError, match=r"strict=True\): scripted \(a TorchScript module"):
        lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    assert model.scripted.__dict__.get("forward") is own  # the patch is undone


# beta * c + alpha * (a @ b) in every spelling of torch's affine products, the factors by position
# or by name (Bloom's attention calls torch.baddbmm with batch1= and batch2=)
_AFFINE_PRODUCTS = {
    "addmm": lambda c, a, b: torch.addmm(c[0], a[0], b[0].mT, beta=0.5, alpha=2.0),
    "addmm, named": lambda c, a, b: torch.addmm(c[0], mat1=a[0], mat2=b[0].mT, beta=0.5, alpha=2.0),
    "Tensor.addmm": lambda c, a, b: c[0].addmm(a[0], mat2=b[0].mT, beta=0.5, alpha=2.0),
    "baddbmm": lambda c, a, b: torch.baddbmm(c, a, b.mT, beta=0.5, alpha=2.0),
    "baddbmm, named": lambda c, a, b: torch.baddbmm(c, batch1=a, batch2=b.mT, beta=0.5, alpha=2.0),
    "Tensor.baddbmm": lambda c, a, b: c.baddbmm(batch1=a, batch2=b.mT, beta=0.5, alpha=2.0),
    "addbmm": lambda c, a, b: torch.addbmm(c[0], batch1=a, batch2=b.mT, beta=0.5, alpha=2.0),
    "addcmul": lambda c, a, b: torch.addcmul(c[..., :4], a, b, value=2.0),
    "Tensor.addcmul": lambda c, a, b: c[..., :4].addcmul(a, tensor2=b, value=2.0),
    # (a matrix times a vector, and an outer product of two vectors: the first item's)
    "addmv": lambda c, a, b: torch.addmv(c[0, :, 0], a[0], b[0, 0], beta=0.5, alpha=2.0),
    "Tensor.addmv, named": lambda c, a, b: c[0, :, 0].addmv(mat=a[0], vec=b[0, 0], beta=0.5, alpha=2.0),
    "addr": lambda c, a, b: torch.addr(c[0, :4, :4], a[0, 0], b[0, 1], beta=0.5, alpha=2.0),
    "Tensor.addr, named": lambda c, a, b: c[0, :4, :4].addr(vec1=a[0, 0], vec2=b[0, 1], beta=0.5, alpha=2.0),
}
_WRITTEN_OUT = {
    "addcmul": lambda c, a, b: c[..., :4] + 2.0 * (a * b),
    "addmm": lambda c, a, b: 0.5 * c[0] + 2.0 * (a[0] @ b[0].mT),
    "baddbmm": lambda c, a, b: 0.5 * c + 2.0 * (a @ b.mT),
    "addbmm": lambda c, a, b: 0.5 * c[0] + 2.0 * (a @ b.mT).sum(0),
    "addmv": lambda c, a, b: 0.5 * c[0, :, 0] + 2.0 * (a[0] @ b[0, 0]),
    "addr": lambda c, a, b: 0.5 * c[0, :4, :4] + 2.0 * (a[0, 0, :, None] * b[0, 1, None, :]),
}


class _AffineProduct(nn.Module):
    def __init__(self, product):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(3, 5)
        self.product = product

    def forward(self, inputs_embeds):
        x = inputs_embeds  # [2, 5, 3]
        return self.product(self.c(x), self.a(x), self.b(x)).sum()


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("spelling", sorted(_AFFINE_PRODUCTS))
def test_affine_products_split_the_relevance_of_their_two_factors(spelling, method):
    torch.manual_seed(0)
    model = _AffineProduct(_AFFINE_PRODUCTS[spelling]).double()
    written = _AffineProduct(_WRITTEN_OUT[spelling.split(",")[0].removeprefix("Tensor.")]).double()
    written.load_state_dict(model.state_dict())
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, target=lambda y: y, level="operations", method=method)
    want = lrpcpp.attribute(written, inputs_embeds=x, target=lambda y: y, level="operations", method=method)
    assert dict(got.coverage.unruled) == {}
    assert sum(got.coverage.ruled.values()) == 1
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-12, atol=1e-14)
    # the product's relevance is split between a and b, not all of it passed as the plain gradient
    plain = x * torch.autograd.grad(model(x.requires_grad_()), x)[0]
    assert (got.relevance - plain).abs().max() > 1e-3


# clamp in its spellings: an element-wise function of one carrier, the identity rule as hardtanh has it
_CLAMPS = {
    "torch.clamp": lambda h: torch.clamp(h, -0.5, 0.5),
    "Tensor.clamp": lambda h: h.clamp(min=-0.5, max=0.5),
    "torch.clip": lambda h: torch.clip(h, -0.5, 0.5),
    "Tensor.clamp_": lambda h: (h * 1).clamp_(-0.5, 0.5),
    "clamp_min and clamp_max": lambda h: h.clamp_min(-0.5).clamp_max(0.5),
}


class _Clamped(nn.Module):
    def __init__(self, clamp):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)
        self.clamp = clamp

    def forward(self, inputs_embeds):
        return self.b(self.clamp(self.a(inputs_embeds))).sum(1)


@pytest.mark.parametrize("spelling", sorted(_CLAMPS))
def test_clamp_takes_the_identity_rule(spelling):
    torch.manual_seed(0)
    model = _Clamped(_CLAMPS[spelling]).double()
    if spelling == "clamp_min and clamp_max":  # two identity-rule steps, each with its stabiliser
        reference = _Clamped(lambda h: F.hardtanh(F.hardtanh(h, -0.5, 1e30), -1e30, 0.5)).double()
    else:
        reference = _Clamped(lambda h: F.hardtanh(h, -0.5, 0.5)).double()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    want = lrpcpp.attribute(reference, inputs_embeds=x, level="operations")
    assert not got.coverage.unruled
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-12, atol=1e-15)
    plain = x * torch.autograd.grad(model(x.requires_grad_())[:, got.target].diagonal().sum(), x)[0]
    assert (got.relevance - plain).abs().max() > 1e-3  # the rule differs from the clipped gradient


def test_clamp_with_bounds_that_carry_relevance_is_a_selection():
    # an element-wise max and min of carriers: the selected value takes all of the relevance (its own
    # gradient), as torch.maximum and torch.minimum have it
    torch.manual_seed(0)
    model = _Clamped(lambda h: torch.clamp(h, min=-h.flip(1).abs(), max=h.flip(1).abs())).double()
    reference = _Clamped(lambda h: torch.minimum(torch.maximum(h, -h.flip(1).abs()), h.flip(1).abs())).double()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in (model, reference):
            m.a.bias.zero_()
            m.b.bias.zero_()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    want = lrpcpp.attribute(reference, inputs_embeds=x, level="operations", strict=True)
    assert got.coverage.ruled == {"torch.clamp": 1}
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got.relevance.sum((1, 2)), got.output, rtol=1e-10, atol=1e-12)


# linear systems whose matrix carries relevance (a gated delta rule's chunk transform): the matrix is a
# divisor, held constant, and the solution is linear in the right-hand side
_SOLVES = {
    "torch.linalg.solve_triangular": lambda a, b: torch.linalg.solve_triangular(a, b, upper=False, unitriangular=True),
    "solve_triangular, left=False": lambda a, b: (
        torch.linalg.solve_triangular(a.mT, b.mT, upper=True, left=False, unitriangular=True).mT
    ),
    "torch.linalg.solve": lambda a, b: torch.linalg.solve(a, b),
    "torch.triangular_solve": lambda a, b: torch.triangular_solve(b, a, upper=False, unitriangular=True).solution,
    "torch.linalg.inv": lambda a, b: torch.linalg.inv(a) @ b,  # the inverse held constant, as reciprocal is
}


class _Solved(nn.Module):
    def __init__(self, solve):
        super().__init__()
        self.k, self.v, self.o = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)
        self.solve = solve

    def forward(self, inputs_embeds):
        k = self.k(inputs_embeds)  # [2, 5, 4]
        a = torch.eye(5, dtype=k.dtype) + 0.1 * (k @ k.mT).tril(-1)  # unit lower triangular, [2, 5, 5]
        return self.o(self.solve(a, self.v(inputs_embeds))).sum(1)


@pytest.mark.filterwarnings("ignore:torch.triangular_solve is deprecated")
@pytest.mark.parametrize("spelling", sorted(_SOLVES))
def test_a_linear_system_holds_its_matrix_constant(spelling):
    torch.manual_seed(0)
    model = _Solved(_SOLVES[spelling]).double()
    reference = _Solved(lambda a, b: torch.linalg.inv(a.detach()) @ b).double()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    want = lrpcpp.attribute(reference, inputs_embeds=x, level="operations", strict=True)
    assert not got.coverage.unruled
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-10, atol=1e-14)
    plain = x * torch.autograd.grad(model(x.requires_grad_())[:, got.target].diagonal().sum(), x)[0]
    assert (got.relevance - plain).abs().max() > 1e-3  # the matrix's path is cut


class _LongConvolution(nn.Module):
    """A causal convolution along the sequence with a kernel as long as it (Mega's), by FFT or as the
    product with its Toeplitz matrix."""

    def __init__(self, by_fft):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)
        self.kernel = nn.Parameter(torch.randn(4, 6))  # [channels, sequence]
        self.by_fft = by_fft

    def forward(self, inputs_embeds):
        h = torch.tanh(self.a(inputs_embeds)).transpose(1, 2)  # [batch, channels, sequence]
        n = h.shape[-1]
        if self.by_fft:
            spectrum = torch.fft.rfft(h, n=2 * n) * torch.fft.rfft(self.kernel, n=2 * n)
            y = torch.fft.irfft(spectrum, n=2 * n)[..., :n]
        else:
            i = torch.arange(n)
            lag = (i[:, None] - i[None, :]).clamp_min(0)
            toeplitz = torch.where(i[:, None] >= i[None, :], self.kernel[:, lag], 0.0)  # [channels, out, in]
            y = (toeplitz @ h[..., None])[..., 0]
        return self.b(y.transpose(1, 2)).sum(1)


def test_a_convolution_by_fft_is_a_linear_map():
    torch.manual_seed(0)
    model, direct = _LongConvolution(True).double(), _LongConvolution(False).double()
    direct.load_state_dict(model.state_dict())
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    want = lrpcpp.attribute(direct, inputs_embeds=x, level="operations", strict=True)
    assert got.coverage.passed["torch._C._fft.fft_irfft"] == 1
    torch.testing.assert_close(got.output, want.output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-10, atol=1e-14)


class _ClippedSqrt(torch.autograd.Function):
    """A square root whose gradient is clipped (RecurrentGemma's): its forward is one element-wise
    function of its input."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / torch.sqrt(torch.clip(4.0 * x, min=1e-2))


class _ScaledSqrt(_ClippedSqrt):
    """More than one step in its forward: no rule is known for it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sqrt(x) * 2.0


class _Rooted(nn.Module):
    def __init__(self, root):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)
        self.root = root

    def forward(self, inputs_embeds):
        return self.b(self.root(torch.sigmoid(self.a(inputs_embeds)))).sum(1)


def test_a_custom_function_of_one_element_wise_step_takes_its_identity_rule():
    torch.manual_seed(0)
    model, reference = _Rooted(_ClippedSqrt.apply).double(), _Rooted(torch.sqrt).double()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    want = lrpcpp.attribute(reference, inputs_embeds=x, level="operations", strict=True)
    assert got.coverage.ruled[f"{__name__}._ClippedSqrt.apply (a custom autograd.Function)"] == 1
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-12, atol=1e-15)
    # its own backward (the clipped gradient) is not used: the gradient of sqrt's identity rule is
    plain = x * torch.autograd.grad(model(x.requires_grad_())[:, got.target].diagonal().sum(), x)[0]
    assert (got.relevance - plain).abs().max() > 1e-3
    with pytest.raises(UnruledOperationError, match="_ScaledSqrt.apply"):
        lrpcpp.attribute(_Rooted(_ScaledSqrt.apply).double(), inputs_embeds=x, level="operations", strict=True)


@pytest.mark.parametrize("write", ["add_", "+=", "setitem"])
def test_a_custom_function_output_written_in_place_keeps_its_forward(write):
    def root_then_write(h):
        y = _ClippedSqrt.apply(h)
        z = y * 1.0  # the function's output read (ruled) before it is written
        if write == "add_":
            y.add_(1.0)
        elif write == "+=":
            y += 1.0
        else:
            y[..., 0] = 1.0
        return y + z

    torch.manual_seed(0)
    model = _Rooted(root_then_write).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    with pytest.warns(UnruledOperationWarning):  # the write into its output is the function's own backward
        got = lrpcpp.attribute(model, inputs_embeds=x, level="operations")
    with torch.no_grad():
        torch.testing.assert_close(got.output, model(x)[:, got.target].diagonal(), rtol=0, atol=0)
    assert torch.isfinite(got.relevance).all()


class _Attention(nn.Module):
    def __init__(self, stabilised):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.stabilised = stabilised

    def forward(self, inputs_embeds):
        x = inputs_embeds
        scores = self.q(x) @ self.k(x).mT
        if self.stabilised:  # the maximum's own gradient (a selection) cancels in the softmax's
            scores = scores - scores.max(dim=-1, keepdim=True).values
        return (torch.softmax(scores, -1) @ self.v(x)).sum(1)


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_a_softmax_less_its_row_maximum_has_the_relevance_of_the_softmax(method):
    torch.manual_seed(0)
    model, plain = _Attention(True).double(), _Attention(False).double()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", method=method, strict=True)
    want = lrpcpp.attribute(plain, inputs_embeds=x, level="operations", method=method)
    assert got.coverage.passed["Tensor.max"] == 1
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-10, atol=1e-14)


class _FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.b(F.relu(self.a(x)) + torch.relu(-self.a(x)))


@pytest.mark.parametrize(
    "build_model", [lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)), _FunctionalRelu]
)
@pytest.mark.parametrize("level", ["registry", "operations"])
def test_relu_keeps_its_own_gradient_which_is_the_identity_rule(build_model, level):
    """relu(x) = relu'(x) x: relu's gradient is the identity rule's gradient form exactly, so a model of
    linear maps and ReLUs (as a module or as F.relu / torch.relu) keeps its plain input gradient, bit
    for bit, also where a pre-activation is tiny (the factor y / (x + eps) = x / (x + eps) would not be 1
    there: 0.91 at x = 1e-9 with eps = 1e-10)."""
    torch.manual_seed(0)
    model = build_model().double()
    first = model[0] if isinstance(model, nn.Sequential) else model.a
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():  # unit 0's pre-activation of item 0 is 1e-9
        first.bias[0] -= (x[0] @ first.weight[0] + first.bias[0]) - 1e-9
    x.requires_grad_(True)
    (plain,) = torch.autograd.grad(model(x).sum(), x)
    with lrpcpp.patch(model, level=level) as handle:
        xx = x.detach().clone().requires_grad_(True)
        (patched,) = torch.autograd.grad(model(xx).sum(), xx)
        assert handle.level == level and (level == "registry" or not handle.coverage.unruled)
    assert torch.equal(patched, plain)


@pytest.mark.compile
@pytest.mark.slow
@pytest.mark.parametrize("level", ["registry", "operations"])
def test_a_patched_relu_module_compiles_fullgraph(level):
    """The ReLU unit runs its own forward with the rule mode taken off the stack: dynamo traces that
    without a graph break, and the traced graph gives the eager gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 1)).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    try:
        with lrpcpp.patch(model, level=level):
            (eager,) = torch.autograd.grad(model(x).sum(), x)
            (got,) = torch.autograd.grad(torch.compile(model, fullgraph=True, backend="eager")(x).sum(), x)
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, eager)


def test_a_torch_without_redispatch_counts_a_python_torch_function_as_unruled(monkeypatch):
    # F.multi_head_attention_forward is written in Python: its body runs under the rules through
    # torch.overrides.redispatch_function; a torch without it (older releases) runs it as one call,
    # whose plain gradient is reported, never passed off as ruled
    from lrpcpp.models import tracking
    from test_operation_deploy import _TorchAttention

    torch.manual_seed(0)
    model, x = _TorchAttention().eval(), torch.randn(2, 5, 8)
    if tracking.redispatch_function is not None:  # (this torch has it: the body is ruled)
        assert lrpcpp.attribute(model, inputs_embeds=x, target=1, level="operations").coverage.unruled == {}
    monkeypatch.setattr(tracking, "redispatch_function", None)
    with pytest.warns(UnruledOperationWarning, match=r"no rule for .*multi_head_attention_forward \(x1\)"):
        got = lrpcpp.attribute(model, inputs_embeds=x, target=1, level="operations")
    assert list(got.coverage.unruled) == ["torch.nn.functional.multi_head_attention_forward"]
    with pytest.raises(UnruledOperationError, match=r"multi_head_attention_forward has no gradient-mode rule"):
        lrpcpp.attribute(model, inputs_embeds=x, target=1, level="operations", strict=True)


@pytest.mark.parametrize("how", ["torch.compile(layer)", "torch.compile(model)", "layer.compile()"])
def test_a_compiled_module_is_explained_as_its_eager_module(how):
    """A compiled region entered with the rules' mode active would run its traced calls through the
    mode a second time (torch 2.13: every product's shares taken twice). At the operation level a
    compiled module runs eagerly for the call, and is put back compiled."""
    model, kw = build("bert"), inputs("bert")
    ref = lrpcpp.attribute(model, level="operations", **kw)
    layer = model.bert.encoder.layer[0]
    explained, compiled = model, None
    if how == "torch.compile(layer)":
        model.bert.encoder.layer[0] = compiled = torch.compile(layer, backend="eager")
    elif how == "torch.compile(model)":
        explained = compiled = torch.compile(model, backend="eager")
    else:
        layer.compile(backend="eager")
    saved = dict(compiled.__dict__ if compiled is not None else layer.__dict__)
    with lrpcpp.patch(explained, level="operations") as handle:
        assert any(w.startswith("compiled") for w in handle.patched.values())
    got = lrpcpp.attribute(explained, level="operations", **kw)
    assert torch.equal(got.relevance, ref.relevance)
    assert got.coverage == ref.coverage
    after = compiled.__dict__ if compiled is not None else layer.__dict__
    assert after.keys() == saved.keys() and all(after[k] is saved[k] for k in saved)  # compiled again

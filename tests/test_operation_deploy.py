"""Deploying the operation level: torch.export programs and TorchScript archives reproduce
lrpcpp.attribute(level="operations"), and so does lrpcpp.deploy.compile_attribute, whose
torch.compile(fullgraph=True) traces the rule mode."""

import warnings

import lrpcpp
import pytest
import test_operation_vision as vision
import torch
from conftest import fails_in_torch_before_2_13, needs_redispatch
from lrpcpp import deploy
from lrpcpp.models.operations import UnruledOperationError, UnruledOperationWarning
from models import build as build_registered
from models import inputs
from test_deploy import assert_same_relevance, hooks_and_flags
from test_operation_families import build as build_unregistered
from test_operation_level import _ClippedSqrt, _Rooted, _WithCustomFunction
from torch import nn
from torch.nn import functional as F

# (model, level): OLMo2 has no family entry ("auto" is the operation level); llama has one and is
# forced to the operation level
CASES = [("olmo2", "auto"), ("llama", "operations")]


def _model(family: str):
    if family == "olmo2":
        return build_unregistered("olmo2").to(torch.float32)
    return build_registered(family, dtype=torch.float32)


def _example(family: str, seq: int = 6):
    ids = inputs("llama", seq=seq)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    return ids, mask


def _expected(model, ids, mask):
    embeds = model.get_input_embeddings()(ids).detach()
    expected = lrpcpp.attribute(model, inputs_embeds=embeds, attention_mask=mask, level="operations")
    assert expected.coverage is not None  # explained at the operation level
    return embeds, expected


@pytest.mark.compile
@pytest.mark.parametrize("family,level", CASES)
def test_exported_program_gives_the_relevance_of_the_operation_level(family, level, tmp_path):
    model = _model(family)
    ids, mask = _example(family)
    embeds, expected = _expected(model, ids, mask)
    before = hooks_and_flags(model)
    path = tmp_path / "model.pt2"
    deploy.export_program(model, path, input_ids=ids, attention_mask=mask, level=level, check=False)
    assert hooks_and_flags(model) == before
    program = torch.export.load(str(path)).module()
    assert any("lrpcpp.gi_grad_scale" in str(n.target) for n in program.graph.nodes)  # the rules are in the graph
    for x, m in ((embeds, mask), (embeds[:, 1:], mask[:, 1:])):  # the example and another length
        want = lrpcpp.attribute(model, inputs_embeds=x, attention_mask=m, level="operations")
        got = deploy.attribute_deployed(program, x, m, target=want.target)
        assert_same_relevance(got.relevance, want.relevance, rtol=1e-6)
    assert torch.equal(deploy.attribute_deployed(program, embeds, mask).target, expected.target)


@pytest.mark.compile
@pytest.mark.parametrize("family,level", CASES)
def test_archive_gives_the_relevance_of_the_operation_level(family, level, tmp_path):
    model = _model(family)
    ids, mask = _example(family)
    embeds, expected = _expected(model, ids, mask)
    before = hooks_and_flags(model)
    path = tmp_path / "model.pt"
    info = deploy.export_archive(model, path, input_ids=ids, attention_mask=mask, level=level)  # check=True as well
    assert info["level"] == "operations"
    assert hooks_and_flags(model) == before
    archive = torch.jit.load(str(path))
    got = deploy.attribute_deployed(archive, embeds, mask, target=expected.target)
    assert_same_relevance(got.relevance, expected.relevance, rtol=1e-6)


def _counting_backend(graphs):
    def backend(gm, example_inputs):  # the graphs as dynamo traced them, run as they are
        graphs.append(gm)
        return gm.forward

    return backend


@pytest.mark.compile
@pytest.mark.slow
@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("family,level", CASES)
def test_compile_attribute_gives_the_relevance_of_the_operation_level(family, level, method):
    # fullgraph=True: a graph break is an error. The traced graph run as dynamo recorded it gives
    # exactly the eager relevance; a second length compiles once more, with dynamic shapes
    model, reference = _model(family), _model(family)  # the same weights
    before = hooks_and_flags(model)
    graphs = []
    torch._dynamo.reset()
    try:
        with deploy.compile_attribute(model, method=method, level=level, backend=_counting_backend(graphs)) as explain:
            for seq in (6, 6, 4, 9):
                ids, mask = _example(family, seq)
                got = explain(input_ids=ids, attention_mask=mask)
                want = lrpcpp.attribute(
                    reference, method=method, input_ids=ids, attention_mask=mask, level="operations"
                )
                assert torch.equal(got.target, want.target)
                assert torch.equal(got.relevance, want.relevance)
                assert got.coverage is None  # a compiled forward counts nothing
            assert len(graphs) == 2
    finally:
        torch._dynamo.reset()
    assert any("lrpcpp.gi_identity" in str(n.target) for g in graphs for n in g.graph.nodes)  # the rules, traced
    assert hooks_and_flags(model) == before


@pytest.mark.compile
@pytest.mark.slow
@fails_in_torch_before_2_13("inductor's C++ for the graph does not compile ('tmp2' was not declared)")
def test_compile_attribute_with_inductor_gives_the_relevance_of_the_operation_level():
    # the default backend, inductor: generated kernels, so equal up to rounding (observed: 5e-7 of
    # the largest relevance)
    model, reference = _model("olmo2"), _model("olmo2")
    torch._dynamo.reset()
    try:
        with deploy.compile_attribute(model) as explain:  # "auto": OLMo2 has no family entry
            for seq in (6, 9):
                ids, mask = _example("olmo2", seq)
                got = explain(input_ids=ids, attention_mask=mask)
                want = lrpcpp.attribute(reference, input_ids=ids, attention_mask=mask)
                assert want.coverage is not None  # the operation level
                assert torch.equal(got.target, want.target)
                assert_same_relevance(got.relevance, want.relevance, rtol=1e-5)
    finally:
        torch._dynamo.reset()


@pytest.mark.compile
@pytest.mark.parametrize("name", ["deit", "swin", "convnext"])
def test_compile_attribute_explains_vision_models_at_the_operation_level(name):
    # vision families without a family entry ("auto"): pixels in, the eager relevance out
    model, reference = (vision.MODELS[name]().to(torch.float32) for _ in range(2))  # the same weights
    x = vision._pixels().to(torch.float32)
    torch._dynamo.reset()
    try:
        with deploy.compile_attribute(model, backend=_counting_backend([])) as explain:
            got = explain(pixel_values=x, target=1)
    finally:
        torch._dynamo.reset()
    want = lrpcpp.attribute(reference, pixel_values=x, target=1)
    assert want.coverage is not None  # the operation level
    assert torch.equal(got.relevance, want.relevance)


@pytest.mark.compile
def test_compile_attribute_names_unruled_operations_once_and_strict_raises():
    # the compiled forward counts nothing; the eager forward of the first call warns (or raises)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    model = _WithCustomFunction()
    torch._dynamo.reset()
    try:
        with pytest.warns(UnruledOperationWarning, match=r"no rule for .*_Twice\.apply") as record:
            with deploy.compile_attribute(model, level="operations", backend="eager") as explain:
                got = [explain(inputs_embeds=x, target=1) for _ in range(2)]
        assert len([r for r in record if issubclass(r.category, UnruledOperationWarning)]) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnruledOperationWarning)
            want = lrpcpp.attribute(model, inputs_embeds=x, target=1, level="operations")
        assert all(torch.equal(g.relevance, want.relevance) for g in got)
        with deploy.compile_attribute(model, level="operations", backend="eager", strict=True) as explain:
            with pytest.raises(RuntimeError, match=r"strict=True.*_Twice\.apply"):
                explain(inputs_embeds=x, target=1)
    finally:
        torch._dynamo.reset()
    assert all("forward" not in m.__dict__ for m in model.modules())  # the patch is undone


class _TorchAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention, self.out = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, inputs_embeds):
        h, _ = self.attention(inputs_embeds, inputs_embeds, inputs_embeds, need_weights=False)
        return self.out(h + inputs_embeds).mean(1)


@needs_redispatch
@pytest.mark.compile
def test_a_patched_model_compiled_by_hand_never_runs_such_a_function_without_its_rules():
    # torch.compile of the patched model itself: with fullgraph=True an error names the cause (dynamo
    # puts the rules' message in its own); without, dynamo breaks the graph there and the function runs
    # eagerly, with the rules: the relevance of the eager forward, not the plain gradient
    torch.manual_seed(0)
    model, x = _TorchAttention().eval().requires_grad_(False), torch.randn(2, 5, 8)

    def relevance(m):
        leaf = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(m(leaf)[:, 1].sum(), leaf)
        return grad * x

    plain = relevance(model)
    torch._dynamo.reset()
    try:
        with lrpcpp.patch(model, level="operations", strict=True):
            eager = relevance(model)
            with pytest.raises(Exception, match=r"records a torch function written in Python .* as one call"):
                relevance(torch.compile(model, backend="eager", fullgraph=True))
            torch._dynamo.reset()
            got = relevance(torch.compile(model, backend="eager"))
    finally:
        torch._dynamo.reset()
    assert not torch.allclose(eager, plain)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-7)


# what the operation level rules in an eager forward and a compiled one cannot: the calls in the body
# of F.multi_head_attention_forward, which dynamo records as one call that would run without the rules
# (the plain gradient); RecurrentGemma's clipped square root, a custom autograd.Function whose backward
# the identity rule of sqrt takes the place of, and whose own backward the compiled graph keeps
_UNCOMPILABLE = {
    "a function whose body the rules run": pytest.param(
        lambda: (_TorchAttention().eval(), torch.randn(2, 5, 8)),
        r"multi_head_attention_forward.*records as one call",
        marks=needs_redispatch,
    ),
    "a custom function ruled in place of its backward": pytest.param(
        lambda: (_Rooted(_ClippedSqrt.apply).double().eval(), torch.randn(2, 5, 3, dtype=torch.float64)),
        r"rules \S*_ClippedSqrt\.apply .* which torch\.compile keeps",
    ),
}


@pytest.mark.compile
@pytest.mark.parametrize("build, message", list(_UNCOMPILABLE.values()), ids=list(_UNCOMPILABLE))
def test_compile_attribute_refuses_what_a_compiled_forward_cannot_rule(build, message):
    # refused on the first call, the model left as it was; eager, every call is ruled
    torch.manual_seed(0)
    model, x = build()
    before = hooks_and_flags(model)
    torch._dynamo.reset()
    try:
        with deploy.compile_attribute(model, level="operations", backend="eager") as explain:
            with pytest.raises(RuntimeError, match=message):
                explain(inputs_embeds=x, target=1)
    finally:
        torch._dynamo.reset()
    assert hooks_and_flags(model) == before
    assert lrpcpp.attribute(model, inputs_embeds=x, target=1, level="operations", strict=True).coverage.unruled == {}


class _Unruled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)

    def forward(self, inputs_embeds):
        h = self.a(inputs_embeds)
        return torch.atan2(h, h.flip(-1)).sum(1)  # (a function of two carriers without a rule)


@pytest.mark.compile
def test_strict_holds_in_a_patched_model_compiled_by_hand():
    # a compiled forward counts no calls, but one without a rule still stops it with strict=True: with
    # fullgraph=True, in dynamo's error; without, dynamo runs the call eagerly, which names it
    model, x = _Unruled().double().eval().requires_grad_(False), torch.randn(2, 5, 3, dtype=torch.float64)
    torch._dynamo.reset()
    try:
        with lrpcpp.patch(model, level="operations", strict=True):
            with pytest.raises(Exception, match=r"strict=True\): a call of the compiled forward has no gradient-mode"):
                torch.compile(model, backend="eager", fullgraph=True)(x.clone().requires_grad_())
            torch._dynamo.reset()
            with pytest.raises(UnruledOperationError, match=r"torch\.atan2 has no gradient-mode rule") as error:
                torch.compile(model, backend="eager")(x.clone().requires_grad_())
            assert list(error.value.names) == ["torch.atan2"]
    finally:
        torch._dynamo.reset()


class _FromParameters(nn.Module):
    # tensors computed from parameters alone (``1 + scale``, ``w * 2``): no relevance carriers, until
    # relevance-carrying values are written into one in place
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.scale = nn.Parameter(torch.randn(3, dtype=torch.float64))

    def forward(self, inputs_embeds):
        y = F.linear(inputs_embeds, self.w * 2) * (1 + self.scale)  # one carrier: no product rule
        held = self.scale * torch.ones_like(y)  # from parameters alone, until ...
        held.add_(y)  # ... relevance-carrying values are written into it
        return (held * y).sum(1)  # a product of two carriers: half the gradient each (attnlrp)


@pytest.mark.compile
def test_a_patched_model_compiles_fullgraph_with_parameters_that_require_grad():
    # torch.compile of the patched model itself: the marks of the tensors computed from parameters
    # alone are traced; their products with the input are no products of two carriers
    torch.manual_seed(0)
    model, x = _FromParameters(), torch.randn(2, 5, 4, dtype=torch.float64)

    def relevance(m):
        leaf = x.clone().requires_grad_()
        m(inputs_embeds=leaf)[:, 1].sum().backward()
        return leaf.grad * x

    torch._dynamo.reset()
    try:
        with lrpcpp.patch(model, level="operations"):
            eager = relevance(model)
            got = relevance(torch.compile(model, backend="eager", fullgraph=True))
    finally:
        torch._dynamo.reset()
    # reference: the plain gradient with the parameters held constant (linear in the input)
    w, scale = model.w.detach(), model.scale.detach()
    leaf = x.clone().requires_grad_()
    half = lambda t: t.detach() + 0.5 * (t - t.detach())  # noqa: E731
    y = F.linear(leaf, w * 2) * (1 + scale)
    (half(scale + y) * half(y)).sum(1)[:, 1].sum().backward()
    torch.testing.assert_close(got, leaf.grad * x, rtol=1e-12, atol=1e-14)
    assert torch.equal(got, eager)

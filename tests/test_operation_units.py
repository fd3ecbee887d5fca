"""Module units of the operation level: the identity-rule units (activations, RMSNorms) apply the
rule to their own calls, without torch's function dispatch, where the rules' mode is the one active
mode; every other module's calls, those of the torch.nn modules whose forward is one torch function
(``nn.Linear``, ``nn.LayerNorm``, ``nn.Dropout``, ``nn.Embedding``, convolutions) among them, reach
the mode through the dispatch. The same relevance and coverage as through the dispatch alone, which
the units take where another mode is active too."""

import lrpcpp
import pytest
import torch
from lrpcpp.models.operations import GradientRules
from models import build, inputs
from torch import nn
from torch.overrides import TorchFunctionMode


class _PassThrough(TorchFunctionMode):
    """Another torch function mode, below the rules' mode: the rules' mode is then not alone, and
    every call reaches it through torch's dispatch."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.fixture
def direct_calls(monkeypatch):
    """Each unit call's answer to whether it may apply the rules without the dispatch."""
    taken = []
    alone = GradientRules.alone

    def counted(self):
        result = alone(self)
        taken.append(result)
        return result

    monkeypatch.setattr(GradientRules, "alone", counted)
    return taken


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "vit"])
def test_units_rule_their_call_as_the_dispatch_does(family, method, direct_calls):
    model, kw = build(family), inputs(family)
    direct = lrpcpp.attribute(model, method=method, level="operations", **kw)
    assert any(direct_calls), "no unit applied its rules without the dispatch"
    direct_calls.clear()
    with _PassThrough():
        dispatched = lrpcpp.attribute(model, method=method, level="operations", **kw)
    assert direct_calls and not any(direct_calls)
    assert torch.equal(direct.relevance, dispatched.relevance)
    assert torch.equal(direct.output, dispatched.output)
    assert direct.coverage == dispatched.coverage
    assert direct.coverage.unruled == {}


class _Block(nn.Module):
    """Linear, LayerNorm, Dropout and GELU modules around a product of two relevance carriers."""

    def __init__(self):
        super().__init__()
        self.up, self.gate, self.down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8, bias=False)
        self.norm, self.drop, self.act = nn.LayerNorm(8), nn.Dropout(0.1), nn.GELU()

    def forward(self, x):
        h = self.norm(x)
        return self.down(self.drop(self.act(self.gate(h)) * self.up(h))) + x


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(_Block(), _Block())

    def forward(self, inputs_embeds):
        return self.blocks(inputs_embeds)


def test_unit_calls_are_counted_under_their_functions_names():
    torch.manual_seed(0)
    model = _Blocks().double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, target=lambda out: out.sum(dim=(1, 2)), level="operations")
    assert got.coverage.unruled == {}
    assert got.coverage.passed["torch._C._nn.linear"] == 6
    assert got.coverage.passed["torch.nn.functional.dropout"] == 2
    assert got.coverage.ruled["torch.nn.functional.layer_norm"] == 2
    assert got.coverage.ruled["torch.ops.lrpcpp.gi_identity"] == 2  # the GELUs
    assert got.coverage.ruled["Tensor.mul"] == 2
    with _PassThrough():
        dispatched = lrpcpp.attribute(
            model, inputs_embeds=x, target=lambda out: out.sum(dim=(1, 2)), level="operations"
        )
    assert got.coverage == dispatched.coverage
    assert torch.equal(got.relevance, dispatched.relevance)


def test_modules_of_one_torch_call_are_not_patched():
    """``nn.Linear``, ``nn.LayerNorm``, ``nn.Dropout``, ``nn.Embedding`` and convolutions keep their own
    forward: the mode rules the one call each makes (a patch of every such module would cost more per
    ``attribute`` call than torch's dispatch of that call to the mode)."""
    torch.manual_seed(0)
    model = _Both().double()
    one_call = (nn.Linear, nn.LayerNorm, nn.Dropout, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    with lrpcpp.patch(model, level="operations") as handle:
        # the model's forward runs in the mode; the GELUs are identity-rule units
        assert handle.patched == {
            "": "operation-level rules",
            "blocks.blocks.0.act": "identity rule",
            "blocks.blocks.1.act": "identity rule",
        }
        modules = [m for m in model.modules() if isinstance(m, one_call)]
        assert len(modules) == 15 and not any("forward" in m.__dict__ for m in modules)


def test_calls_under_disabled_torch_functions_are_plain_calls():
    """Where the model's code turns torch function handling off (``torch._C.DisableTorchFunction``),
    the mode sees none of its calls."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.head = nn.LayerNorm(4), nn.Linear(4, 2)

        def forward(self, inputs_embeds):
            with torch._C.DisableTorchFunction():
                h = self.norm(inputs_embeds)
            return self.head(h)

    torch.manual_seed(0)
    model = Model().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, target=lambda out: out.sum(dim=(1, 2)), level="operations")
    with _PassThrough():
        dispatched = lrpcpp.attribute(
            model, inputs_embeds=x, target=lambda out: out.sum(dim=(1, 2)), level="operations"
        )
    assert "torch.nn.functional.layer_norm" not in got.coverage.ruled
    assert got.coverage == dispatched.coverage
    assert torch.equal(got.relevance, dispatched.relevance)
    # the plain layer norm's gradient, not gi_layer_norm's
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(leaf).sum(), leaf)
    torch.testing.assert_close(got.relevance, grad * x, rtol=1e-12, atol=1e-12)


class _Convolutions(nn.Module):
    """Convolutions (zero padding: one call; reflection padding: F.pad first) and a position embedding."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 4, 3, padding=1)
        self.c1_reflect = nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect")
        self.c2, self.c3 = nn.Conv2d(4, 4, 3, padding="same"), nn.Conv3d(4, 2, 1)
        self.positions = nn.Embedding(6, 4)

    def forward(self, inputs_embeds):  # [batch, 6, 4]
        x = inputs_embeds + self.positions(torch.arange(6))
        x = self.c1_reflect(self.c1(x.transpose(1, 2)))  # [batch, 4, 6]
        x = self.c2(x[:, :, None, :].expand(-1, -1, 3, -1))  # [batch, 4, 3, 6]
        return self.c3(x[:, :, None])


def test_convolutions_and_an_embedding():
    torch.manual_seed(0)
    model = _Convolutions().double()
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    target = lambda out: out.sum(dim=(1, 2, 3, 4))  # noqa: E731
    got = lrpcpp.attribute(model, inputs_embeds=x, target=target, level="operations")
    with _PassThrough():
        dispatched = lrpcpp.attribute(model, inputs_embeds=x, target=target, level="operations")
    assert torch.equal(got.relevance, dispatched.relevance)
    assert got.coverage == dispatched.coverage and got.coverage.unruled == {}
    assert got.coverage.passed["torch.nn.functional.pad"] == 1  # the reflecting convolution's own forward
    for conv in ("conv1d", "conv2d", "conv3d"):
        assert got.coverage.passed[f"torch.{conv}"] == (2 if conv == "conv1d" else 1)
    # every step is a linear map or an addition, whose own gradient is the rule: the plain gradient x input
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(target(model(leaf)).sum(), leaf)
    torch.testing.assert_close(got.relevance, grad * x, rtol=1e-12, atol=1e-12)


class _Both(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks, self.convs = _Blocks(), _Convolutions()

    def forward(self, inputs_embeds):  # [2, 6, 8]
        return self.convs(self.blocks(inputs_embeds).reshape(2, 6, 4, 2).sum(-1))


@pytest.mark.compile
@pytest.mark.slow
def test_units_compile_fullgraph_with_the_eager_relevance():
    """In a forward that torch.compile traces, the units' calls go through the mode, which dynamo
    traces with them: no graph break, and the compiled gradient is the eager one."""
    torch.manual_seed(0)
    # (parameters frozen, as lrpcpp.deploy.compile_attribute has them: see docs/models.rst)
    model = _Both().double().requires_grad_(False).eval()  # (dropout off)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    torch._dynamo.reset()
    try:
        with lrpcpp.patch(model, level="operations"):
            leaf = x.clone().requires_grad_()
            (eager,) = torch.autograd.grad(model(leaf).sum(), leaf)
            compiled = torch.compile(model, fullgraph=True, backend="eager")
            leaf = x.clone().requires_grad_()
            (got,) = torch.autograd.grad(compiled(leaf).sum(), leaf)
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, eager)


class _FactorRMSNorm(nn.Module):
    """An RMSNorm by its class name whose output is the normalising factor alone, one per row
    (Hunyuan V4's unweighted norm), not one value per input element."""

    def forward(self, x):
        return torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)


class _Scaled(nn.Module):
    """Embeddings times their RMS factor, then a linear head (float64)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8, dtype=torch.float64)
        self.norm, self.head = norm, nn.Linear(8, 3, dtype=torch.float64)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        return self.head(x * self.norm(x)).sum(1)


@pytest.mark.parametrize("other_mode", [False, True])
def test_a_unit_whose_output_is_not_elementwise_gets_its_calls_ruled(other_mode):
    # the identity rule needs one output per input element: the factor's calls get their rules instead,
    # its rsqrt a normaliser held constant; reference: the gradient of the head with the factor constant
    model, ids = _Scaled(_FactorRMSNorm()), torch.tensor([[1, 4, 7, 2]])
    with _PassThrough() if other_mode else torch.enable_grad():
        got = lrpcpp.attribute(model, input_ids=ids, target=1, level="operations")
    x = model.embed(ids).detach().requires_grad_()
    factor = torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6).detach()
    (grad,) = torch.autograd.grad(model.head(x * factor).sum(1)[0, 1], x)
    torch.testing.assert_close(got.relevance, (x * grad).detach(), rtol=1e-12, atol=1e-14)
    assert not got.coverage.unruled and got.coverage.ruled.get("torch.rsqrt") == 1


def test_a_unit_whose_output_is_not_elementwise_is_refused_at_the_registry_level():
    import transformers as tfm

    config = tfm.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, vocab_size=32
    )
    model = tfm.LlamaForCausalLM(config).eval()
    model.model.norm = _ScaledNorm(model.model.norm)
    ids = torch.tensor([[1, 5, 9]])
    refused = r"_FactorRMSNorm is patched as an element-wise unit .* shape \[1, 3, 16\].* level='operations'"
    for mode in ("gradient", "explicit"):  # (the registry's rules of either mode: the module named)
        with pytest.raises(RuntimeError, match=refused):
            lrpcpp.attribute(model, input_ids=ids, level="registry", mode=mode)
    got = lrpcpp.attribute(model, input_ids=ids, level="operations")
    assert torch.isfinite(got.relevance).all() and not got.coverage.unruled


class _ScaledNorm(nn.Module):
    """A LLaMA's final norm given its input times the input's RMS factor (a module of its own)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm, self.factor = norm, _FactorRMSNorm()

    def forward(self, x):
        return self.norm(x * self.factor(x))

"""Composite: module drop-ins plus ExplicitRules on one model instance, and exact removal."""

import math

import lrpcpp.functional as lf
import lrpcpp.modules as lm
import pytest
import torch
import torch.nn.functional as F
from lrpcpp.models.composite import DEFAULT_MODULE_MAP, Composite, CompositeHandle, identity_module
from lrpcpp.models.explicit import ExplicitRules, UnruledOperationWarning
from torch import nn

f64 = torch.float64


class Encoder(nn.Module):
    """A torch.nn transformer encoder with an embedding projection, mean pooling and a readout."""

    def __init__(self, d=8, heads=2, layers=2):
        super().__init__()
        self.embed = nn.Linear(6, d)
        layer = nn.TransformerEncoderLayer(d, heads, 16, dropout=0.0, batch_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.act = nn.Tanh()
        self.head = nn.Linear(d, 3)

    def forward(self, x, mask=None):
        h = self.encoder(self.embed(x), mask=mask)
        return self.head(self.act(h.mean(1)))


def snapshot(model):
    """Everything register/remove could change, by identity and by value."""
    return {
        "modules": [(n, m) for n, m in model.named_modules(remove_duplicate=False)],
        "state": {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()},
        "dicts": {n: dict(m.__dict__) for n, m in model.named_modules()},
        "hooks": {
            n: [len(getattr(m, h)) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")]
            for n, m in model.named_modules()
        },
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert len(after["modules"]) == len(before["modules"])
    for (n1, m1), (n2, m2) in zip(after["modules"], before["modules"]):
        assert n1 == n2 and m1 is m2
    assert after["state"].keys() == before["state"].keys()
    for k, (t, _) in after["state"].items():
        t0, v0 = before["state"][k]
        assert t is t0 and torch.equal(t.detach(), v0)
    assert after["dicts"].keys() == before["dicts"].keys()
    for n, d in after["dicts"].items():
        assert d.keys() == before["dicts"][n].keys(), n
        for key, value in d.items():
            assert value is before["dicts"][n][key], (n, key)
    assert after["hooks"] == before["hooks"]
    assert "forward" not in model.__dict__


def relevance(model, x, **kwargs):
    x = x.detach().clone().requires_grad_()
    y = model(x, **kwargs)
    y.backward(y.detach())
    return y.detach(), x.grad


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Encoder().eval()


def test_register_and_remove_leave_the_model_bitwise_identical(model):
    x = torch.randn(2, 5, 6)
    before, out_before = snapshot(model), model(x)
    composite = Composite()
    handle = composite.register(model)
    assert isinstance(handle, CompositeHandle) and handle.active
    assert isinstance(model.embed, lm.LinearEpsilon) and isinstance(model.act, lm.TanhIdentity)
    assert isinstance(model.encoder.layers[0].norm1, lm.LayerNormEpsilon)
    assert model.embed.weight is before["state"]["embed.weight"][0]  # parameters shared
    assert set(model.state_dict()) == set(before["state"])
    assert "forward" in model.__dict__
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.active
    assert_unchanged(model, before)
    assert torch.equal(model(x), out_before)


def test_registered_forward_equals_the_original(model):
    x = torch.randn(2, 5, 6)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    for kwargs in ({}, {"mask": mask}):
        want = model(x, **kwargs)
        with Composite().context(model):
            y, rx = relevance(model, x, **kwargs)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(rx).all() and rx.abs().sum() > 0


def test_relevance_is_that_of_the_explicit_ops(model):
    # the registered model against the same model with hand-made drop-ins and the mode entered by hand
    model = model.double()
    x = torch.randn(2, 5, 6, dtype=f64)
    with Composite(epsilon=1e-9).context(model):
        y, rx = relevance(model, x)
    twin = Encoder().double().eval()
    twin.load_state_dict(model.state_dict())
    twin.embed = lm.LinearEpsilon.from_module(twin.embed, epsilon=1e-9)
    twin.head = lm.LinearEpsilon.from_module(twin.head, epsilon=1e-9)
    twin.act = lm.TanhIdentity.from_module(twin.act)
    for layer in twin.encoder.layers:
        layer.linear1 = lm.LinearEpsilon.from_module(layer.linear1, epsilon=1e-9)
        layer.linear2 = lm.LinearEpsilon.from_module(layer.linear2, epsilon=1e-9)
        layer.norm1 = lm.LayerNormEpsilon.from_module(layer.norm1, epsilon=1e-9)
        layer.norm2 = lm.LayerNormEpsilon.from_module(layer.norm2, epsilon=1e-9)
    with ExplicitRules(epsilon=1e-9):
        y2, rx2 = relevance(twin, x)
    assert torch.equal(y, y2)
    assert torch.equal(rx, rx2)


def test_context_restores_on_exception(model):
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with Composite().context(model):
            assert isinstance(model.head, lm.LinearEpsilon)
            raise RuntimeError("boom")
    assert_unchanged(model, before)
    Composite().register(model).remove()  # registrable again


def test_registering_twice_raises(model):
    composite = Composite()
    handle = composite.register(model)
    with pytest.raises(RuntimeError, match="already registered"):
        composite.register(model)
    with pytest.raises(RuntimeError, match="already registered"):
        Composite().register(model)
    handle.remove()
    composite.register(model)
    composite.remove()
    assert "forward" not in model.__dict__


def test_two_models_with_different_composites():
    torch.manual_seed(0)
    m1, m2 = Encoder().double().eval(), Encoder().double().eval()
    x = torch.randn(2, 5, 6, dtype=f64)
    with Composite(epsilon=1e-9).context(m1):
        _, alone = relevance(m1, x)
    plain_y, plain_grad = relevance(m2, x)  # ordinary gradients of an unregistered model
    c1, c2 = Composite(epsilon=1e-9), Composite(module_map={}, functions=False)
    h1, h2 = c1.register(m1), c2.register(m2)
    assert h2.replaced == {} and "forward" not in m2.__dict__
    _, r1 = relevance(m1, x)
    y2, r2 = relevance(m2, x)
    assert torch.equal(r1, alone)  # m2's registration does not touch m1
    assert torch.equal(y2, plain_y) and torch.equal(r2, plain_grad)  # nor m1's m2
    c1.remove()
    _, r2_after = relevance(m2, x)
    assert torch.equal(r2_after, plain_grad)
    h2.remove()
    assert not h1.active and not h2.active


def test_nothing_global_changes(model):
    linear_forward, matmul, softmax = nn.Linear.forward, torch.matmul, F.softmax
    other = nn.Linear(3, 2)
    with Composite().context(model):
        model(torch.randn(1, 5, 6))
        assert nn.Linear.forward is linear_forward and torch.matmul is matmul and F.softmax is softmax
        y = other(torch.randn(4, 3, requires_grad=True))  # outside the model: ordinary autograd
        assert type(y.grad_fn).__name__ == "AddmmBackward0"
        z = torch.randn(2, 2, requires_grad=True) @ torch.randn(2, 2)
        assert type(z.grad_fn).__name__ == "MmBackward0"


def test_name_map_overrides_the_type_map(model):
    made = []

    def factory(m):
        made.append(m)
        return lm.LinearEpsilon.from_module(m, epsilon=0.25)

    names = {"encoder.layers.0.linear1": factory, "head": None}
    with Composite(name_map=names).context(model) as handle:
        assert model.encoder.layers[0].linear1.epsilon == 0.25
        assert model.encoder.layers[1].linear1.epsilon == 1e-6
        assert type(model.head) is nn.Linear  # None: left as it is
        assert "head" not in handle.replaced and len(made) == 1
    with pytest.raises(KeyError, match="encoder.nope"):
        Composite(name_map={"encoder.nope": factory}).register(model)
    assert "forward" not in model.__dict__ and type(model.embed) is nn.Linear


def test_module_map_with_callables_and_errors(model):
    seen = []

    def tanh_factory(m):
        seen.append(m)
        return lm.TanhIdentity.from_module(m)

    with Composite(module_map={nn.Tanh: tanh_factory}).context(model) as handle:
        assert list(handle.replaced) == ["act"] and seen == [handle.replaced["act"][0]]
        assert type(model.embed) is nn.Linear  # not in this map
    with pytest.raises(TypeError, match="from_module"):
        Composite(module_map={nn.Tanh: nn.Sigmoid}).register(model)
    with pytest.raises(TypeError, match="not an nn.Module"):
        Composite(module_map={nn.Tanh: lambda m: 42}).register(model)
    assert type(model.act) is nn.Tanh and "forward" not in model.__dict__  # a failed register changes nothing
    with pytest.raises(ValueError, match="epsilon"):
        Composite(epsilon=-1)
    assert nn.Linear in DEFAULT_MODULE_MAP and DEFAULT_MODULE_MAP[nn.LayerNorm] is lm.LayerNormEpsilon


def test_shared_modules_are_replaced_once_and_restored():
    shared = nn.Linear(4, 4, bias=False)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    before = snapshot(model)
    with Composite().context(model) as handle:
        assert model[0] is model[2] and isinstance(model[0], lm.LinearEpsilon)
        assert set(handle.replaced) == {"0", "1", "2"}
    assert_unchanged(model, before)


class HFStyleRMSNorm(nn.Module):
    """An RMSNorm as model libraries write it (not torch.nn.RMSNorm)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.eps = eps

    def forward(self, h):
        dtype = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class NewGELU(nn.Module):
    """GPT-2's activation written as a formula."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def test_identity_module_for_norms_and_formula_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), HFStyleRMSNorm(6), NewGELU(), nn.Linear(6, 1, bias=False))
    x = torch.randn(3, 4)
    want = model(x)
    before = snapshot(model)
    rules = {**DEFAULT_MODULE_MAP, HFStyleRMSNorm: identity_module, NewGELU: identity_module}
    composite = Composite(module_map=rules, epsilon=1e-9)
    with composite.context(model):
        assert type(model[1]) is HFStyleRMSNorm and model[1] is not before["modules"][2][1]
        assert set(model.state_dict()) == set(before["state"])
        y, rx = relevance(model, x)
    assert torch.equal(y, want)
    assert_unchanged(model, before)
    # linear (epsilon), norm and activation (identity), linear (epsilon), all bias-free: conserves
    torch.testing.assert_close(rx.sum(-1), y.squeeze(-1), rtol=1e-5, atol=1e-6)
    # and equals the rules written out
    xx = x.clone().requires_grad_()
    h = lf.linear_epsilon(xx, model[0].weight, None, 1e-9)
    h = lf.identity(model[1], h)
    h = lf.identity(model[2], h)
    out = lf.linear_epsilon(h, model[3].weight, None, 1e-9)
    out.backward(out.detach())
    torch.testing.assert_close(rx, xx.grad)


def test_unknown_functions_inside_still_work():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.cumsum(x.exp(), -1)).logsumexp(-1)

    model = Odd()
    x = torch.randn(2, 4)
    want = model(x)
    with Composite().context(model), pytest.warns(UnruledOperationWarning) as record:
        y, rx = relevance(model, x)
    assert {str(w.message).split()[1] for w in record} == {"Tensor.exp", "torch.cumsum", "Tensor.logsumexp"}
    torch.testing.assert_close(y, want)
    assert torch.isfinite(rx).all()


def test_conservation_of_a_bias_free_model_with_constant_attention():
    class Block(nn.Module):
        def __init__(self, d=8):
            super().__init__()
            self.qk = nn.Linear(d, 2 * d, bias=False)
            self.v, self.o = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
            self.norm = nn.LayerNorm(d, bias=False)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d, bias=False), nn.GELU(), nn.Linear(2 * d, d, bias=False))
            self.softmax = nn.Softmax(-1)
            self.out = nn.Linear(d, 1, bias=False)

        def forward(self, x):
            q, k = self.qk(x.detach()).chunk(2, -1)  # CP-LRP: the attention pattern is a constant
            p = self.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.size(-1)))
            h = x + self.o(p @ self.v(x))
            h = h + self.mlp(self.norm(h))
            return self.out(h.mean(1)).squeeze(-1)

    torch.manual_seed(3)
    model = Block().double()
    x = torch.randn(2, 5, 8, dtype=f64)
    with Composite(epsilon=1e-12).context(model):
        y, rx = relevance(model, x)
    torch.testing.assert_close(rx.sum((1, 2)), y, rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------- Hugging Face modeling code
def hf_model(name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "gpt2":
        from transformers.activations import NewGELUActivation

        config = transformers.GPT2Config(
            vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
        )
        model = transformers.GPT2LMHeadModel(config)
        extra = {NewGELUActivation: identity_module}
    else:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        config = transformers.LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        model = transformers.LlamaForCausalLM(config)
        extra = {LlamaRMSNorm: identity_module}
    return model.double().eval(), {**DEFAULT_MODULE_MAP, **extra}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hugging_face_models_eager_and_sdpa(name):
    model, module_map = hf_model(name)
    ids = torch.randint(0, 50, (2, 7))
    embeds = model.get_input_embeddings()(ids).detach()
    before = snapshot(model)
    results = {}
    for attn in ("eager", "sdpa"):
        model.set_attn_implementation(attn)
        with torch.no_grad():
            want = model(inputs_embeds=embeds).logits
        with Composite(module_map=module_map, epsilon=1e-9).context(model):
            x = embeds.clone().requires_grad_()
            logits = model(inputs_embeds=x).logits
            target = logits[:, -1, 3]
        target.backward(target.detach())
        if attn == "eager":
            assert torch.equal(logits, want)  # every mapped op computes torch's own value
        torch.testing.assert_close(logits, want)
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        results[attn] = x.grad
    # the SDPA decomposition gives the eager attention's relevance
    torch.testing.assert_close(results["sdpa"], results["eager"], rtol=1e-6, atol=1e-9)
    assert_unchanged(model, before)

"""Whole-model attribution leaves the model exactly as it was: patches that would overlap are
refused, every handle restores what it changed in any order, and attribute, the deployment
functions and Composite put back each submodule's own training flag and each parameter's
requires_grad, also when they raise. Dropout is off in the explicit rules."""

import itertools
import warnings

import lrpcpp
import lrpcpp.deploy as deploy
import pytest
import torch
import torch.nn.functional as F
from lrpcpp.models.composite import Composite
from lrpcpp.models.explicit import ExplicitRules
from torch import nn

pytest.importorskip("transformers", reason="whole-model tests need transformers (requirements-dev.txt)")
from models import build, inputs  # noqa: E402

f64 = torch.float64


class Block(nn.Module):
    def __init__(self, d=6, p=0.0):
        super().__init__()
        self.norm = nn.LayerNorm(d, dtype=f64)
        self.up = nn.Linear(d, 2 * d, dtype=f64)
        self.act = nn.GELU()
        self.drop = nn.Dropout(p)
        self.down = nn.Linear(2 * d, d, dtype=f64)

    def forward(self, x):
        return x + self.down(self.drop(self.act(self.up(self.norm(x)))))


class Net(nn.Module):
    def __init__(self, d=6, p=0.0):
        super().__init__()
        self.a, self.b = Block(d, p), Block(d, p)
        self.head = nn.Linear(d, 3, dtype=f64)

    def forward(self, x):
        return self.head(torch.tanh(self.b(self.a(x))).mean(1))


def _value(v):
    """Dict attributes (hooks, children, parameters, ...) entry by entry, everything else by identity."""
    return tuple((k, id(x)) for k, x in v.items()) if isinstance(v, dict) else id(v)


def state(model):
    """Everything a patch, an attribution or a deployment could change on ``model``: each module's
    attributes (hooks, children, an instance ``forward``, ...) and training flag, each parameter's
    and buffer's identity, requires_grad and value."""
    modules = {}
    for name, m in model.named_modules(remove_duplicate=False):
        modules[name] = (id(m), m.training, {k: _value(v) for k, v in m.__dict__.items()})
    tensors = {
        n: (id(t), t.requires_grad, t.detach().clone())
        for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
    }
    return modules, tensors


def assert_same_state(model, before):
    modules, tensors = state(model)
    assert modules.keys() == before[0].keys()
    for name, (ident, training, attrs) in modules.items():
        ident0, training0, attrs0 = before[0][name]
        assert ident == ident0 and training == training0, name
        assert attrs == attrs0, (name, {k for k in attrs.keys() | attrs0.keys() if attrs.get(k) != attrs0.get(k)})
    assert tensors.keys() == before[1].keys()
    for name, (ident, requires_grad, value) in tensors.items():
        ident0, requires_grad0, value0 = before[1][name]
        assert ident == ident0 and requires_grad == requires_grad0, name
        assert torch.equal(value, value0), name


# ----------------------------------------------------------------------------- overlapping patches
@pytest.mark.parametrize("mode", ["gradient", "explicit"])
def test_a_patch_inside_a_patched_model_is_refused(mode):
    model = Net()
    before = state(model)
    with lrpcpp.patch(model.a, mode=mode):
        with pytest.raises(RuntimeError, match=r"submodule 'a' \(Block\) is already patched"):
            lrpcpp.patch(model, mode=mode)
    assert_same_state(model, before)
    with lrpcpp.patch(model, mode=mode):
        with pytest.raises(RuntimeError, match=r"this Block is already patched as part of a Net"):
            lrpcpp.patch(model.a, mode=mode)
        with pytest.raises(RuntimeError, match=r"this Net is already patched"):
            lrpcpp.patch(model, mode=mode)
    assert_same_state(model, before)


def test_a_module_shared_by_two_models_is_patched_once():
    shared = Block()
    one, two = nn.Sequential(shared, nn.Linear(6, 2, dtype=f64)), nn.Sequential(nn.Tanh(), shared)
    with lrpcpp.patch(one):
        with pytest.raises(RuntimeError, match=r"submodule '1' \(Block\) is already patched as part of a Sequential"):
            lrpcpp.patch(two)


def test_a_module_taken_out_of_a_patched_model_is_released_with_its_patch():
    """Removing a patch releases every module it claimed, also one the model no longer holds (the
    claims are the handle's, not found again by walking the model)."""
    model = Net()
    handle = lrpcpp.patch(model)
    taken, model.b = model.b, Block()
    with pytest.raises(RuntimeError, match=r"this Block is already patched as part of a Net"):
        lrpcpp.patch(taken)
    handle.remove()
    lrpcpp.patch(taken).remove()
    lrpcpp.patch(model).remove()


def test_a_patch_and_a_composite_on_the_same_modules_are_refused():
    model = Net()
    before = state(model)
    with lrpcpp.patch(model.b):
        with pytest.raises(RuntimeError, match=r"submodule 'b' \(Block\) is already patched"):
            Composite().register(model)
    with Composite().context(model.a):
        with pytest.raises(RuntimeError, match=r"submodule 'a' \(Block\) is already registered with a Composite"):
            lrpcpp.patch(model)
    assert_same_state(model, before)


@pytest.mark.parametrize("mode", ["gradient", "explicit"])
@pytest.mark.parametrize("order", ["creation", "reverse"])
def test_disjoint_patches_are_removed_in_any_order(mode, order):
    model = Net()
    x = torch.randn(2, 4, 6, dtype=f64)
    before, out = state(model), model(x)
    # (the registry level, which replaces the forward of the modules it patches)
    handles = [
        lrpcpp.patch(model.a, mode=mode, level="registry"),
        lrpcpp.patch(model.b, mode=mode, method="cp-lrp", level="registry"),
    ]
    assert {m: "forward" in m.__dict__ for m in (model.a.norm, model.b.act)} == {model.a.norm: True, model.b.act: True}
    for h in handles if order == "creation" else handles[::-1]:
        h.remove()
    assert_same_state(model, before)
    assert torch.equal(model(x), out)
    with lrpcpp.patch(model):  # nothing left claimed
        pass
    assert_same_state(model, before)


# ----------------------------------------------------------------------------- training flags, requires_grad
def mixed(model, block):
    """Training mode with one block switched to eval by its owner, and a mix of frozen parameters."""
    model.train()
    block.eval()
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 != 1)
    return model


@pytest.mark.parametrize("mode", ["gradient", "explicit"])
def test_attribute_restores_each_submodule_and_parameter(mode):
    model = build("llama")
    mixed(model, model.model.layers[0])
    before = state(model)
    lrpcpp.attribute(model, mode=mode, **inputs("llama"))
    assert_same_state(model, before)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):  # raises with the model patched and in eval mode
        lrpcpp.attribute(model, mode=mode, target=1000, **inputs("llama"))
    assert_same_state(model, before)


@pytest.mark.parametrize("start", ["train", "eval", "mixed"])
def test_inside_attribute_every_module_is_in_eval_mode_and_every_parameter_frozen(start):
    """Whatever the model's flags were (a model already in eval mode is left as it is on entering,
    every flag and requires_grad that the call changed is put back on leaving)."""
    model = build("llama")
    if start == "mixed":
        mixed(model, model.model.layers[0])
    else:
        model.train(start == "train")
    before, seen = state(model), []

    def look(m, args):
        seen.append(
            ([n for n, s in m.named_modules() if s.training], [n for n, p in m.named_parameters() if p.requires_grad])
        )

    hook = model.register_forward_pre_hook(look)
    try:
        lrpcpp.attribute(model, **inputs("llama"))
    finally:
        hook.remove()
    assert seen == [([], [])]
    assert_same_state(model, before)


@pytest.mark.compile
def test_export_archive_and_export_program_restore_each_submodule_and_parameter(tmp_path):
    model = build("llama", dtype=torch.float32)
    mixed(model, model.model.layers[1])
    ids = inputs("llama", seq=5)["input_ids"]
    before = state(model)
    deploy.export_archive(model, tmp_path / "llama.pt", input_ids=ids)
    assert_same_state(model, before)
    deploy.export_program(model, tmp_path / "llama.pt2", input_ids=ids)
    assert_same_state(model, before)
    # failures while the model is patched: a path in a missing directory
    with pytest.raises((OSError, RuntimeError)):
        deploy.export_archive(model, tmp_path / "missing" / "llama.pt", input_ids=ids, check=False)
    assert_same_state(model, before)
    with pytest.raises((OSError, RuntimeError)):
        deploy.export_program(model, tmp_path / "missing" / "llama.pt2", input_ids=ids, check=False)
    assert_same_state(model, before)


def test_export_builds_the_masks_of_transformers_4_without_vmap_and_puts_its_functions_back(tmp_path):
    # transformers 4.x builds a decoder's mask with torch.vmap, which tracing cannot record: for the
    # trace, lrpcpp.deploy builds the same boolean mask by broadcasting the same index functions
    mu = pytest.importorskip("transformers.masking_utils")
    if not hasattr(mu, "sdpa_mask_recent_torch"):
        pytest.skip("this transformers builds its masks without vmap (transformers 5); make test-tf4 runs this test")
    before = (mu.sdpa_mask, mu.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    padding = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    for function in (mu.causal_mask_function, mu.sliding_window_causal_mask_function(3)):
        for mask, offset in ((padding, 0), (padding, 2), (None, 0)):
            kw = dict(batch_size=3, cache_position=torch.arange(offset, 6), kv_length=6 - offset, kv_offset=offset)
            kw.update(mask_function=function, attention_mask=mask, allow_is_causal_skip=False)
            expected, expected_eager = mu.sdpa_mask(**kw), mu.eager_mask(**kw, dtype=torch.float32)
            with deploy._masks_without_vmap():
                got, got_eager = mu.sdpa_mask(**kw), mu.eager_mask(**kw, dtype=torch.float32)
                assert mu.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is mu.sdpa_mask is not before[0]
            assert got.shape == expected.shape and torch.equal(got, expected)
            assert torch.equal(got_eager, expected_eager)
            assert (mu.sdpa_mask, mu.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]) == before
    # a left-padded decoder: the saved forms reproduce lrpcpp.attribute (the check), also on another length
    model = build("llama", dtype=torch.float32)
    ids = inputs("llama", seq=5)["input_ids"].expand(2, -1)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="lrpcpp.deploy")  # the check: a trace that fixed the length
        deploy.export_archive(model, tmp_path / "llama.pt", input_ids=ids, attention_mask=mask)
        deploy.export_program(model, tmp_path / "llama.pt2", input_ids=ids, attention_mask=mask)
    assert (mu.sdpa_mask, mu.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]) == before


@pytest.mark.compile
def test_compile_attribute_restores_each_submodule_and_parameter():
    model = build("llama", dtype=torch.float32)
    mixed(model, model.model.layers[0])
    before = state(model)
    kw = inputs("llama")
    with deploy.compile_attribute(model, backend="aot_eager") as explain:
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        got = explain(**kw)
    assert_same_state(model, before)
    expected = lrpcpp.attribute(model, **kw)
    scale = float(expected.relevance.abs().max())
    torch.testing.assert_close(got.relevance, expected.relevance, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.compile
@pytest.mark.parametrize(
    "options", [dict(mode="nonsense"), dict(backend="no_such_backend"), dict(options={"no_such_option": 1})]
)
def test_compile_attribute_with_options_torch_compile_rejects(options):
    model = build("llama", dtype=torch.float32)
    mixed(model, model.model.layers[0])
    before = state(model)
    with pytest.raises(RuntimeError, match="compile_attribute: torch.compile rejected the options"):
        deploy.compile_attribute(model, **options)
    assert_same_state(model, before)
    with lrpcpp.patch(model):  # not left patched
        pass


# ----------------------------------------------------------------------------- dropout
def relevance_of(run, x):
    x = x.detach().clone().requires_grad_()
    y = run(x)
    y.backward(y.detach())
    return y.detach(), x.grad


def test_explicit_rules_switch_dropout_off():
    torch.manual_seed(0)
    model = Net(p=0.5)
    x = torch.randn(2, 4, 6, dtype=f64)

    def run(x_):
        with ExplicitRules():
            return F.dropout(model(x_), 0.5, training=True) + F.dropout2d(x_, 0.5, training=True).sum((1, 2))[:, None]

    y_eval, r_eval = relevance_of(run, x)  # the modules in eval mode; the functional calls are in training mode
    model.train()
    for _ in range(3):
        y, r = relevance_of(run, x)
        assert torch.equal(y, y_eval) and torch.equal(r, r_eval)
    model.eval()
    with torch.no_grad():
        assert torch.equal(y_eval, model(x) + x.sum((1, 2))[:, None])


def test_composite_runs_the_model_in_eval_mode_and_restores_the_flags():
    torch.manual_seed(0)
    model = Net(p=0.5)
    x = torch.randn(2, 4, 6, dtype=f64)
    with Composite().context(model):
        y_eval, r_eval = relevance_of(model, x)
    mixed(model, model.b)
    before = state(model)
    for functions in (True, False):
        with Composite(functions=functions).context(model):
            assert not any(m.training for m in model.modules())
            y, r = relevance_of(model, x)
        assert_same_state(model, before)
        if functions:
            assert torch.equal(y, y_eval) and torch.equal(r, r_eval)
        else:  # dropout modules outside the rules: off as well
            torch.testing.assert_close(y, y_eval)


# ----------------------------------------------------------------------------- export_program
@pytest.mark.compile
def test_export_program_of_a_one_token_example_keeps_the_length_free(tmp_path):
    model = build("llama", dtype=torch.float32)
    one = inputs("llama", batch=1, seq=1)["input_ids"]
    program = deploy.export_program(model, tmp_path / "one.pt2", input_ids=one)
    module = torch.export.load(str(tmp_path / "one.pt2")).module()
    for batch, seq in ((2, 6), (1, 3), (1, 1)):
        ids = inputs("llama", batch=batch, seq=seq, seed=7)["input_ids"]
        x = model.get_input_embeddings()(ids).detach()
        mask = torch.ones(batch, seq, dtype=torch.long)
        if batch == 2:
            mask[1, -2:] = 0
        expected = lrpcpp.attribute(model, inputs_embeds=x, attention_mask=mask)
        for deployed in (module, program.module()):
            got = deploy.attribute_deployed(deployed, x, mask)
            assert torch.equal(got.target, expected.target)
            torch.testing.assert_close(
                got.relevance, expected.relevance, rtol=1e-5, atol=1e-5 * float(expected.relevance.abs().max())
            )

"""Presets on whole image models: which rule each layer gets (checked layer by layer against the
float64 formula, from the relevance that arrives at the layer's output), batch-norm merging, the ViT
recipe through lrpcpp.attribute, per-layer overrides, Composite, and torchvision models (when
torchvision is installed)."""

import lrpcpp
import lrpcpp.modules as lm
import pytest
import reference as ref
import torch
import torch.nn.functional as F
import vision_models as vm
from lrpcpp import rules as P
from lrpcpp.models import canonizers, presets
from torch import nn
from zennit_import import import_zennit

f64 = torch.float64
zennit = import_zennit()


# ----------------------------------------------------------------------------- per-layer check
def layer_reference(rule, module, x, R, weight, bias, gi):
    """The relevance of a layer's input by its rule, in float64, given the relevance R of its output."""
    if isinstance(rule, P.Epsilon):
        eps = 0.0 if gi else rule.epsilon  # gradient mode keeps torch's gradient: epsilon -> 0
        if isinstance(module, nn.Conv2d):
            return ref.conv2d_epsilon(x, weight, bias, R, module.stride, module.padding, module.dilation, eps)
        return ref.linear_epsilon(x, weight, bias, R, eps)
    params = {k: getattr(rule, k) for k in ("gamma", "alpha", "beta") if hasattr(rule, k)}
    if isinstance(module, nn.Conv2d):
        lo = hi = None
        if isinstance(rule, P.ZBox):
            lo, hi = torch.as_tensor(rule.low, dtype=f64), torch.as_tensor(rule.high, dtype=f64)
        return ref.conv2d_vision_rule(
            rule.name,
            x,
            weight,
            bias,
            R,
            module.stride,
            module.padding,
            module.dilation,
            rule.epsilon,
            lower=lo,
            upper=hi,
            **params,
        )
    lo = hi = None
    if isinstance(rule, P.ZBox):
        lo = torch.as_tensor(rule.low, dtype=f64).expand(x.shape)
        hi = torch.as_tensor(rule.high, dtype=f64).expand(x.shape)
    return ref.vision_rule(rule.name, x, weight, bias, R, rule.epsilon, lower=lo, upper=hi, **params)


def check_layers(model, leaf_kwargs, preset, mode="gradient", min_checked=1, **patch_kwargs):
    """Patches model with `preset`, runs it, and checks every rule layer whose output received
    relevance: the relevance of its input equals its rule applied to the relevance of its output."""
    modules = dict(model.named_modules())
    seen = {}
    with lrpcpp.patch(model, preset=preset, mode=mode, **patch_kwargs) as handle:
        hooks = []
        for name in handle.layer_rules:
            module = modules.get(name)
            if module is None or not isinstance(module, (nn.Linear, nn.Conv2d)) or name.endswith("out_proj"):
                continue  # nn.MultiheadAttention's projections are not called as modules

            def pre(m, args, name=name):
                x = args[0].view_as(args[0])  # a tensor of this layer's own: its grad comes from here only
                if x.requires_grad:
                    x.retain_grad()
                seen[name] = {"x": x}
                return (x,) + tuple(args[1:])

            def post(m, args, out, name=name):
                if out.requires_grad:
                    out.retain_grad()
                seen[name]["y"] = out
                seen[name]["y_value"] = out.detach().clone()

            hooks.append(module.register_forward_pre_hook(pre))
            hooks.append(module.register_forward_hook(post))
        key, leaf = next(iter(leaf_kwargs.items()))
        leaf = leaf.detach().requires_grad_()
        with handle.rules.context():
            out = model(**{key: leaf})
        logits = getattr(out, "logits", out)
        picked = logits.gather(1, logits.argmax(1, keepdim=True))[:, 0]
        picked.backward(picked.detach() if mode == "explicit" else torch.ones_like(picked))
        for h in hooks:
            h.remove()
        rules, merged = dict(handle.layer_rules), dict(handle.merged_batch_norms)
    gi = mode == "gradient"
    checked = 0
    for name, rec in seen.items():
        x, y = rec["x"], rec["y"]
        if x.grad is None or y.grad is None:
            continue  # held constant (CP-LRP's query and key) or off the explained path
        module = modules[name]
        weight, bias = module.weight.detach(), None if module.bias is None else module.bias.detach()
        if name in merged:
            weight, bias = canonizers.merged_conv_bn(module, modules[merged[name]])
        R = y.grad * rec["y_value"] if gi else y.grad
        got = x.grad * x.detach() if gi else x.grad
        expected = layer_reference(
            rules[name], module, x.detach(), R.double(), weight.double(), None if bias is None else bias.double(), gi
        )
        if gi and isinstance(rules[name], (P.ZBox, P.Flat, P.WSquare)):
            expected = expected * x.detach() / ref.stab(x.detach(), rules[name].epsilon)  # gradient form R / stab(x)
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7 * scale, msg=f"layer {name} ({rules[name]})")
        checked += 1
    assert checked >= min_checked
    return rules


def linear_and_conv_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and not n.endswith("out_proj")]


# ----------------------------------------------------------------------------- registry
def test_presets_are_registered_by_their_literature_names():
    for name in (
        "vit",
        "epsilon_gamma_box",
        "epsilon_plus",
        "epsilon_alpha2_beta1",
        "epsilon_plus_flat",
        "epsilon_alpha2_beta1_flat",
    ):
        assert name in lrpcpp.PRESETS
    assert presets.preset_arguments("vit") == ("gamma_linear", "gamma_conv", "epsilon", "attention_projections")
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        presets.get_preset("nope")
    with pytest.raises(TypeError, match="needs the input bounds low and high"):
        presets.get_preset("epsilon_gamma_box")
    with pytest.raises(TypeError, match="'vit' has no option gamma_lin; its options are gamma_linear, gamma_conv"):
        presets.get_preset("vit", gamma_lin=0.1)


def test_register_a_new_preset():
    @lrpcpp.register_preset("test_all_flat")
    def all_flat(epsilon: float = 1e-6) -> lrpcpp.Preset:
        return lrpcpp.Preset(types={nn.Linear: P.Flat(epsilon), nn.Conv2d: P.Flat(epsilon)})

    try:
        rules = presets.get_preset("test_all_flat").assign(vm.resnet())
        assert set(rules) == set(linear_and_conv_names(vm.resnet()))
        assert all(isinstance(r, P.Flat) for r in rules.values())
    finally:
        del lrpcpp.PRESETS["test_all_flat"]


# ----------------------------------------------------------------------------- rules per layer
@pytest.mark.parametrize("mode", ["gradient", "explicit"])
def test_epsilon_gamma_box_on_a_resnet_layer_by_layer(mode):
    model = vm.resnet()
    rules = check_layers(
        model,
        {"x": vm.images()},
        presets.get_preset("epsilon_gamma_box", low=vm.LOW, high=vm.HIGH),
        mode=mode,
        min_checked=len(linear_and_conv_names(model)),
    )
    assert isinstance(rules["conv1"], P.ZBox)  # the input layer
    assert isinstance(rules["fc"], P.Epsilon)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"]
    assert convs and all(rules[n] == P.Gamma(0.25) for n in convs)
    assert set(rules) == set(linear_and_conv_names(model))


@pytest.mark.parametrize(
    "preset,conv_rule", [("epsilon_plus", P.ZPlus()), ("epsilon_alpha2_beta1", P.AlphaBeta(2.0, 1.0))]
)
def test_cnn_presets_layer_by_layer(preset, conv_rule):
    model = vm.resnet()
    rules = check_layers(model, {"x": vm.images()}, preset, min_checked=len(linear_and_conv_names(model)))
    assert all(rules[n] == conv_rule for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    assert rules["fc"] == P.Epsilon()


def test_flat_presets_put_the_flat_rule_on_the_input_layer():
    model = vm.resnet()
    rules = check_layers(model, {"x": vm.images()}, "epsilon_plus_flat", mode="explicit", min_checked=5)
    assert rules["conv1"] == P.Flat() and rules["layer1.0.conv1"] == P.ZPlus()


@pytest.mark.parametrize("mode", ["gradient", "explicit"])
def test_vit_preset_on_hf_vit_layer_by_layer(mode):
    transformers = pytest.importorskip("transformers", reason="the Hugging Face ViT needs transformers")  # noqa: F841
    from models import build, inputs

    model = build("vit")
    preset = presets.get_preset("vit", gamma_linear=0.05, gamma_conv=0.25)
    # query and key projections are held constant by CP-LRP: their outputs receive no relevance
    rules = check_layers(model, inputs("vit"), preset, mode=mode, min_checked=10)
    names = linear_and_conv_names(model)
    assert set(rules) == set(names)
    for name in names:
        expected = P.Gamma(0.25) if name.endswith("projection") else P.Gamma(0.05)
        assert rules[name] == expected, name


def test_vit_preset_keeps_no_identity_rule_factor_beside_its_rule_layers():
    """Between two linear layers with the gamma rule, which keep their inputs and outputs, the GELU's
    identity rule keeps those same tensors instead of a factor of its own: the same relevance, one
    MLP-sized tensor per layer fewer."""
    pytest.importorskip("transformers", reason="the Hugging Face ViT needs transformers")
    from models import build, inputs

    model = build("vit").requires_grad_(False)
    pixels = inputs("vit")["pixel_values"]

    def run(keep_inputs):
        with lrpcpp.patch(model, preset=lrpcpp.preset("vit")) as handle:
            assert handle.rules.keep_inputs
            handle.rules.keep_inputs = keep_inputs
            leaf = pixels.clone().requires_grad_()
            storages = {}

            def pack(t):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logits = model(pixel_values=leaf).logits
            (grad,) = torch.autograd.grad(logits[:, 0].sum(), leaf)
        return leaf.detach() * grad, sum(storages.values())

    kept, kept_bytes = run(True)
    factors, factor_bytes = run(False)
    assert torch.equal(kept, factors)
    config = model.config
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    per_layer = pixels.shape[0] * tokens * config.intermediate_size * pixels.element_size()
    assert factor_bytes - kept_bytes == config.num_hidden_layers * per_layer


def test_vit_preset_on_a_torch_vit_with_multihead_attention():
    model = vm.vit()
    x = vm.images()
    before = model(x)
    rules = check_layers(model, {"x": x}, presets.get_preset("vit", attention_projections="gamma"), min_checked=5)
    for i in range(2):
        assert rules[f"layers.{i}.self_attention.in_proj"] == P.Gamma(0.05)
        assert rules[f"layers.{i}.self_attention.out_proj"] == P.Gamma(0.05)
    assert rules["conv_proj"] == P.Gamma(0.25) and rules["heads"] == P.Gamma(0.05)
    with lrpcpp.patch(model, preset="vit"):
        torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
    assert torch.equal(model(x), before)


class _ZennitRule(torch.autograd.Function):
    """A zennit rule on one layer in gradient-times-input form, as LXT runs zennit's rules: the layer's
    relevance R_y = g * y goes through zennit's rule, and the gradient of x is R_x / x."""

    @staticmethod
    def forward(ctx, x, layer, rule):
        y = layer(x)
        ctx.save_for_backward(x, y)
        ctx.layer, ctx.rule = layer, rule
        return y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        composite = zennit.composites.LayerMapComposite([(type(ctx.layer), ctx.rule)])
        with torch.enable_grad(), zennit.attribution.Gradient(model=ctx.layer, composite=composite) as attributor:
            _, r = attributor(x.detach(), g * y)
        return r / ref.stab(x, 1e-10), None, None


def lxt_vit_relevance(model, x, gamma_conv=0.25, gamma_linear=0.05):
    """The relevance of the AttnLRP paper's ViT recipe as LXT computes it on torchvision's ViT (the
    layout of vm.TinyViT): zennit's Gamma on every nn.Conv2d and nn.Linear module the model calls,
    CP-LRP in attention (query and key detached; nn.MultiheadAttention reads its projections' weights
    itself, so they keep the plain gradient), layer norms with sigma detached, GELU by the identity
    rule, everything else the plain gradient; seeded with 1 at the top logit."""

    def gamma(layer, g, h):
        return _ZennitRule.apply(h, layer, zennit.rules.Gamma(gamma=g, stabilizer=1e-6))

    def layer_norm(m, h):
        mu = h.mean(-1, keepdim=True)
        sd = (h.var(-1, unbiased=False, keepdim=True) + m.eps).sqrt()
        return (h - mu) / sd.detach() * m.weight + m.bias

    def gelu(h):
        return h * (F.gelu(h) / h).detach()

    x = x.detach().requires_grad_()
    h = gamma(model.conv_proj, gamma_conv, x).flatten(2).transpose(1, 2)
    h = torch.cat([model.class_token.expand(h.shape[0], -1, -1), h], dim=1) + model.pos_embedding
    for block in model.layers:
        y = layer_norm(block.ln_1, h)
        h = h + block.self_attention(y.detach(), y.detach(), y, need_weights=False)[0]
        up, down = block.mlp[0], block.mlp[2]
        h = h + gamma(down, gamma_linear, gelu(gamma(up, gamma_linear, layer_norm(block.ln_2, h))))
    logits = gamma(model.heads, gamma_linear, layer_norm(model.ln, h)[:, 0])
    logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    return x * x.grad


def lrpcpp_vit_relevance(model, x, preset):
    x = x.detach().requires_grad_()
    with lrpcpp.patch(model, preset=preset, mode="gradient"):
        logits = model(x)
        logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    return x * x.grad


def test_vit_preset_is_the_paper_recipe_as_lxt_and_zennit_compute_it():
    """The vit preset's default on a torchvision-style ViT (nn.MultiheadAttention) equals the recipe as
    LXT ships it (zennit's Gamma, conv 0.25, linear 0.05, CP-LRP); attention_projections="gamma" (the
    earlier default, gamma on the attention projections too) differs from it."""
    model = vm.vit().requires_grad_(False)
    x = vm.images()
    expected = lxt_vit_relevance(model, x).detach()
    got = lrpcpp_vit_relevance(model, x, "vit").detach()
    # up to the stabilisers (zennit's 1e-6 in the gamma denominators, 1e-10 at the inputs)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8 * float(expected.abs().max()))
    earlier = lrpcpp_vit_relevance(model, x, lrpcpp.preset("vit", attention_projections="gamma")).detach()
    assert (earlier - expected).abs().max() > 1e-3 * expected.abs().max()
    with lrpcpp.patch(model, preset="vit") as handle:
        assert not any(n.endswith("_proj") and "attention" in n for n in handle.layer_rules)
    with pytest.raises(ValueError, match="attention_projections='gradient' or 'gamma', got 'epsilon'"):
        lrpcpp.preset("vit", attention_projections="epsilon")


def test_multihead_attention_forward_matches_torch_with_masks_and_weights():
    mha = nn.MultiheadAttention(8, 2, batch_first=False).double().eval()
    q, k = torch.randn(5, 3, 8, dtype=f64), torch.randn(7, 3, 8, dtype=f64)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    causal = torch.ones(5, 7, dtype=torch.bool).triu(1)
    expected = mha(q, k, k, key_padding_mask=pad, attn_mask=causal, need_weights=True)
    handle = lrpcpp.patch(nn.Sequential(mha), preset="vit")
    try:
        got = mha(q, k, k, key_padding_mask=pad, attn_mask=causal, need_weights=True)
        torch.testing.assert_close(got[0], expected[0])
        torch.testing.assert_close(got[1], expected[1])
        nw = mha(q, k, k, key_padding_mask=pad, attn_mask=causal, need_weights=False)
        torch.testing.assert_close(nw[0], expected[0])
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- attribute
def test_attribute_with_the_vit_preset_on_hf_vit():
    pytest.importorskip("transformers", reason="the Hugging Face ViT needs transformers")
    from models import build, inputs

    model = build("vit")
    kw = inputs("vit")
    plain = model(**kw).logits
    a = lrpcpp.attribute(model, preset=lrpcpp.preset("vit", gamma_linear=0.05, gamma_conv=0.25), **kw)
    b = lrpcpp.attribute(model, preset=lrpcpp.preset("vit", gamma_linear=0.05, gamma_conv=0.25), **kw)
    assert torch.isfinite(a.relevance).all() and a.relevance.abs().sum() > 0
    assert torch.equal(a.relevance, b.relevance)
    torch.testing.assert_close(a.output, plain.gather(1, plain.argmax(1, keepdim=True))[:, 0], rtol=0, atol=0)
    # gamma = 0 is the epsilon rule, which in gradient mode is CP-LRP's plain gradient as epsilon -> 0
    zero = lrpcpp.attribute(model, preset=lrpcpp.preset("vit", gamma_linear=0.0, gamma_conv=0.0), **kw)
    cp = lrpcpp.attribute(model, method="cp-lrp", **kw)
    scale = float(cp.relevance.abs().max())
    zero_tight = lrpcpp.attribute(
        model, preset=presets.get_preset("vit", gamma_linear=0.0, gamma_conv=0.0, epsilon=1e-13), **kw
    )
    torch.testing.assert_close(zero_tight.relevance, cp.relevance, rtol=1e-7, atol=1e-9 * scale)
    assert (zero.relevance - cp.relevance).abs().max() < 1e-3 * scale
    assert (a.relevance - cp.relevance).abs().max() > 1e-2 * scale  # gamma changes the map
    # explicit and gradient semantics agree as epsilon -> 0 (RULES.md section 2)
    e = lrpcpp.attribute(model, preset="vit", mode="explicit", epsilon=1e-12, **kw)
    torch.testing.assert_close(e.relevance, a.relevance, rtol=1e-5, atol=1e-6 * float(a.relevance.abs().max()))


def test_attribute_takes_preset_options_apart_from_the_model_inputs():
    model = vm.resnet()
    x = vm.images()
    got = lrpcpp.attribute(
        model, pixel_values=x, preset=lrpcpp.preset("epsilon_gamma_box", low=vm.LOW, high=vm.HIGH, gamma=0.1)
    )
    with lrpcpp.patch(model, preset=presets.get_preset("epsilon_gamma_box", low=vm.LOW, high=vm.HIGH, gamma=0.1)) as h:
        assert h.layer_rules["layer1.0.conv1"] == P.Gamma(0.1)
    assert torch.isfinite(got.relevance).all()
    assert got.token_relevance.shape == (2, 16, 16)
    with pytest.raises(ValueError, match="give preset= as well"):
        lrpcpp.attribute(model, pixel_values=x, rules={"fc": None})
    with pytest.raises(TypeError, match=r"gamma_linear= is an option of the preset\(s\) vit"):  # never to the model
        lrpcpp.attribute(model, pixel_values=x, preset="epsilon_plus", gamma_linear=0.1)
    with pytest.raises(TypeError, match="'epsilon_plus' has no option gamma_linear; its options are epsilon"):
        lrpcpp.preset("epsilon_plus", gamma_linear=0.1)


def test_gradient_and_explicit_modes_agree_on_a_resnet():
    model = vm.resnet()
    x = vm.images()
    preset = presets.get_preset("epsilon_alpha2_beta1", epsilon=1e-12)
    # the stabilisers of both semantics near 0: the identity rule of the ReLUs in gradient mode divides by
    # stab(x), which a large alpha-beta ratio amplifies
    g = lrpcpp.attribute(model, pixel_values=x, preset=preset, epsilon=1e-15)
    e = lrpcpp.attribute(model, pixel_values=x, preset=preset, mode="explicit", epsilon=1e-12)
    torch.testing.assert_close(e.relevance, g.relevance, rtol=1e-6, atol=1e-8 * float(g.relevance.abs().max()))


class _CountCopies(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.copies += func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default)
        return func(*args, **(kwargs or {}))


class _OwnReLU(nn.ReLU):
    """An activation with a forward of its own (not torch.nn's): in place, it gets a copy of its input."""

    def forward(self, x):
        return x.clamp_(min=0) if self.inplace else x.clamp(min=0)


@pytest.mark.parametrize("mode", ["gradient", "explicit"])
def test_in_place_activations_copy_no_input(mode):
    # torch.nn's in-place activations run out of place: the value of a new tensor, with no copy of x made
    # first (nn.ReLU(inplace=True) after every convolution of a ResNet); other in-place modules get a copy
    model = nn.Sequential(
        nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 4), _OwnReLU(inplace=True), nn.Linear(4, 2)
    )
    torch.manual_seed(0)
    x = torch.randn(3, 4, requires_grad=True)
    with lrpcpp.patch(model, mode=mode):
        for layer, copies in ((model[1], 0), (model[3], 1)):
            h = model[0](x)
            before = h.detach().clone()
            with _CountCopies() as counted:
                y = layer(h)
            assert counted.copies == copies
            torch.testing.assert_close(y, before.clamp_min(0), rtol=0, atol=0)
            torch.testing.assert_close(h, before, rtol=0, atol=0)  # the input is left unchanged
            assert layer.inplace is True
            (g,) = torch.autograd.grad(y, h, torch.ones_like(y))
            # the identity rule: g y / stab(h) in gradient mode, the relevance itself in explicit mode
            torch.testing.assert_close(g, (before > 0).to(g.dtype) if mode == "gradient" else torch.ones_like(g))
    assert model[1].inplace is True and model[1].forward.__func__ is nn.ReLU.forward


def test_method_comes_from_the_preset_unless_given():
    model = vm.vit()
    with lrpcpp.patch(model, preset="vit") as h:
        assert h.method == "cp-lrp"
    with lrpcpp.patch(model, preset="vit", method="attnlrp") as h:
        assert h.method == "attnlrp"
    with lrpcpp.patch(model) as h:
        assert h.method == "attnlrp" and h.layer_rules == {}


# ----------------------------------------------------------------------------- overrides
def test_overrides_by_name_and_by_type():
    model = vm.resnet()
    preset = presets.get_preset(
        "epsilon_gamma_box",
        rules={"fc": P.Gamma(0.5), "layer2.0.conv2": None, nn.Conv2d: P.ZPlus()},
        low=vm.LOW,
        high=vm.HIGH,
    )
    rules = check_layers(model, {"x": vm.images()}, preset, min_checked=10)
    assert rules["fc"] == P.Gamma(0.5)
    assert "layer2.0.conv2" not in rules  # None: left as it is
    assert isinstance(rules["conv1"], P.ZBox)  # the input layer's rule outranks the type
    assert rules["layer1.0.conv1"] == P.ZPlus()
    with pytest.raises(KeyError, match="name no layer"):
        presets.get_preset("epsilon_plus", rules={"nope": P.Flat()}).assign(model)
    with pytest.raises(TypeError, match="must be an lrpcpp.rules rule"):
        presets.get_preset("epsilon_plus", rules={"fc": "flat"})


# ----------------------------------------------------------------------------- batch-norm merging
def state(model):
    return {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}


def test_batch_norm_merge_keeps_the_forward_and_restores_the_model_bitwise():
    model = vm.resnet()
    x = vm.images()
    params = {n: p for n, p in model.named_parameters()}
    versions = {n: p._version for n, p in params.items()}
    before_state = state(model)
    before = model(x)
    assert canonizers.conv_bn_pairs(model) == [
        ("conv1", "bn1"),
        ("layer1.0.conv1", "layer1.0.bn1"),
        ("layer1.0.conv2", "layer1.0.bn2"),
        ("layer1.1.conv1", "layer1.1.bn1"),
        ("layer1.1.conv2", "layer1.1.bn2"),
        ("layer2.0.conv1", "layer2.0.bn1"),
        ("layer2.0.conv2", "layer2.0.bn2"),
        ("layer2.0.downsample.0", "layer2.0.downsample.1"),
        ("layer2.1.conv1", "layer2.1.bn1"),
        ("layer2.1.conv2", "layer2.1.bn2"),
    ]
    with lrpcpp.patch(model, preset="epsilon_plus") as handle:
        assert len(handle.merged_batch_norms) == 10
        merged = model(x)
    torch.testing.assert_close(merged, before, rtol=1e-12, atol=1e-12)  # one convolution instead of two ops
    lrpcpp.attribute(model, pixel_values=x, preset=lrpcpp.preset("epsilon_gamma_box", low=vm.LOW, high=vm.HIGH))
    after = state(model)
    assert set(after) == set(before_state)
    for k in before_state:
        assert torch.equal(after[k], before_state[k]), k
    assert {n: p for n, p in model.named_parameters()} == params  # the same Parameter objects
    assert {n: p._version for n, p in params.items()} == versions  # never written to
    assert torch.equal(model(x), before)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_merged_convolution_gets_the_rule_of_the_merged_map():
    # relevance through conv + batch norm equals that through one convolution with the merged weights
    conv, bn = nn.Conv2d(3, 4, 3, padding=1).double(), nn.BatchNorm2d(4).double()
    vm.randomise(nn.Sequential(conv, bn))
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3).double()).eval()
    w, b = canonizers.merged_conv_bn(conv, bn)
    single = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1).double(), nn.ReLU(), nn.Flatten(), model[4]).eval()
    with torch.no_grad():
        single[0].weight.copy_(w)
        single[0].bias.copy_(b)
    x = torch.randn(2, 3, 6, 6, dtype=f64)
    a = lrpcpp.attribute(model, pixel_values=x, preset="epsilon_alpha2_beta1")
    s = lrpcpp.attribute(single, pixel_values=x, preset="epsilon_alpha2_beta1")
    torch.testing.assert_close(a.relevance, s.relevance, rtol=1e-10, atol=1e-12)
    assert canonizers.merged_conv_bn(conv, bn)[0] is w  # cached while nothing changed
    with torch.no_grad():
        bn.running_var.mul_(2.0)
    assert canonizers.merged_conv_bn(conv, bn)[0] is not w  # rebuilt after an update


def test_merging_needs_running_statistics():
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="merged_conv_bn needs a batch norm with running statistics"):
        canonizers.merged_conv_bn(conv, bn)


def test_batch_norm_in_training_mode_is_not_merged():
    model = vm.resnet()
    x = vm.images()
    model.train()
    with lrpcpp.patch(model, preset="epsilon_plus"):
        bn_out = []
        h = model.bn1.register_forward_hook(lambda m, a, out: bn_out.append(out))
        model(x)
        h.remove()
    model.eval()
    expected = F.batch_norm(
        F.conv2d(x, model.conv1.weight, None, 2, 2), None, None, model.bn1.weight, model.bn1.bias, training=True
    )
    torch.testing.assert_close(bn_out[0], expected)


def test_a_model_fx_cannot_trace_falls_back_to_sequential_pairs():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            x = self.body(x)
            if x.sum() > 0:  # data-dependent control flow: not traceable
                x = x * 2
            return self.bn(self.conv(x))

    assert canonizers.conv_bn_pairs(Dynamic()) == [("body.0", "body.1")]


# ----------------------------------------------------------------------------- Composite
def test_composite_with_a_preset_matches_the_explicit_patch():
    model = vm.resnet()
    x = vm.images()
    composite = lrpcpp.Composite(preset=presets.get_preset("epsilon_gamma_box", low=vm.LOW, high=vm.HIGH))
    before = model(x)
    with composite.context(model) as handle:
        assert isinstance(handle.replaced["conv1"][1], lm.Conv2dZBox)
        assert isinstance(handle.replaced["layer1.0.conv1"][1], lm.Conv2dGamma)
        assert isinstance(handle.replaced["fc"][1], lm.LinearEpsilon)
        assert isinstance(handle.replaced["layer1.0.bn1"][1], canonizers.MergedBatchNorm)  # merged into layer1.0.conv1
        leaf = x.detach().requires_grad_()
        out = model(leaf)
        torch.testing.assert_close(out, before, rtol=1e-12, atol=1e-12)
        picked = out.gather(1, out.argmax(1, keepdim=True))[:, 0]
        picked.backward(picked.detach())  # explicit semantics: seed each item with its own logit
    assert torch.equal(model(x), before)
    patched = lrpcpp.attribute(
        model, pixel_values=x, mode="explicit", preset=lrpcpp.preset("epsilon_gamma_box", low=vm.LOW, high=vm.HIGH)
    )
    torch.testing.assert_close(leaf.grad, patched.relevance, rtol=1e-8, atol=1e-10)


def test_composite_accepts_a_preset_name_and_keeps_its_own_maps_first():
    model = vm.resnet()
    composite = lrpcpp.Composite(preset="epsilon_plus", name_map={"fc": None})
    with composite.context(model) as handle:
        assert "fc" not in handle.replaced
        assert isinstance(handle.replaced["layer2.1.conv2"][1], lm.Conv2dZPlus)


# ----------------------------------------------------------------------------- torchvision
def test_torchvision_resnet_and_vit():
    tv = pytest.importorskip(
        "torchvision",
        reason="torchvision does not install beside torch 2.13.0 CPU; make cuda-check runs this test in .venv-cuda",
    )
    from torchvision.models.vision_transformer import VisionTransformer

    resnet = vm.randomise(tv.models.resnet18(weights=None, num_classes=5)).double()
    x = vm.images(size=32)
    before = resnet(x)
    names = linear_and_conv_names(resnet)
    rules = check_layers(
        resnet, {"x": x}, presets.get_preset("epsilon_gamma_box", low=vm.LOW, high=vm.HIGH), min_checked=len(names)
    )
    assert set(rules) == set(names) and isinstance(rules["conv1"], P.ZBox)
    assert torch.equal(resnet(x), before)
    a = lrpcpp.attribute(resnet, pixel_values=x, preset=lrpcpp.preset("epsilon_gamma_box", low=vm.LOW, high=vm.HIGH))
    assert torch.isfinite(a.relevance).all() and a.relevance.abs().sum() > 0

    vit = vm.randomise(VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=5)).double()
    before = vit(x)
    rules = check_layers(vit, {"x": x}, "vit", min_checked=4)
    assert rules["conv_proj"] == P.Gamma(0.25) and rules["encoder.layers.encoder_layer_0.mlp.0"] == P.Gamma(0.05)
    # the paper's recipe (the default) leaves the attention projections to their gradient, as LXT does
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj" not in rules
    gamma = lrpcpp.preset("vit", attention_projections="gamma")
    rules = check_layers(vit, {"x": x}, gamma, min_checked=5)
    assert rules["encoder.layers.encoder_layer_0.self_attention.in_proj"] == P.Gamma(0.05)
    with lrpcpp.patch(vit, preset="vit"):
        torch.testing.assert_close(vit(x), before, rtol=1e-10, atol=1e-10)
    a = lrpcpp.attribute(vit, pixel_values=x, preset=lrpcpp.preset("vit", gamma_linear=0.05, gamma_conv=0.25))
    assert torch.isfinite(a.relevance).all() and a.relevance.abs().sum() > 0


def test_composite_leaves_multihead_attention_projections_alone():
    model = vm.vit()
    with lrpcpp.Composite(preset="vit").context(model) as handle:
        assert "layers.0.self_attention.out_proj" not in handle.replaced
        assert isinstance(handle.replaced["layers.0.mlp.0"][1], lm.LinearGamma)
        assert isinstance(handle.replaced["conv_proj"][1], lm.Conv2dGamma)

"""The rules on every convolution kind (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d/2d/3d, and nn.Conv2d
through the same op) against zennit's rules on the same layer and input: the native
``convolution_<rule>`` ops, the rules' ``convolution``, lrpcpp.patch with a preset and lrpcpp.Composite;
conservation on bias-free layers; the gradient-times-input form; the argument checks.

The bias conventions (docs/vision.rst): zennit counts the bias in the denominators of alpha-beta and
z-plus (its positive or negative part joins the sum of the positive or negative terms) and of w-square
(squared), lrpcpp by default does not (bias="ignore"), and does with bias="denominator"; those rules are
compared on bias-free layers, and on layers with a bias under both conventions (the bias-share
conservation, the dense float64 reference, patch / Composite / the drop-ins). Epsilon, gamma, z-box and flat
agree with a bias as well (epsilon: the denominator is the output, bias included; gamma: both count the
bias as the weight of a constant input 1, b + gamma b+ on outputs z > 0 and b + gamma b- on z < 0;
zennit's z-box bias terms b - b+ - b- cancel; flat: zennit zeroes the bias) and are compared on layers
with a bias too, nn.Linear included. Then the convolution drop-ins (lm.Conv1dRule, ...) and the native
pooling ops (avg_pool_epsilon, adaptive_avg_pool_epsilon, max_pool_wta) against float64 transcriptions."""

import copy

import lrpcpp
import lrpcpp.functional as lf
import pytest
import torch
from lrpcpp import rules as R
from lrpcpp.models.presets import CONVOLUTIONS, Preset
from torch import nn
from torch.nn import functional as F
from zennit_import import import_zennit

zennit = import_zennit()

EPS = 1e-6
GAMMA = 0.3
RULES = ["epsilon", "gamma", "alpha_beta", "z_plus", "z_box", "flat", "w_square"]
# the rules whose relevance zennit computes as lrpcpp does also with a bias
BIAS_AGREES = {"epsilon", "gamma", "z_box", "flat"}
TOL = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=1e-5, rtol=1e-5)}


# kind -> (layer factory(bias), input shape): stride, padding, dilation, groups and output_padding
# other than their defaults in every dimension that has them
def _layers():
    return {
        "conv1d": (
            lambda b: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2, bias=b),
            (2, 4, 11),
        ),
        "conv2d": (
            lambda b: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, bias=b),
            (2, 4, 7, 6),
        ),
        "conv3d": (
            lambda b: nn.Conv3d(
                4, 6, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2), groups=2, bias=b
            ),
            (2, 4, 5, 6, 5),
        ),
        "conv_transpose1d": (
            lambda b: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, bias=b),
            (2, 4, 7),
        ),
        "conv_transpose2d": (
            lambda b: nn.ConvTranspose2d(
                4, 6, (3, 3), stride=(2, 3), padding=(1, 0), output_padding=(1, 2), dilation=(1, 1), groups=2, bias=b
            ),
            (2, 4, 5, 4),
        ),
        "conv_transpose3d": (
            lambda b: nn.ConvTranspose3d(
                4,
                2,
                (2, 3, 2),
                stride=(2, 1, 2),
                padding=(0, 1, 0),
                output_padding=(1, 0, 0),
                dilation=(1, 2, 1),
                bias=b,
            ),
            (2, 4, 3, 4, 3),
        ),
    }


LAYERS = _layers()


def make(kind, dtype, bias, seed=0):
    torch.manual_seed(seed)
    factory, shape = LAYERS[kind]
    layer = factory(bias).to(dtype).eval()
    x = torch.randn(shape, dtype=dtype)
    return layer, x


def bounds(x):
    """z-box bounds per channel, around x."""
    shape = (x.shape[1],) + (1,) * (x.dim() - 2)
    lo = torch.full(shape, float(x.min()) - 0.5, dtype=x.dtype)
    hi = torch.full(shape, float(x.max()) + 0.25, dtype=x.dtype)
    return lo, hi


def lrpcpp_rule(rule, x, eps=EPS):
    if rule == "z_box":
        return R.ZBox(*bounds(x), eps)
    return {
        "epsilon": R.Epsilon(eps),
        "gamma": R.Gamma(GAMMA, eps),
        "alpha_beta": R.AlphaBeta(2.0, 1.0, eps),
        "z_plus": R.ZPlus(eps),
        "flat": R.Flat(eps),
        "w_square": R.WSquare(eps),
    }[rule]


def zennit_rule(rule, x):
    zr = zennit.rules
    if rule == "z_box":  # zennit's bounds have the batch dimension
        lo, hi = bounds(x)
        return zr.ZBox(lo[None], hi[None], stabilizer=EPS)
    return {
        "epsilon": lambda: zr.Epsilon(epsilon=EPS),
        "gamma": lambda: zr.Gamma(gamma=GAMMA, stabilizer=EPS),
        "alpha_beta": lambda: zr.AlphaBeta(alpha=2.0, beta=1.0, stabilizer=EPS),
        "z_plus": lambda: zr.ZPlus(stabilizer=EPS),
        "flat": lambda: zr.Flat(stabilizer=EPS),
        "w_square": lambda: zr.WSquare(stabilizer=EPS),
    }[rule]()


def geometry(layer):
    """torch.convolution's arguments of a layer (numeric padding, zeros padding mode)."""
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    return (
        list(layer.stride),
        list(layer.padding),
        list(layer.dilation),
        transposed,
        list(layer.output_padding),
        layer.groups,
    )


def zennit_relevance(layer, rule, x, grad):
    """zennit's Gradient attributor with ``rule`` on ``layer`` alone."""
    composite = zennit.composites.LayerMapComposite([(type(layer), zennit_rule(rule, x))])
    with zennit.attribution.Gradient(model=layer, composite=composite) as attributor:
        _, relevance = attributor(x, grad)
    return relevance


def rule_relevance(layer, rule, x, grad, eps=EPS):
    """lrpcpp's relevance through the rule's ``convolution`` (the native convolution_<rule> op)."""
    x = x.clone().requires_grad_()
    r = lrpcpp_rule(rule, x.detach(), eps)
    y = r.convolution(x, layer.weight, layer.bias, *geometry(layer), None, False)
    torch.testing.assert_close(y, layer(x), atol=0, rtol=0)  # exactly torch's convolution
    y.backward(grad)
    return x.grad


def cases(bias):
    return [
        pytest.param(kind, rule, id=f"{kind}-{rule}")
        for kind in LAYERS
        for rule in RULES
        if not bias or rule in BIAS_AGREES
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind, rule", cases(bias=False))
def test_rule_equals_zennit_without_bias(kind, rule, dtype):
    layer, x = make(kind, dtype, bias=False)
    grad = torch.randn_like(layer(x))
    expected = zennit_relevance(layer, rule, x, grad)
    got = rule_relevance(layer, rule, x, grad)
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind, rule", cases(bias=True))
def test_rule_equals_zennit_with_bias(kind, rule, dtype):
    layer, x = make(kind, dtype, bias=True)
    grad = torch.randn_like(layer(x))
    torch.testing.assert_close(
        rule_relevance(layer, rule, x, grad), zennit_relevance(layer, rule, x, grad), **TOL[dtype]
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("rule", ["gamma", "flat"])
def test_linear_rule_with_bias_equals_zennit(rule, dtype):
    """gamma and flat, whose bias convention is zennit's, on an nn.Linear with a bias (inputs of both
    signs, outputs of both signs)."""
    torch.manual_seed(0)
    layer = nn.Linear(7, 5).to(dtype).eval()
    with torch.no_grad():
        layer.bias.mul_(4.0)  # biases of both signs, large enough to flip outputs and to matter
    x = torch.randn(3, 4, 7, dtype=dtype)
    grad = torch.randn_like(layer(x))
    expected = zennit_relevance(layer, rule, x, grad)
    xr = x.clone().requires_grad_()
    lrpcpp_rule(rule, x).linear(xr, layer.weight, layer.bias, None, False).backward(grad)
    assert xr.grad.abs().sum() > 0
    torch.testing.assert_close(xr.grad, expected, **TOL[dtype])


def preset_for(rule, x):
    return Preset(types={cls: lrpcpp_rule(rule, x) for cls in CONVOLUTIONS}, merge_batch_norm=False)


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("rule", ["gamma", "z_plus", "w_square"])
def test_patch_and_composite_treat_every_convolution(kind, rule):
    """lrpcpp.patch (explicit and gradient mode) and lrpcpp.Composite with a preset put the rule on
    each convolution kind: the relevance of a model of one such layer equals zennit's."""
    layer, x = make(kind, torch.float64, bias=False)
    model = nn.Sequential(layer)
    grad = torch.randn_like(layer(x))
    expected = zennit_relevance(layer, rule, x, grad)
    preset = preset_for(rule, x)
    with lrpcpp.patch(model, preset=preset, mode="explicit") as handle:
        assert handle.layer_rules == {"0": preset.types[type(layer)]}
        xe = x.clone().requires_grad_()
        model(xe).backward(grad)
    torch.testing.assert_close(xe.grad, expected, **TOL[torch.float64])
    with lrpcpp.patch(model, preset=preset, mode="gradient"):
        xg = x.clone().requires_grad_()
        y = model(xg)
        y.backward(grad / y)  # the gradient form takes R_y / y, and returns R_x / x (w-square: R_x / stab(x))
    got = xg.grad * (x + EPS * torch.where(x >= 0, 1.0, -1.0).to(x)) if rule == "w_square" else x * xg.grad
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)
    with lrpcpp.Composite(preset=preset).context(model):
        xc = x.clone().requires_grad_()
        model(xc).backward(grad)
    torch.testing.assert_close(xc.grad, expected, **TOL[torch.float64])


def passing(layer, rule, x):
    """The outputs whose relevance the rule passes on: those some input reaches (output_padding adds
    outputs that none does), and for z-plus and alpha-beta those with a positive term (and a negative
    one): where a denominator is a sum of no terms, its relevance has no input to go to."""
    w = layer.weight.detach()

    def conv(inp, weight):
        return torch.convolution(inp, weight, None, *geometry(layer))

    mask = conv(torch.ones_like(x), w.abs()) > 0
    if rule in ("z_plus", "alpha_beta"):
        xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
        mask &= conv(xp, wp) + conv(xn, wn) > 0
        if rule == "alpha_beta":
            mask &= conv(xp, wn) + conv(xn, wp) < 0
    return mask


@pytest.mark.parametrize("kind, rule", cases(bias=False))
def test_conservation_without_bias(kind, rule):
    """Every rule passes on the relevance of each sample, from the outputs it can pass on (with
    epsilon = 1e-12, which absorbs a relative epsilon / |z| of an output's relevance)."""
    layer, x = make(kind, torch.float64, bias=False)
    mask = passing(layer, rule, x)
    assert mask.float().mean() > 0.5
    grad = (torch.rand_like(layer(x)) + 0.1) * mask
    got = rule_relevance(layer, rule, x, grad, eps=1e-12)
    torch.testing.assert_close(got.flatten(1).sum(1), grad.flatten(1).sum(1), atol=0, rtol=1e-8)


@pytest.mark.parametrize("kind, rule", [c for c in cases(bias=False) if c.values[1] != "epsilon"])
def test_gradient_form(kind, rule):
    """gi=True takes the gradient R_y / y and returns R_x / x: exactly for the rules whose relevance
    is a multiple of x (gamma, alpha-beta, z-plus), R_x / stab(x) for the others."""
    layer, x = make(kind, torch.float64, bias=True)
    grad = torch.randn_like(layer(x))
    explicit = rule_relevance(layer, rule, x, grad)
    xg = x.clone().requires_grad_()
    y = lrpcpp_rule(rule, x).convolution(xg, layer.weight, layer.bias, *geometry(layer), None, True)
    y.backward(grad / y)
    if rule in ("gamma", "alpha_beta", "z_plus"):
        torch.testing.assert_close(x * xg.grad, explicit, atol=1e-10, rtol=1e-10)
    else:
        stab = x + EPS * torch.where(x >= 0, 1.0, -1.0).to(x)
        torch.testing.assert_close(xg.grad, explicit / stab, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("rule", RULES)
def test_conv2d_ops_equal_the_general_op(rule):
    """conv2d_<rule> and convolution_<rule> on a 2-D convolution: the same relevance, bitwise."""
    layer, x = make("conv2d", torch.float64, bias=True)
    grad = torch.randn_like(layer(x))
    r = lrpcpp_rule(rule, x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    r.conv2d(
        xa, layer.weight, layer.bias, layer.stride, list(layer.padding), layer.dilation, layer.groups, None, False
    ).backward(grad)
    r.convolution(xb, layer.weight, layer.bias, *geometry(layer), None, False).backward(grad)
    assert torch.equal(xa.grad, xb.grad)


def test_cached_weight_transforms_are_used():
    """A weight transform passed in is the one the rule multiplies by (here a wrong one changes R)."""
    layer, x = make("conv_transpose2d", torch.float64, bias=False)
    grad = torch.randn_like(layer(x))
    geo = geometry(layer)
    outs = []
    for w_abs in (None, layer.weight.abs(), 2 * layer.weight.abs()):
        xr = x.clone().requires_grad_()
        lf.convolution_gamma(xr, layer.weight, None, *geo, GAMMA, EPS, w_abs).backward(grad)
        outs.append(xr.grad)
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(2, 4, 9), torch.randn(6, 2, 3), [1, 1], [0], [1], False, [0], 2), "stride to have 1 values"),
        ((torch.randn(2, 4, 9), torch.randn(6, 2, 3), [1], [0], [1], False, [1], 2), "output_padding >= 0 \\(and 0"),
        ((torch.randn(2, 4, 9), torch.randn(6, 2, 3), [2], [0], [1], True, [2], 2), "smaller than stride or dilation"),
        ((torch.randn(2, 4, 9, 9), torch.randn(6, 2, 3), [1], [0], [1], False, [0], 2), "x to be 3-D"),
        ((torch.randn(2, 4, 9), torch.randn(6, 4, 3), [1], [0], [1], False, [0], 2), "x to have 8 channels"),
        ((torch.randn(2, 5, 9), torch.randn(4, 3, 3), [1], [0], [1], True, [0], 2), "x to have 4 channels"),
        ((torch.randn(2, 4, 2), torch.randn(6, 2, 3), [1], [0], [1], False, [0], 2), "output of size >= 1"),
        ((torch.randn(2, 4, 9), torch.randn(6, 2), [1], [0], [1], False, [0], 2), "weight to be 3-D to 5-D"),
        ((torch.randn(2, 4, 9), torch.randn(6, 2, 3), [0], [0], [1], False, [0], 2), "stride >= 1"),
        ((torch.randn(2, 4, 9), torch.randn(6, 2, 3), [1], [0], [1], False, [0], 0), "groups >= 1"),
    ],
)
def test_bad_arguments_name_the_op(args, match):
    x, w, *geo = args
    for op in (lf.convolution_epsilon, lf.convolution_z_plus):
        with pytest.raises(RuntimeError, match=f"lrpcpp.{op.__name__}: expected .*{match}"):
            op(x, w, None, *geo)


def test_bad_bias_and_output_name_the_op():
    x, w = torch.randn(2, 4, 9), torch.randn(4, 3, 3)  # transposed: 6 output channels
    geo = ([1], [0], [1], True, [0], 2)
    with pytest.raises(RuntimeError, match="lrpcpp.convolution_gamma: expected bias to have 6 elements"):
        lf.convolution_gamma(x, w, torch.randn(4), *geo)
    y = torch.convolution(x, w, None, *geo)
    with pytest.raises(RuntimeError, match="lrpcpp.convolution_flat_relevance: expected output to have the shape"):
        torch.ops.lrpcpp.convolution_flat_relevance(y[..., 1:], x, w, y[..., 1:], *geo, EPS, False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.AvgPool1d(3, 2, 1), (2, 3, 9)),
        (nn.AvgPool2d((2, 3), (2, 1), (1, 1), count_include_pad=False), (2, 3, 6, 7)),
        (nn.AvgPool3d(2, 1), (2, 3, 4, 5, 4)),
        (nn.AdaptiveAvgPool2d(2), (2, 3, 5, 5)),
        (nn.MaxPool1d(3, 2), (2, 3, 9)),
        (nn.MaxPool2d(2, padding=1), (2, 3, 6, 5)),
        (nn.MaxPool3d(2, 1, dilation=(1, 2, 1)), (2, 3, 4, 5, 4)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_pooling_equals_zennit(layer, shape, dtype):
    """Average pooling takes the epsilon rule (zennit's Norm), max pooling passes all relevance to the
    maximum of each window (zennit keeps the gradient: winner takes all), in lrpcpp.Composite and in
    lrpcpp.patch's explicit mode, for 1 to 3 dimensions."""
    torch.manual_seed(0)
    layer = layer.to(dtype)
    x = torch.randn(shape, dtype=dtype)
    grad = torch.randn_like(layer(x))
    maps = [] if "Max" in type(layer).__name__ else [(type(layer), zennit.rules.Norm(stabilizer=EPS))]
    with zennit.attribution.Gradient(model=layer, composite=zennit.composites.LayerMapComposite(maps)) as attributor:
        _, expected = attributor(x, grad)
    model = nn.Sequential(layer)
    with lrpcpp.Composite(epsilon=EPS).context(model):
        xc = x.clone().requires_grad_()
        model(xc).backward(grad)
    with lrpcpp.patch(model, mode="explicit", epsilon=EPS):
        xe = x.clone().requires_grad_()
        model(xe).backward(grad)
    torch.testing.assert_close(xc.grad, expected, **TOL[dtype])
    torch.testing.assert_close(xe.grad, expected, **TOL[dtype])


def test_functional_ops_script():
    """The convolution_<rule> wrappers are TorchScript-compatible: a scripted function gives the eager
    output and relevance."""

    def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return lf.convolution_alpha_beta(x, w, None, [2], [1], [1], True, [1], 2, 2.0, 1.0)

    w, grad = torch.randn(4, 3, 3, dtype=torch.float64), torch.randn(2, 6, 14, dtype=torch.float64)
    xs = [torch.randn(2, 4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    ys = [f(x.requires_grad_(), w) for f, x in zip((forward, torch.jit.script(forward)), xs)]
    for y in ys:
        y.backward(grad)
    assert torch.equal(ys[0], ys[1]) and torch.equal(xs[0].grad, xs[1].grad)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_gamma_with_bias_equals_the_dense_reference(kind):
    """The gamma rule counts the bias as the weight of a constant input 1 (RULES.md section 3, as
    zennit does): compared also with the float64 transcription of
    reference.py over the convolution written as a dense matrix (y = x M^T + b per sample)."""
    import reference as ref

    layer, x = make(kind, torch.float64, bias=True)
    y = layer(x)
    n, n_in, n_out = x.shape[0], x[0].numel(), y[0].numel()
    basis = torch.eye(n_in, dtype=x.dtype).reshape(n_in, *x.shape[1:])
    dense = torch.convolution(basis, layer.weight.detach(), None, *geometry(layer)).reshape(n_in, n_out).T
    bias = layer.bias.detach().reshape(-1, *[1] * (y.dim() - 2)).expand(y.shape[1:]).reshape(-1)
    grad = torch.randn_like(y)
    expected = ref.vision_rule("gamma", x.reshape(n, n_in), dense, bias, grad.reshape(n, n_out), EPS, gamma=GAMMA)
    torch.testing.assert_close(rule_relevance(layer, "gamma", x, grad), expected.reshape(x.shape), **TOL[torch.float64])


# ----------------------------------------------------------------------------- the bias conventions
BIAS_RULES = ["alpha_beta", "z_plus", "w_square"]


def make_biased(kind, dtype):
    """A layer of ``kind`` (a convolution kind or "linear") with biases of both signs large enough to
    matter, and its input."""
    if kind == "linear":
        torch.manual_seed(0)
        layer, x = nn.Linear(7, 5).to(dtype).eval(), torch.randn(3, 4, 7, dtype=dtype)
    else:
        layer, x = make(kind, dtype, bias=True)
    with torch.no_grad():
        layer.bias.mul_(4.0)
    return layer, x


def biased_rule(rule, bias, eps=EPS):
    return {
        "alpha_beta": R.AlphaBeta(2.0, 1.0, eps, bias),
        "z_plus": R.ZPlus(eps, bias),
        "w_square": R.WSquare(eps, bias),
    }[rule]


def run_rule(r, layer, x, grad, gi=False):
    """The relevance (gi: the gradient) of x through the rule's op on ``layer`` (linear or any convolution)."""
    xr = x.clone().requires_grad_()
    if isinstance(layer, nn.Linear):
        y = r.linear(xr, layer.weight, layer.bias, None, gi)
        torch.testing.assert_close(y, layer(x), atol=0, rtol=0)
    else:
        y = r.convolution(xr, layer.weight, layer.bias, *geometry(layer), None, gi)
        torch.testing.assert_close(y, layer(x), atol=0, rtol=0)
    y.backward(grad / y if gi else grad)
    return xr.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("bias", ["ignore", "denominator"])
@pytest.mark.parametrize("rule", BIAS_RULES)
@pytest.mark.parametrize("kind", [*LAYERS, "linear"])
def test_bias_conventions_equal_zennit(kind, rule, bias, dtype):
    """On layers with a bias: bias="denominator" is zennit's rule on the layer as it is; bias="ignore"
    (the default) is zennit's rule on the same layer with its bias set to 0 (the bias left out)."""
    layer, x = make_biased(kind, dtype)
    grad = torch.randn_like(layer(x))
    reference_layer = layer
    if bias == "ignore":
        reference_layer = copy.deepcopy(layer)
        with torch.no_grad():
            reference_layer.bias.zero_()
    expected = zennit_relevance(reference_layer, rule, x, grad)
    got = run_rule(biased_rule(rule, bias), layer, x, grad)
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, expected, **TOL[dtype])


def dense(layer, x):
    """The layer as a dense matrix per sample, y = x M^T + b (flattened), and the flattened bias."""
    y = layer(x)
    n_in, n_out = x[0].numel(), y[0].numel()
    if isinstance(layer, nn.Linear):
        return layer.weight.detach(), layer.bias.detach()
    basis = torch.eye(n_in, dtype=x.dtype).reshape(n_in, *x.shape[1:])
    matrix = torch.convolution(basis, layer.weight.detach(), None, *geometry(layer)).reshape(n_in, n_out).T
    bias = layer.bias.detach().reshape(-1, *[1] * (y.dim() - 2)).expand(y.shape[1:]).reshape(-1)
    return matrix, bias


@pytest.mark.parametrize("rule", BIAS_RULES)
@pytest.mark.parametrize("kind", [*LAYERS, "linear"])
def test_bias_conventions_equal_the_dense_reference(kind, rule):
    """Both conventions against the float64 transcription of reference.py over the layer written as a
    dense matrix; they differ on a layer with a bias."""
    import reference as ref

    layer, x = make_biased(kind, torch.float64)
    grad = torch.randn_like(layer(x))
    matrix, b = dense(layer, x)
    flat_x, flat_r = (x, grad) if kind == "linear" else (x.flatten(1), grad.flatten(1))
    got = {}
    for bias in ("ignore", "denominator"):
        expected = ref.vision_rule(rule, flat_x, matrix, b, flat_r, EPS, alpha=2.0, beta=1.0, bias=bias)
        got[bias] = run_rule(biased_rule(rule, bias), layer, x, grad)
        torch.testing.assert_close(got[bias], expected.reshape(x.shape), **TOL[torch.float64])
    assert not torch.allclose(got["ignore"], got["denominator"], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("rule", BIAS_RULES)
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_bias_counted_keeps_the_bias_share(kind, rule):
    """Conservation with bias="denominator": each output passes on its relevance less the bias's share,
    sum_i R_i = sum_j R_j (alpha A_j / (A_j + b+_j) - beta B_j / (B_j + b-_j)) (z-plus: beta = 0;
    w-square: S_j / (S_j + b_j^2), S_j = sum_i w_ij^2); on a bias-free layer the option changes nothing
    (bitwise), and today's conservation holds."""
    layer, x = make_biased(kind, torch.float64)
    w, b = layer.weight.detach(), layer.bias.detach().reshape(-1, *[1] * (x.dim() - 2))

    def conv(inp, weight):
        return torch.convolution(inp, weight, None, *geometry(layer))

    mask = passing(layer, rule, x)
    grad = (torch.rand_like(layer(x)) + 0.1) * mask
    got = run_rule(biased_rule(rule, "denominator", eps=1e-12), layer, x, grad)
    if rule == "w_square":
        s = conv(torch.ones_like(x), w * w)
        kept = s / (s + b * b)
    else:
        xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
        a = conv(xp, wp) + conv(xn, wn)
        kept = a / (a + b.clamp(min=0))
        if rule == "alpha_beta":
            n = conv(xp, wn) + conv(xn, wp)
            kept = 2.0 * kept - 1.0 * n / (n + b.clamp(max=0))
    expected = (grad * torch.where(mask, kept, 0.0)).flatten(1).sum(1)
    torch.testing.assert_close(got.flatten(1).sum(1), expected, atol=0, rtol=1e-8)
    bare, _ = make(kind, torch.float64, bias=False)
    counted, ignored = (run_rule(biased_rule(rule, c), bare, x, grad) for c in ("denominator", "ignore"))
    assert torch.equal(counted, ignored)
    torch.testing.assert_close(
        run_rule(biased_rule(rule, "ignore", eps=1e-12), bare, x, grad * passing(bare, rule, x)).flatten(1).sum(1),
        (grad * passing(bare, rule, x)).flatten(1).sum(1),
        atol=0,
        rtol=1e-8,
    )


@pytest.mark.parametrize("rule", BIAS_RULES)
def test_bias_counted_in_gradient_form(rule):
    """gi=True with the bias counted: R_x / x (alpha-beta, z-plus, exact) or R_x / stab(x) (w-square)."""
    layer, x = make_biased("conv_transpose2d", torch.float64)
    grad = torch.randn_like(layer(x))
    explicit = run_rule(biased_rule(rule, "denominator"), layer, x, grad)
    g = run_rule(biased_rule(rule, "denominator"), layer, x, grad, gi=True)
    factor = x if rule != "w_square" else x + EPS * torch.where(x >= 0, 1.0, -1.0).to(x)
    torch.testing.assert_close(g * factor, explicit, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["conv2d", "conv1d", "linear"])
@pytest.mark.parametrize("rule", BIAS_RULES)
def test_bias_convention_reaches_patch_composite_and_modules(kind, rule):
    """A rule with bias="denominator" in a preset: lrpcpp.patch (explicit and gradient mode) and
    lrpcpp.Composite (through the drop-in modules, LinearZPlus(bias_in_denominator=True), ...) give
    zennit's relevance on a layer with a bias."""
    layer, x = make_biased(kind, torch.float64)
    model = nn.Sequential(layer)
    grad = torch.randn_like(layer(x))
    expected = zennit_relevance(layer, rule, x, grad)
    r = biased_rule(rule, "denominator")
    preset = Preset(types={nn.Linear: r, **{cls: r for cls in CONVOLUTIONS}}, merge_batch_norm=False)
    with lrpcpp.patch(model, preset=preset, mode="explicit"):
        xe = x.clone().requires_grad_()
        model(xe).backward(grad)
    torch.testing.assert_close(xe.grad, expected, **TOL[torch.float64])
    with lrpcpp.patch(model, preset=preset, mode="gradient"):
        xg = x.clone().requires_grad_()
        y = model(xg)
        y.backward(grad / y)
    factor = x if rule != "w_square" else x + EPS * torch.where(x >= 0, 1.0, -1.0).to(x)
    torch.testing.assert_close(xg.grad * factor, expected, atol=1e-9, rtol=1e-9)
    with lrpcpp.Composite(preset=preset).context(model):
        xc = x.clone().requires_grad_()
        model(xc).backward(grad)
    torch.testing.assert_close(xc.grad, expected, **TOL[torch.float64])


def test_bias_convention_of_rules_and_presets():
    """bias= is checked by name, reaches the presets' rules, and defaults to today's ("ignore")."""
    for cls in (R.AlphaBeta, R.ZPlus, R.WSquare):
        assert cls().bias == "ignore"
        with pytest.raises(ValueError, match=f"{cls.__name__}: expected bias to be one of"):
            cls(bias="zennit")
    assert lrpcpp.preset("epsilon_plus", bias="denominator").types[nn.Conv3d] == R.ZPlus(1e-6, "denominator")
    assert lrpcpp.preset("epsilon_alpha2_beta1_flat", bias="denominator").types[nn.Conv2d].bias == "denominator"
    assert lrpcpp.preset("epsilon_plus_flat").types[nn.Conv2d] == R.ZPlus()


# ----------------------------------------------------------------------------- drop-in modules
@pytest.mark.parametrize("kind", [k for k in sorted(LAYERS) if k != "conv2d"])
def test_convolution_drop_ins(kind):
    """lm.Conv1dRule, lm.Conv3dRule and lm.ConvTranspose1d/2d/3dRule: from_module shares the layer's
    parameters and returns exactly its output; the relevance is the rule's (zennit's on that layer)."""
    import lrpcpp.modules as lm

    layer, x = make(kind, torch.float64, bias=True)
    cls = lm.CONVOLUTION_RULE_MODULES[type(layer)]
    drop = cls.from_module(layer, rule=R.Gamma(GAMMA, EPS))
    assert isinstance(drop, type(layer)) and drop.weight is layer.weight and drop.bias is layer.bias
    assert f"rule=Gamma(gamma={GAMMA}" in repr(drop)
    grad = torch.randn_like(layer(x))
    xr = x.clone().requires_grad_()
    y = drop(xr)
    assert torch.equal(y, layer(x))
    y.backward(grad)
    torch.testing.assert_close(xr.grad, zennit_relevance(layer, "gamma", x, grad), **TOL[torch.float64])
    with pytest.raises(TypeError, match=f"{cls.__name__}: expected rule to be a layer rule"):
        cls.from_module(layer, rule="gamma")
    with pytest.raises(TypeError, match="expects a torch.nn.modules"):
        cls.from_module(nn.Linear(2, 2), rule=R.ZPlus())


def test_convolution_drop_in_constructors_and_geometry():
    """Built like torch's class (rule= as a keyword); string padding and padding modes pad first;
    a transposed drop-in takes output_size as torch's does."""
    import lrpcpp.modules as lm

    torch.manual_seed(0)
    conv = lm.Conv1dRule(4, 6, 3, padding="same", padding_mode="reflect", rule=R.ZPlus())
    x = torch.randn(2, 4, 9)
    assert isinstance(conv, nn.Conv1d)
    assert torch.equal(conv(x), nn.Conv1d.forward(conv, x))
    conv3 = lm.Conv3dRule(2, 3, 2, stride=2, bias=False, rule=R.Flat(), gi=True)
    assert conv3.gi and conv3.bias is None
    up = lm.ConvTranspose2dRule(3, 2, 3, stride=2, padding=1, rule=R.WSquare(bias="denominator"))
    x2 = torch.randn(1, 3, 4, 5)
    assert torch.equal(up(x2, output_size=[8, 10]), nn.ConvTranspose2d.forward(up, x2, output_size=[8, 10]))
    with pytest.raises(TypeError, match="unexpected keyword argument 'gamma'"):
        lm.ConvTranspose1dRule(3, 2, 3, rule=R.ZPlus(), gamma=0.1)
    with pytest.raises(TypeError, match="ConvTranspose1dRule: expected rule to be a layer rule"):
        lm.ConvTranspose1dRule(3, 2, 3)


def test_composite_uses_the_convolution_drop_ins():
    """lrpcpp.Composite replaces a 3-D convolution by lm.Conv3dRule with the preset's rule."""
    import lrpcpp.modules as lm

    layer, x = make("conv3d", torch.float64, bias=False)
    model = nn.Sequential(layer)
    with lrpcpp.Composite(preset=preset_for("z_plus", x)).context(model):
        assert isinstance(model[0], lm.Conv3dRule) and model[0].rule == R.ZPlus(EPS)
    assert model[0] is layer


# ----------------------------------------------------------------------------- pooling ops
# (layer, input shape): 1 to 3 dimensions, batched or not, with torch's arguments other than their defaults
POOLS = [
    (lambda: nn.AvgPool1d(3, 2, 1), (3, 9)),
    (lambda: nn.AvgPool2d((2, 3), (2, 1), (1, 1), ceil_mode=True, count_include_pad=False), (2, 3, 6, 7)),
    (lambda: nn.AvgPool3d(2, 1, divisor_override=3), (2, 3, 4, 5, 4)),
    (lambda: nn.AdaptiveAvgPool1d(4), (2, 3, 9)),
    (lambda: nn.AdaptiveAvgPool2d((2, None)), (2, 3, 5, 4)),
    (lambda: nn.AdaptiveAvgPool3d(2), (3, 4, 5, 3)),
    (lambda: nn.MaxPool1d(3, 2, dilation=2), (2, 3, 11)),
    (lambda: nn.MaxPool2d(2, padding=1, ceil_mode=True), (3, 6, 5)),
    (lambda: nn.MaxPool3d(2, (1, 2, 1), dilation=(1, 2, 1)), (2, 3, 4, 5, 4)),
]
POOL_IDS = [type(f()).__name__ + str(len(s)) for f, s in POOLS]


def pool_op(layer, x, gi=False):
    """The layer through its native op (what the explicit treatment calls)."""
    name = type(layer).__name__
    n = int(name[-2])
    if name.startswith("Adaptive"):
        size = layer.output_size if isinstance(layer.output_size, tuple) else (layer.output_size,) * n
        spatial = x.shape[x.dim() - n :]
        return lf.adaptive_avg_pool_epsilon(x, [spatial[i] if s is None else s for i, s in enumerate(size)], EPS, gi)

    def ints(v):
        return [v] * n if isinstance(v, int) else list(v)

    if name.startswith("Avg"):
        return lf.avg_pool_epsilon(
            x,
            ints(layer.kernel_size),
            ints(layer.stride),
            ints(layer.padding),
            layer.ceil_mode,
            layer.count_include_pad,
            getattr(layer, "divisor_override", None),
            EPS,
            gi,
        )
    return lf.max_pool_wta(
        x, ints(layer.kernel_size), ints(layer.stride), ints(layer.padding), ints(layer.dilation), layer.ceil_mode, gi
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("factory, shape", POOLS, ids=POOL_IDS)
def test_pooling_ops_equal_the_float64_transcription(factory, shape, dtype):
    """avg_pool_epsilon and adaptive_avg_pool_epsilon (R_x = x * P^T (R / stab(y))) and max_pool_wta
    (each window's relevance to its maximum) against float64 transcriptions; the forward is torch's
    pooling, bitwise; gi=True returns g_x with x * g_x the relevance (max pooling: the plain gradient)."""
    import reference as ref

    layer = factory()
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    xr = x.clone().requires_grad_()
    y = pool_op(layer, xr)
    assert torch.equal(y, layer(x))
    grad = torch.randn_like(y)
    y.backward(grad)
    x64, r64 = x.double(), grad.double()
    if "Max" in type(layer).__name__:
        n = int(type(layer).__name__[-2])
        layer.return_indices = True
        _, indices = layer(x)
        expected = ref.winner_takes_all(x64, r64, indices, n)
    else:
        expected = ref.linear_map_epsilon(lambda t: factory()(t), x64, r64, EPS)
    assert xr.grad.abs().sum() > 0
    # float32: the epsilon rule divides by outputs near 0, so its rounding error is relative to the largest share
    tol = dict(rtol=1e-5, atol=1e-5 * float(expected.abs().max())) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(xr.grad.double(), expected, **tol)
    xg = x.clone().requires_grad_()
    yg = pool_op(layer if "Max" not in type(layer).__name__ else factory(), xg, gi=True)
    yg.backward(grad / yg)
    torch.testing.assert_close((x * xg.grad).double(), expected, **tol)
    if "Max" in type(layer).__name__:
        xp = x.clone().requires_grad_()
        factory()(xp).backward(grad / yg)
        assert torch.equal(xg.grad, xp.grad)


class Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.avg, self.max, self.ada = nn.AvgPool2d(2), nn.MaxPool1d(2), nn.AdaptiveAvgPool3d(1)

    def forward(self, x):  # [2, 4, 8, 8]
        h = self.max(self.avg(x).flatten(2))  # [2, 4, 8]
        return self.ada(h.reshape(2, 4, 2, 2, 2))


@pytest.mark.parametrize("mode", ["explicit", "composite"])
def test_pooling_runs_the_native_ops(mode):
    """The explicit treatment (lrpcpp.patch explicit mode, lrpcpp.Composite) computes nn.AvgPool*,
    nn.AdaptiveAvgPool* and nn.MaxPool* through the native ops: their outputs come from the ops'
    autograd nodes."""
    model = Pools()
    names = []
    for layer in (model.avg, model.max, model.ada):
        layer.register_forward_hook(lambda m, i, o: names.append(o.grad_fn.name()))
    context = lrpcpp.patch(model, mode="explicit") if mode == "explicit" else lrpcpp.Composite().context(model)
    with context:
        model(torch.randn(2, 4, 8, 8, requires_grad=True)).sum().backward()
    assert len(names) == 3 and all("PoolFunction" in n for n in names), names


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: lf.avg_pool_epsilon(x, [2, 2, 2, 2]), "avg_pool_epsilon: expected kernel_size to have 1 to 3"),
        (lambda x: lf.avg_pool_epsilon(x[0, 0], [2, 2, 2]), "avg_pool_epsilon: expected x to be 4-D or 5-D"),
        (lambda x: lf.avg_pool_epsilon(x[0], [2], divisor_override=2), "avg_pool_epsilon: a 1-D average pooling"),
        (lambda x: lf.avg_pool_epsilon(x, [2, 2], padding=[2, 2]), "avg_pool_epsilon: expected padding >= 0 and"),
        (lambda x: lf.max_pool_wta(x, [9, 2]), "max_pool_wta: expected the \\(dilated\\) kernel"),
        (lambda x: lf.max_pool_wta(x, [2, 2], [1, 1, 1]), "max_pool_wta: expected stride to have 2 values"),
        (lambda x: lf.adaptive_avg_pool_epsilon(x, [0, 2]), "adaptive_avg_pool_epsilon: expected output_size >= 1"),
        (
            lambda x: torch.ops.lrpcpp.avg_pool_epsilon_relevance(
                x, x, x, [2, 2], [], [0], False, True, None, EPS, False
            ),
            "avg_pool_epsilon_relevance: expected output to have the shape",
        ),
    ],
)
def test_pooling_ops_name_bad_arguments(call, match):
    with pytest.raises(RuntimeError, match=f"lrpcpp.{match}"):
        call(torch.randn(2, 3, 8, 8))


def test_pooling_op_defaults_are_torchs():
    """stride None or [] is the kernel size, padding None or [] is 0, dilation None or [] is 1; one value
    stands for every dimension: the output is torch's."""
    x = torch.randn(2, 3, 7, 8)
    expected_avg, expected_max = F.avg_pool2d(x, 3), F.max_pool2d(x, 3)
    for stride, padding in ((None, None), ([], []), ([3], [0])):
        assert torch.equal(lf.avg_pool_epsilon(x, [3, 3], stride, padding), expected_avg)
        assert torch.equal(lf.max_pool_wta(x, [3, 3], stride, padding, [] if stride == [] else None), expected_max)

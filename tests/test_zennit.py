"""lrpcpp's presets against zennit's composites (zennit==0.5.1, requirements-nodeps.txt) on a whole
torchvision-style ResNet with batch norms, residual blocks, max and average pooling, in float64.

zennit needs two canonizers on this model: batch norms merged into the convolutions before them, and
each residual block's ``out += identity`` made a ``Sum`` module that takes the Norm rule
(``R_a = a R / stab(a + b)``), without which the addition passes the whole relevance to both of its
inputs. lrpcpp merges the batch norms itself (for the duration of the call) and needs nothing for the
sum: its treatment of an addition is that rule already (the plain gradient in gradient mode, ``add2``
in explicit mode). The comparisons below use zennit's merge and zennit's own block forward.

Where the two libraries' rules differ: zennit's z-plus and alpha-beta put the bias into their
denominators (``b+`` in the positive, ``b-`` in the negative sum), lrpcpp's leave it out; those
presets are compared on copies whose merged layers have no bias (batch norms with zero mean and
shift, a linear layer without bias). Gamma, z-box, flat and epsilon agree with bias, so
epsilon-gamma-box is compared on the model as it is. zennit's merge leaves each batch norm as
``x / sqrt(1 + eps)``, not the identity, so the copies use batch norms with ``eps = 0``.
"""

import lrpcpp
import pytest
import torch
import vision_models as vm
from torch import nn
from zennit_import import import_zennit

zennit = import_zennit()
from zennit import composites as zc  # noqa: E402
from zennit.canonizers import AttributeCanonizer, SequentialMergeBatchNorm  # noqa: E402
from zennit.layer import Sum  # noqa: E402
from zennit.torchvision import ResNetBasicBlockCanonizer  # noqa: E402

EPS = 1e-12
TARGET = torch.tensor([0, 1])


class BlockSum(AttributeCanonizer):
    """zennit's ResNet BasicBlock canonizer (its forward and Sum module) for vision_models.BasicBlock."""

    def __init__(self):
        super().__init__(self._attribute_map)

    @staticmethod
    def _attribute_map(name, module):
        if isinstance(module, vm.BasicBlock):
            return {"forward": ResNetBasicBlockCanonizer.forward.__get__(module), "canonizer_sum": Sum()}
        return None


def canonizers(residual=True):
    return [SequentialMergeBatchNorm()] + ([BlockSum()] if residual else [])


def model_copy(bias=True):
    """The test ResNet with exact batch-norm merges (eps = 0); without bias: no merged layer has one."""
    model = vm.resnet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = 0.0
                if not bias:
                    m.running_mean.zero_()
                    m.bias.zero_()
        if not bias:
            model.fc.bias.zero_()
    return model


def zennit_relevance(model, x, composite):
    x = x.clone().requires_grad_()
    with composite.context(model) as modified:
        y = modified(x)
        y.backward(torch.eye(y.shape[1], dtype=y.dtype)[TARGET] * y)  # the target logits as relevance
    return x.grad


def lrpcpp_relevance(model, x, preset, mode="gradient"):
    # gradient mode: epsilon of the activations' identity rule (f(x) / stab(x)) near 0 too
    epsilon = 1e-15 if mode == "gradient" else EPS
    return lrpcpp.attribute(model, pixel_values=x, preset=preset, target=TARGET, mode=mode, epsilon=epsilon).relevance


def low_high(x):
    return vm.LOW.expand(x.shape), vm.HIGH.expand(x.shape)


COMPOSITES = [
    ("EpsilonPlus", lambda x, c: zc.EpsilonPlus(epsilon=EPS, stabilizer=EPS, canonizers=c), {}),
    ("EpsilonPlusFlat", lambda x, c: zc.EpsilonPlusFlat(epsilon=EPS, stabilizer=EPS, canonizers=c), {}),
    ("EpsilonAlpha2Beta1", lambda x, c: zc.EpsilonAlpha2Beta1(epsilon=EPS, stabilizer=EPS, canonizers=c), {}),
    ("EpsilonAlpha2Beta1Flat", lambda x, c: zc.EpsilonAlpha2Beta1Flat(epsilon=EPS, stabilizer=EPS, canonizers=c), {}),
    (
        "EpsilonGammaBox",
        lambda x, c: zc.EpsilonGammaBox(*low_high(x), epsilon=EPS, stabilizer=EPS, canonizers=c),
        {"low": vm.LOW, "high": vm.HIGH},
    ),
]


def assert_same(actual, expected):
    scale = expected.abs().max()
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-9 * scale)


@pytest.mark.parametrize("mode", ["gradient", "explicit"])
@pytest.mark.parametrize("name,make,options", COMPOSITES, ids=[c[0] for c in COMPOSITES])
def test_presets_equal_zennits_composites_on_a_resnet_without_bias(name, make, options, mode):
    model, x = model_copy(bias=False), vm.images()
    expected = zennit_relevance(model, x, make(x, canonizers()))
    assert_same(lrpcpp_relevance(model, x, lrpcpp.preset(name, epsilon=EPS, **options), mode), expected)


def test_epsilon_gamma_box_equals_zennit_with_bias():
    """gamma, z-box and epsilon treat the bias as zennit does (the gamma rule: b + gamma b+ in the denominator
    of outputs z > 0)."""
    model, x = model_copy(bias=True), vm.images()
    assert model.fc.bias.abs().sum() > 0 and model.bn1.bias.abs().sum() > 0 and model.bn1.running_mean.abs().sum() > 0
    expected = zennit_relevance(model, x, COMPOSITES[-1][1](x, canonizers()))
    preset = lrpcpp.preset("EpsilonGammaBox", low=vm.LOW, high=vm.HIGH, epsilon=EPS)
    assert_same(lrpcpp_relevance(model, x, preset), expected)
    assert_same(lrpcpp_relevance(model, x, preset, "explicit"), expected)


def test_the_residual_sum_needs_zennits_canonizer_and_nothing_in_lrpcpp():
    """Without its Sum canonizer zennit passes the relevance of ``out + identity`` whole to both inputs;
    lrpcpp's addition is the Norm rule zennit's canonizer puts on the sum."""
    model, x = model_copy(bias=False), vm.images()
    ours = lrpcpp_relevance(model, x, lrpcpp.preset("epsilon_plus", epsilon=EPS))
    with_sum = zennit_relevance(model, x, zc.EpsilonPlus(epsilon=EPS, stabilizer=EPS, canonizers=canonizers()))
    without = zennit_relevance(model, x, zc.EpsilonPlus(epsilon=EPS, stabilizer=EPS, canonizers=canonizers(False)))
    assert_same(ours, with_sum)
    assert (without - ours).abs().max() > 0.1 * ours.abs().max()


def test_the_model_is_restored_bitwise():
    model, x = vm.resnet(), vm.images()
    params = {n: p for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    for name, _, options in COMPOSITES:
        lrpcpp_relevance(model, x, lrpcpp.preset(name, **options))
        lrpcpp_relevance(model, x, lrpcpp.preset(name, **options), "explicit")
    after_state = model.state_dict()
    assert state.keys() == after_state.keys()
    for k, v in state.items():
        assert torch.equal(v, after_state[k]), k
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(not m.training for m in model.modules())  # vm.resnet() is in eval mode, and stays so
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_zennit_names_are_aliases_of_the_presets():
    for alias, name in lrpcpp.models.presets.PRESET_ALIASES.items():
        assert alias not in lrpcpp.PRESETS and name in lrpcpp.PRESETS
        options = {"low": 0.0, "high": 1.0} if name == "epsilon_gamma_box" else {}
        a, b = lrpcpp.preset(alias, **options), lrpcpp.preset(name, **options)
        assert repr(a) == repr(b) and a.name == name
    with pytest.raises(ValueError, match="zennit's names: EpsilonAlpha2Beta1"):
        lrpcpp.preset("EpsilonGamma")

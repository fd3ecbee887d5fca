"""torch.library.opcheck on every lrpcpp op (schema, autograd registration, fake/Meta kernel,
AOTAutograd with static and dynamic shapes), with and without requires_grad."""

import lrpcpp  # noqa: F401
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

ops = torch.ops.lrpcpp
f64 = torch.float64


def t(*shape, grad=False, offset=0.0):
    return (torch.randn(*shape, dtype=f64) + offset).requires_grad_(grad)


def with_silu(x):
    """x and y = silu(x), the arguments of the gradient-times-input identity rule."""
    return x, torch.nn.functional.silu(x.detach())


def _attention_relevance_sample(g):
    q, k, v = t(2, 2, 4, 3, grad=g), t(2, 1, 5, 3, grad=g), t(2, 1, 5, 2)
    out, lse = ops.scaled_dot_product_attention_forward(q.detach(), k.detach(), v, None, True, None, True)
    return (t(2, 2, 4, 2, grad=g), q, k, v, None, out, lse, True, None, True, 1e-8, [True, True, True])


# op name -> function(requires_grad) -> args; `grad` marks the tensors that may carry relevance
SAMPLES = {
    "linear_epsilon": lambda g: (t(2, 3, 5, grad=g), t(4, 5), t(4), 1e-6),
    "linear_epsilon_relevance": lambda g: (t(2, 3, 4, grad=g), t(2, 3, 5, grad=g), t(4, 5), t(2, 3, 4), 1e-6),
    "conv2d_epsilon": lambda g: (t(1, 2, 5, 5, grad=g), t(3, 2, 3, 3), t(3), [1, 1], [1, 1], [1, 1], 1, 1e-6),
    "conv2d_epsilon_relevance": lambda g: (
        t(1, 3, 5, 5, grad=g),
        t(1, 2, 5, 5, grad=g),
        t(3, 2, 3, 3),
        t(1, 3, 5, 5),
        [1, 1],
        [1, 1],
        [1, 1],
        1,
        1e-6,
    ),
    "stab_div": lambda g: (t(3, 4, grad=g), t(3, 4, grad=g), 1e-6, 2.0, None),
    "add2": lambda g: (t(3, 4, grad=g), t(4, grad=g), 1e-8),
    "add2_relevance": lambda g: (t(3, 4, grad=g), t(3, 4, grad=g), t(4), 1e-8, [True, True]),
    "mul2": lambda g: (t(3, 4, grad=g), t(3, 4, grad=g)),
    "mul2_relevance": lambda g: (t(3, 4, grad=g), t(3, 4), t(1, 4), [True, False]),
    "matmul": lambda g: (t(2, 3, 4, grad=g), t(4, 5, grad=g), 1e-8),
    "matmul_relevance": lambda g: (t(2, 3, 5, grad=g), t(2, 3, 4, grad=g), t(4, 5), t(2, 3, 5), 1e-8, [True, True]),
    "softmax": lambda g: (t(3, 4, 5, grad=g), 1, 2.0, None),
    "softmax_relevance": lambda g: (t(3, 5, grad=g), t(3, 5, grad=g), torch.softmax(t(3, 5), -1), -1, 1.0),
    # fused attention: GQA (2 query heads on 1 key head), float / bool masks, causal
    "scaled_dot_product_attention": lambda g: (
        t(2, 2, 4, 3, grad=g),
        t(2, 1, 5, 3, grad=g),
        t(2, 1, 5, 2, grad=g),
        t(4, 5),
        False,
        0.5,
        True,
        "attnlrp",
        1e-8,
    ),
    "scaled_dot_product_attention_forward": lambda g: (
        t(2, 2, 4, 3, grad=g),
        t(2, 2, 5, 3, grad=g),
        t(2, 2, 5, 2, grad=g),
        torch.rand(2, 1, 4, 5, generator=torch.Generator().manual_seed(0)) > 0.3,
        False,
        None,
        False,
    ),
    "scaled_dot_product_attention_relevance": lambda g: _attention_relevance_sample(g),
    "rms_norm_identity": lambda g: (t(2, 3, 6, grad=g), [6], t(6), 1e-6),
    "layer_norm": lambda g: (t(2, 3, 6, grad=g), [6], t(6), t(6), 1e-5, 1e-6),
    "layer_norm_relevance": lambda g: (t(2, 3, 6, grad=g), t(2, 3, 6, grad=g), [6], t(6), t(6), 1e-5, 1e-6),
    "layer_norm_identity": lambda g: (t(2, 3, 6, grad=g), [3, 6], None, None, 1e-5),
    "normalize_identity": lambda g: (t(4, 6, grad=g), 2.0, 1, 1e-12),
    "mean": lambda g: (t(3, 4, 5, grad=g, offset=0.5), [1], False, 1e-6),
    "mean_relevance": lambda g: (t(3, 5, grad=g), t(3, 4, 5, grad=g, offset=0.5), [1], False, 1e-6),
    "silu_identity": lambda g: (t(3, 4, grad=g),),
    "gelu_identity": lambda g: (t(3, 4, grad=g), "tanh"),
    "tanh_identity": lambda g: (t(3, 4, grad=g),),
    "relu_identity": lambda g: (t(3, 4, grad=g),),
    "sigmoid_identity": lambda g: (t(3, 4, grad=g),),
    "identity_relevance": lambda g: (t(3, 4, grad=g), torch.float32),
    "stop_relevance": lambda g: (t(3, 4, grad=g),),
    "gi_identity": lambda g: (*with_silu(t(3, 4, grad=g)), 1e-10),
    "gi_identity_factor": lambda g: (*with_silu(t(3, 4, grad=g)), 1e-10),
    "gi_grad_scale": lambda g: (t(2, 3, 6, grad=g), t(6)),
    # a transposed gradient, whose layout the output keeps
    "gi_scale_backward": lambda g: (t(2, 6, 3, grad=g).transpose(1, 2), t(6, grad=g), torch.float32),
    "gi_layer_norm": lambda g: (t(2, 3, 6, grad=g), [6], t(6), t(6), 1e-5),
    "gi_layer_norm_backward": lambda g: (t(2, 3, 6, grad=g), t(2, 3, 1, grad=g, offset=2.0), [6], t(6)),
    "cuda_version": lambda g: (),
    # rules for vision and convolution layers (RULES.md section 3); the optional weight transforms
    # are passed in some samples and left out in others, gi=True in some
    "linear_gamma": lambda g: (t(2, 3, 5, grad=g), t(4, 5), t(4), 0.25, 1e-6, t(4, 5).abs(), False),
    "linear_gamma_relevance": lambda g: (
        t(2, 3, 4, grad=g),
        t(2, 3, 5, grad=g),
        t(4, 5),
        t(4),
        None,
        t(2, 3, 4),
        0.25,
        1e-6,
        True,
    ),
    "linear_alpha_beta": lambda g: (t(3, 5, grad=g), t(4, 5), t(4), 2.0, 1.0, 1e-6, None, None, True, True),
    "linear_alpha_beta_relevance": lambda g: (
        t(3, 4, grad=g),
        t(3, 5, grad=g),
        t(4, 5),
        t(4, 5).clamp(min=0),
        t(4, 5).clamp(max=0),
        t(3, 4),
        2.0,
        1.0,
        1e-6,
        False,
        t(4),
    ),
    "linear_z_plus": lambda g: (t(3, 5, grad=g, offset=2.0), t(4, 5), None, 1e-6, None, False),
    "linear_z_plus_relevance": lambda g: (
        t(3, 4, grad=g),
        t(3, 5, grad=g, offset=2.0),
        t(4, 5),
        None,
        t(3, 4),
        1e-6,
        True,
        t(4),
    ),
    "linear_z_box": lambda g: (t(3, 5, grad=g), t(4, 5), t(4), t(5) - 4.0, t(5) + 4.0, 1e-6, None, True),
    "linear_z_box_relevance": lambda g: (
        t(3, 4, grad=g),
        t(3, 5, grad=g),
        t(4, 5),
        t(1) - 4.0,
        t(5) + 4.0,
        None,
        t(3, 4),
        1e-6,
        False,
    ),
    "linear_flat": lambda g: (t(3, 5, grad=g), t(4, 5), t(4), 1e-6, False),
    "linear_flat_relevance": lambda g: (t(3, 4, grad=g), t(3, 5, grad=g), t(4, 5), t(3, 4), 1e-6, True),
    "linear_w_square": lambda g: (t(3, 5, grad=g), t(4, 5), t(4), 1e-6, None, True, True),
    "linear_w_square_relevance": lambda g: (
        t(3, 4, grad=g),
        t(3, 5, grad=g),
        t(4, 5),
        t(4, 5) ** 2,
        t(3, 4),
        1e-6,
        False,
        t(4),
    ),
    "conv2d_gamma": lambda g: (
        t(1, 2, 5, 5, grad=g),
        t(3, 2, 3, 3),
        t(3),
        [1, 1],
        [1, 1],
        [1, 1],
        1,
        0.25,
        1e-6,
        None,
        True,
    ),
    "conv2d_gamma_relevance": lambda g: (
        t(1, 3, 5, 5, grad=g),
        t(1, 2, 5, 5, grad=g),
        t(3, 2, 3, 3),
        t(3),
        t(3, 2, 3, 3).abs(),
        t(1, 3, 5, 5),
        [1, 1],
        [1, 1],
        [1, 1],
        1,
        0.25,
        1e-6,
        False,
    ),
    "conv2d_alpha_beta": lambda g: (
        t(1, 2, 5, 5, grad=g),
        t(3, 2, 3, 3),
        None,
        [2, 2],
        [1, 1],
        [1, 1],
        1,
        1.5,
        0.5,
        1e-6,
        None,
        None,
        False,
    ),
    "conv2d_alpha_beta_relevance": lambda g: (
        t(1, 3, 5, 5, grad=g),
        t(1, 2, 5, 5, grad=g),
        t(3, 2, 3, 3),
        None,
        None,
        t(1, 3, 5, 5),
        [1, 1],
        [1, 1],
        [1, 1],
        1,
        2.0,
        1.0,
        1e-6,
        True,
        t(3),
    ),
    "conv2d_z_plus": lambda g: (
        t(1, 4, 5, 5, grad=g, offset=2.0),
        t(4, 2, 3, 3),
        t(4),
        [1, 1],
        [0, 0],
        [1, 1],
        2,
        1e-6,
        None,
        True,
        True,
    ),
    "conv2d_z_plus_relevance": lambda g: (
        t(1, 3, 3, 3, grad=g),
        t(1, 2, 5, 5, grad=g, offset=2.0),
        t(3, 2, 3, 3),
        t(3, 2, 3, 3).clamp(min=0),
        t(1, 3, 3, 3),
        [1, 1],
        [0, 0],
        [1, 1],
        1,
        1e-6,
        False,
    ),
    "conv2d_z_box": lambda g: (
        t(1, 2, 5, 5, grad=g),
        t(3, 2, 3, 3),
        t(3),
        t(2, 1, 1) - 4.0,
        t(2, 1, 1) + 4.0,
        [1, 1],
        [1, 1],
        [1, 1],
        1,
        1e-6,
        None,
        False,
    ),
    "conv2d_z_box_relevance": lambda g: (
        t(1, 3, 5, 5, grad=g),
        t(1, 2, 5, 5, grad=g),
        t(3, 2, 3, 3),
        t(1) - 4.0,
        t(1) + 4.0,
        None,
        t(1, 3, 5, 5),
        [1, 1],
        [1, 1],
        [1, 1],
        1,
        1e-6,
        True,
    ),
    "conv2d_flat": lambda g: (t(1, 2, 5, 5, grad=g), t(3, 2, 3, 3), t(3), [1, 1], [1, 1], [2, 2], 1, 1e-6, True),
    "conv2d_flat_relevance": lambda g: (
        t(1, 3, 5, 5, grad=g),
        t(1, 2, 5, 5, grad=g),
        t(3, 2, 3, 3),
        t(1, 3, 5, 5),
        [1, 1],
        [1, 1],
        [1, 1],
        1,
        1e-6,
        False,
    ),
    "conv2d_w_square": lambda g: (
        t(1, 2, 5, 5, grad=g),
        t(3, 2, 3, 3),
        t(3),
        [1, 1],
        [1, 1],
        [1, 1],
        1,
        1e-6,
        t(3, 2, 3, 3) ** 2,
        False,
        True,
    ),
    "conv2d_w_square_relevance": lambda g: (
        t(1, 3, 5, 5, grad=g),
        t(1, 2, 5, 5, grad=g),
        t(3, 2, 3, 3),
        None,
        t(1, 3, 5, 5),
        [1, 1],
        [1, 1],
        [1, 1],
        1,
        1e-6,
        True,
        t(3),
    ),
    "gamma_stab_div": lambda g: (
        t(2, 3, 4, 4, grad=g),
        t(2, 3, 4, 4, grad=g),
        t(2, 3, 4, 4).abs(),
        t(3),
        1,
        0.25,
        1e-6,
        False,
    ),
    "alpha_beta_stab_div": lambda g: (
        t(3, 4, grad=g),
        t(3, 4, grad=g),
        t(3, 4).abs(),
        -t(3, 4).abs(),
        2.0,
        1.0,
        1e-6,
        True,
    ),
    "split_times_input": lambda g: (t(3, 4, grad=g), t(3, 4, grad=g), t(3, 4, grad=g), False),
}


# the rules that take bias_in_denominator (their relevance ops then take the bias)
BIAS_RULES = ("alpha_beta", "z_plus", "w_square")


def _convolution_samples():
    """The convolution_<rule> ops and their relevance ops, on a transposed 1-D convolution with groups
    and output_padding, or a 3-D one with stride, padding, dilation and groups (alternating)."""
    # (x shape, weight shape, stride, padding, dilation, transposed, output_padding, groups)
    geometries = [
        ((1, 4, 5), (4, 3, 3), [2], [1], [1], True, [1], 2),
        ((1, 4, 4, 5, 4), (6, 2, 2, 3, 2), [1, 2, 1], [1, 0, 1], [1, 1, 2], False, [0, 0, 0], 2),
    ]
    # rule -> (arguments between the geometry and gi, of the forward; of the relevance op)
    rules = {
        "epsilon": None,
        "gamma": ((0.25, 1e-6, None), (0.25, 1e-6)),
        "alpha_beta": ((2.0, 1.0, 1e-6, None, None), (2.0, 1.0, 1e-6)),
        "z_plus": ((1e-6, None), (1e-6,)),
        "z_box": ((1e-6, None), (1e-6,)),
        "flat": ((1e-6,), (1e-6,)),
        "w_square": ((1e-6, None), (1e-6,)),
    }
    samples = {}
    for i, (rule, params) in enumerate(rules.items()):
        xs, ws, *geo = geometries[i % 2]
        y = torch.convolution(torch.randn(xs, dtype=f64), torch.randn(ws, dtype=f64), None, *geo)
        ys, channels = tuple(y.shape), y.shape[1]

        def forward(g, rule=rule, params=params, xs=xs, ws=ws, geo=geo, channels=channels):
            x, w, b = t(*xs, grad=g, offset=0.5), t(*ws), t(channels)
            if rule == "epsilon":
                return (x, w, b, *geo, 1e-6)
            bounds = (t(xs[1], *[1] * (len(xs) - 2), offset=-3.0), t(xs[1], *[1] * (len(xs) - 2), offset=3.0))
            counted = (True,) if rule in BIAS_RULES else ()  # bias_in_denominator
            return (x, w, b, *(bounds if rule == "z_box" else ()), *geo, *params[0], False, *counted)

        def relevance(g, rule=rule, params=params, xs=xs, ws=ws, ys=ys, geo=geo, channels=channels):
            grad, x, w, out = t(*ys, grad=g), t(*xs, grad=g, offset=0.5), t(*ws), t(*ys)
            if rule == "epsilon":
                return (grad, x, w, out, *geo, 1e-6)
            lead = {
                "gamma": (t(channels), None, out),
                "alpha_beta": (None, None, out),
                "z_plus": (None, out),
                "z_box": (
                    t(xs[1], *[1] * (len(xs) - 2), offset=-3.0),
                    t(xs[1], *[1] * (len(xs) - 2), offset=3.0),
                    None,
                    out,
                ),
                "flat": (out,),
                "w_square": (None, out),
            }[rule]
            counted = (t(channels),) if rule in BIAS_RULES else ()  # the bias, counted in the denominators
            return (grad, x, w, *lead, *geo, *params[1], True, *counted)

        samples[f"convolution_{rule}"] = forward
        samples[f"convolution_{rule}_relevance"] = relevance
    return samples


SAMPLES.update(_convolution_samples())


def _pooling_samples():
    """The pooling ops (1 to 3 spatial dimensions, batched or not) and their relevance ops; the output
    shapes from torch's own pooling."""
    avg = ((2, 3, 6, 7), [2, 3], [2, 1], [1, 1], True, False, None)
    avg_y = F.avg_pool2d(torch.zeros(avg[0]), *avg[1:]).shape
    pool = ((2, 3, 4, 5, 4), [2, 2, 2], [1, 2, 1], [1, 0, 1], [1, 1, 2], True)
    pool_y = F.max_pool3d(torch.zeros(pool[0]), *pool[1:]).shape
    return {
        "avg_pool_epsilon": lambda g: (t(*avg[0], grad=g), *avg[1:], 1e-6, False),
        "avg_pool_epsilon_relevance": lambda g: (
            t(*avg_y, grad=g),
            t(*avg[0], grad=g),
            t(*avg_y),
            *avg[1:],
            1e-6,
            True,
        ),
        "adaptive_avg_pool_epsilon": lambda g: (t(3, 5, grad=g), [3], 1e-6, True),
        "adaptive_avg_pool_epsilon_relevance": lambda g: (
            t(2, 3, 2, 3, 2, grad=g),
            t(2, 3, 4, 5, 4, grad=g),
            t(2, 3, 2, 3, 2),
            [2, 3, 2],
            1e-6,
            False,
        ),
        "max_pool_wta": lambda g: (t(*pool[0], grad=g), *pool[1:], False),
        "max_pool_wta_relevance": lambda g: (t(*pool_y, grad=g), t(*pool[0], grad=g), t(*pool_y), *pool[1:], True),
    }


SAMPLES.update(_pooling_samples())


# ops without a derivative: the relevance ops, and the primitives and gradient-times-input
# backward ops that the backwards call
RELEVANCE_OPS = {name for name in SAMPLES if name.endswith("_relevance") and name != "stop_relevance"} | {
    "stab_div",
    "gi_identity_factor",
    "gi_scale_backward",
    "gi_layer_norm_backward",
    "gamma_stab_div",
    "alpha_beta_stab_div",
    "split_times_input",
    "scaled_dot_product_attention_forward",
}


def test_every_registered_op_has_a_sample():
    """Every op registered in the lrpcpp namespace has a sample (so opcheck and the CUDA checks of
    test_cuda.py, which take their op list from SAMPLES, run on it), and every sample is a registered op."""
    registered = {
        n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("lrpcpp::")
    }
    assert len(registered) > 50
    assert not registered - set(SAMPLES), f"lrpcpp ops with no sample in SAMPLES: {sorted(registered - set(SAMPLES))}"
    assert not set(SAMPLES) - registered, f"samples of ops that are not registered: {sorted(set(SAMPLES) - registered)}"


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck(name, requires_grad):
    op = getattr(ops, name).default
    args = SAMPLES[name](requires_grad)
    if requires_grad and name in RELEVANCE_OPS:
        # A relevance op has no derivative (relevance is not a gradient): every check but the
        # AOTAutograd backward applies, and a backward through it must raise, naming the op.
        opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        out = op(*args)
        first = out[0] if isinstance(out, tuple) else out
        with pytest.raises(RuntimeError, match=f"derivative for lrpcpp::{name} is not implemented"):
            first.sum().backward()
    else:
        opcheck(op, args)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_opcheck_gi_identity_keeping_its_inputs(requires_grad):
    opcheck(ops.gi_identity.default, (*SAMPLES["gi_identity"](requires_grad), True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "name",
    [
        "linear_epsilon",
        "softmax",
        "layer_norm",
        "add2",
        "matmul",
        "scaled_dot_product_attention",
        "mean",
        "gi_identity",
        "gi_grad_scale",
        "gi_layer_norm",
    ],
)
def test_opcheck_low_precision(name, dtype):
    args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) else a for a in SAMPLES[name](False))
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and i == 0 else a for i, a in enumerate(args))
    opcheck(getattr(ops, name).default, args, atol=1e-2, rtol=1e-2)


def test_cuda_version_matches_the_build():
    assert (ops.cuda_version() > 0) == lrpcpp._build_info.WITH_CUDA

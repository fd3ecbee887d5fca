"""torch.autocast: every op has a cast policy (as torch's own ops do), so forward and backward run
under autocast with the output dtype torch's equivalent would give and a relevance close to the
float64 reference of the formula (computed from the inputs as the op receives them)."""

import lrpcpp
import lrpcpp.functional as lf
import pytest
import reference as ref
import torch
import torch.nn.functional as F
from conftest import TOL, assert_relevance_close

f64 = torch.float64
EPS = 1e-6
CUDA = torch.cuda.is_available()


def lrpcpp_ops():
    """Every operator the library registers, found through torch.ops (new ops are picked up)."""
    return sorted(
        {n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("lrpcpp::")}
    )


@pytest.mark.parametrize("key", ["AutocastCPU", "AutocastCUDA"])
def test_every_op_has_an_autocast_kernel(key):
    ops = [n for n in lrpcpp_ops() if n != "cuda_version"]  # takes no tensor
    assert len(ops) > 50
    missing = [n for n in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lrpcpp::{n}", key)]
    assert not missing


def rnd(*shape, device="cpu"):
    return torch.randn(*shape, dtype=torch.float32, device=device)


def lowered(t, dtype):
    """t as a lower-precision autocast op receives it, in float64 for the reference."""
    return t.detach().to(dtype).double()


VISION_RULES = ["gamma", "alpha_beta", "z_plus", "z_box", "flat", "w_square"]
VISION_PARAMS = {"gamma": dict(gamma=0.25), "alpha_beta": dict(alpha=2.0, beta=1.0)}


def _vision_call(layer, rule, x, w, b, lo, hi):
    if layer == "linear":
        geo = ()
        fn = getattr(lf, f"linear_{rule}")
    else:
        geo = (1, 1, 1, 1)
        fn = getattr(lf, f"conv2d_{rule}")
    if rule == "z_box":
        return fn(x, w, b, lo, hi, *geo)
    return fn(x, w, b, *geo, **VISION_PARAMS.get(rule, {}))


# name -> (build inputs, lrpcpp call, torch's equivalent, reference of the relevance of inputs[0]
# (and inputs[1] where both carry relevance), whether the op casts to the autocast dtype)
def _cases():
    cases = {
        "linear_epsilon": (
            lambda d: [rnd(4, 8, device=d), rnd(5, 8, device=d), rnd(5, device=d)],
            lambda x, w, b: lf.linear_epsilon(x, w, b, EPS),
            lambda x, w, b: F.linear(x, w, b),
            lambda R, x, w, b: ref.linear_epsilon(x, w, b, R, EPS),
            True,
            1,
        ),
        "conv2d_epsilon": (
            lambda d: [rnd(2, 3, 6, 6, device=d), rnd(4, 3, 3, 3, device=d), rnd(4, device=d)],
            lambda x, w, b: lf.conv2d_epsilon(x, w, b, 1, 1, 1, 1, EPS),
            lambda x, w, b: F.conv2d(x, w, b, 1, 1, 1, 1),
            lambda R, x, w, b: ref.conv2d_epsilon(x, w, b, R, 1, 1, 1, EPS),
            True,
            1,
        ),
        "matmul": (
            lambda d: [rnd(2, 3, 4, device=d), rnd(2, 4, 5, device=d)],
            lambda a, b: lf.matmul(a, b, EPS),
            torch.matmul,
            lambda R, a, b: ref.matmul(a, b, R, EPS),
            True,
            2,
        ),
        # a bfloat16 branch (a projection's output) and a float32 residual: promoted, as a + b
        "add2": (
            lambda d: [rnd(4, 8, device=d).bfloat16(), rnd(4, 8, device=d)],
            lambda a, b: lf.add2(a, b, EPS),
            torch.add,
            lambda R, a, b: ref.add2(a, b, R, EPS),
            False,
            2,
        ),
        "mul2": (
            lambda d: [rnd(4, 8, device=d).bfloat16(), rnd(4, 8, device=d)],
            lf.mul2,
            torch.mul,
            lambda R, a, b: ref.mul2(a, b, R),
            False,
            2,
        ),
        "softmax": (
            lambda d: [rnd(3, 7, device=d)],
            lambda x: lf.softmax(x, -1),
            lambda x: torch.softmax(x, -1),
            lambda R, x: ref.softmax(x, R, -1),
            False,
            1,
        ),
        "layer_norm": (
            lambda d: [rnd(3, 8, device=d), rnd(8, device=d), rnd(8, device=d)],
            lambda x, w, b: lf.layer_norm(x, [8], w, b, 1e-5, EPS),
            lambda x, w, b: F.layer_norm(x, [8], w, b, 1e-5),
            lambda R, x, w, b: ref.layer_norm(x, (8,), w, b, 1e-5, R, EPS),
            False,
            1,
        ),
        "rms_norm_identity": (
            lambda d: [rnd(3, 8, device=d), rnd(8, device=d)],
            lambda x, w: lf.rms_norm_identity(x, [8], w, 1e-6),
            lambda x, w: F.rms_norm(x, [8], w, 1e-6),
            lambda R, x, w: ref.identity(x, R),
            False,
            1,
        ),
        "mean": (
            lambda d: [rnd(3, 8, device=d) + 2.0],
            lambda x: lf.mean(x, [-1], False, EPS),
            lambda x: x.mean(-1),
            lambda R, x: ref.mean(x, [-1], False, R, EPS),
            False,
            1,
        ),
        "silu": (lambda d: [rnd(3, 8, device=d)], lf.silu, F.silu, lambda R, x: ref.identity(x, R), False, 1),
        # pooling keeps its input's dtype under autocast, as torch's
        "avg_pool_epsilon": (
            lambda d: [rnd(2, 3, 6, 6, device=d)],
            lambda x: lf.avg_pool_epsilon(x, [2, 2], None, [1, 1], False, False),
            lambda x: F.avg_pool2d(x, 2, None, 1, False, False),
            lambda R, x: ref.linear_map_epsilon(lambda t: F.avg_pool2d(t, 2, None, 1, False, False), x, R, EPS),
            False,
            1,
        ),
        "max_pool_wta": (
            lambda d: [rnd(2, 3, 9, device=d)],
            lambda x: lf.max_pool_wta(x, [3], [2]),
            lambda x: F.max_pool1d(x, 3, 2),
            lambda R, x: ref.winner_takes_all(x, R, F.max_pool1d(x, 3, 2, return_indices=True)[1], 1),
            False,
            1,
        ),
    }
    for layer in ("linear", "conv2d"):
        for rule in VISION_RULES:

            def build(d, layer=layer):
                if layer == "linear":
                    x, w, b = rnd(4, 8, device=d), rnd(5, 8, device=d), rnd(5, device=d)
                else:
                    x, w, b = rnd(2, 3, 6, 6, device=d), rnd(4, 3, 3, 3, device=d), rnd(4, device=d)
                return [x, w, b]

            def call(x, w, b, layer=layer, rule=rule):
                lo, hi = torch.full_like(x, -4.0), torch.full_like(x, 4.0)
                return _vision_call(layer, rule, x, w, b, lo, hi)

            def torch_eq(x, w, b, layer=layer):
                return F.linear(x, w, b) if layer == "linear" else F.conv2d(x, w, b, 1, 1, 1, 1)

            def reference(R, x, w, b, layer=layer, rule=rule):
                lo, hi = torch.full_like(x, -4.0), torch.full_like(x, 4.0)
                if layer == "linear":
                    return ref.vision_rule(rule, x, w, b, R, EPS, lower=lo, upper=hi, **VISION_PARAMS.get(rule, {}))
                return ref.conv2d_vision_rule(
                    rule, x, w, b, R, 1, 1, 1, EPS, lower=lo, upper=hi, **VISION_PARAMS.get(rule, {})
                )

            cases[f"{layer}_{rule}"] = (build, call, torch_eq, reference, True, 1)
    return cases


CASES = _cases()


def run_case(name, device, dtype):
    build, call, torch_eq, reference, lowers, carriers = CASES[name]
    torch.manual_seed(0)
    inputs = build(device)
    leaves = [t.clone().requires_grad_(i < carriers) for i, t in enumerate(inputs)]
    with torch.autocast(device, dtype=dtype):
        y = call(*leaves)
        expected_dtype = torch_eq(*[t.detach() for t in inputs]).dtype
        # the relevance to explain, in the output's dtype: random in float32, the output itself in
        # bfloat16 / float16 (whose range a random R over a small denominator may exceed)
        R = torch.randn_like(y) if y.dtype == torch.float32 else y.detach().clone()
        y.backward(R)  # the backward inside the autocast region too
    assert y.dtype == expected_dtype, (y.dtype, expected_dtype)
    # the inputs as the op receives them: cast to the autocast dtype by the matmul-like ops; the
    # reference on the CPU (it builds its own tensors there)
    seen = [lowered(t, dtype) if lowers and t.dtype != f64 else t.detach().double() for t in inputs]
    if name in ("add2", "mul2"):  # promoted to float32
        seen = [t.detach().float().double() for t in inputs]
    expected = reference(R.double().cpu(), *[t.cpu() for t in seen])
    expected = expected if isinstance(expected, tuple) else (expected,)
    for leaf, exp in zip(leaves[:carriers], expected):
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype
        assert torch.isfinite(leaf.grad).all()
        assert leaf.grad.device == leaf.device
        assert_relevance_close(leaf.grad.cpu(), exp, dtype)


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_under_cpu_autocast_bfloat16(name):
    run_case(name, "cpu", torch.bfloat16)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA"))])
@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
        (torch.float16, torch.float16),
        (f64, torch.float32),
    ],
    ids=str,
)
@pytest.mark.parametrize("name", ["add2", "mul2"])
def test_add2_mul2_operands_meet_in_the_dtype_of_a_plus_b_under_any_autocast_dtype(
    name, dtypes, autocast_dtype, device
):
    """As a + b and a * b: the operands in torch's promoted dtype whatever the autocast dtype (a bfloat16
    operand under float16 autocast included), the output that of torch's op."""
    torch.manual_seed(0)
    a, b = (torch.randn(3, 4, device=device).to(d) for d in dtypes)
    call = getattr(lf, name)
    torch_op = torch.add if name == "add2" else torch.mul
    with torch.autocast(device, dtype=autocast_dtype):
        got = call(a.requires_grad_(), b.requires_grad_())
        want = torch_op(a.detach(), b.detach())
        got.backward(got.detach())
    assert got.dtype == want.dtype == torch.promote_types(*dtypes)
    torch.testing.assert_close(got.detach(), want)
    assert a.grad.dtype == a.dtype and b.grad.dtype == b.dtype
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_op_under_cuda_autocast(name, dtype):
    run_case(name, "cuda", dtype)


def test_explicit_attribute_under_cpu_autocast_matches_float32():
    import models

    model = models.build("llama", dtype=torch.float32)
    kwargs = models.inputs("llama")
    full = lrpcpp.attribute(model, mode="explicit", **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = lrpcpp.attribute(model, mode="explicit", **kwargs)
    assert torch.equal(low.target, full.target)
    assert torch.isfinite(low.relevance).all()
    rel = low.token_relevance.double()
    want = full.token_relevance.double()
    torch.testing.assert_close(
        rel, want, rtol=TOL[torch.bfloat16], atol=4 * TOL[torch.bfloat16] * float(want.abs().max())
    )

"""The CUDA kernels against float64 references, and what a GPU exposes that the CPU does not: the
scalar path beside the 16-byte vector path (unaligned storage, tails around the vector width), grid
strides past one launch, row lengths across warp counts, masks and temperatures over every softmax
dim, strided and broadcast inputs, empty tensors, mixed dtypes, host syncs, CUDA-graph capture and the
current stream. Cases that make sense on the CPU too are parametrised over ``device`` and run there
now; the CUDA ones are skipped, with the reason, where no CUDA device or no CUDA build exists.

TF32 is turned off for cuDNN convolutions in this module (torch enables it by default): these tests
compare the rules' arithmetic with a float64 reference at float32 tolerance, and TF32's 10-bit
mantissa would need a conv-only tolerance ~50x looser, hiding real float32 errors in the kernels."""

import lrpcpp  # noqa: F401  (registers the ops)
import lrpcpp.functional as lf
import pytest
import reference as ref
import torch
from block import Head, relevance
from conftest import DTYPES, TOL
from test_gradient_input import gi_block, gi_inputs, input_gradient
from test_opcheck import RELEVANCE_OPS, SAMPLES
from torch.library import opcheck

if not torch.cuda.is_available():
    NO_CUDA = (
        "no CUDA device is visible (torch.cuda.is_available() is False); the CPU tests cover the "
        "shared per-element math"
    )
elif torch.ops.lrpcpp.cuda_version() <= 0:
    NO_CUDA = "lrpcpp was built without CUDA kernels (LRPCPP_CUDA=0 or no nvcc at build time)"
else:
    NO_CUDA = ""
needs_cuda = pytest.mark.skipif(bool(NO_CUDA), reason=NO_CUDA)
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
on_devices = pytest.mark.parametrize("device", DEVICES)
ops = torch.ops.lrpcpp


@pytest.fixture(autouse=True, scope="module")
def _no_tf32():
    """cuDNN convolutions in IEEE float32 for this module (see the module docstring)."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


OPS = sorted(n for n in SAMPLES if n != "cuda_version")


# the arguments (by position) that hold a forward's row statistics: float32 for a float16 / bfloat16
# query, as the forward returns them (the attention's logsumexp)
STATISTICS = {"scaled_dot_product_attention_relevance": {6}}


def to(args, device, dtype, name=""):
    """args on device; the floating tensors in dtype (a statistic in at least float32), the others
    (bool masks) moved only."""

    def one(i, a):
        if not isinstance(a, torch.Tensor):
            return a
        if not a.is_floating_point():
            return a.to(device)
        want = torch.promote_types(dtype, torch.float32) if i in STATISTICS.get(name, ()) else dtype
        return a.detach().to(device=device, dtype=want).requires_grad_(a.requires_grad)

    return tuple(one(i, a) for i, a in enumerate(args))


def run(name, args):
    """The op's outputs, and for a forward op the relevance of every input that requires grad."""
    out = getattr(torch.ops.lrpcpp, name)(*args)
    outs = list(out) if isinstance(out, tuple) else [out]
    outs = [o for o in outs if o is not None]
    if name in RELEVANCE_OPS or not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return outs
    seed = torch.ones_like(outs[0]) if name == "softmax" else outs[0].detach()
    outs[0].backward(seed)
    return outs + [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", OPS)
def test_cuda_matches_cpu_float64(name, dtype):
    torch.manual_seed(0)
    # the reference sees the same inputs, rounded to dtype, so that only the arithmetic is compared
    args = to(SAMPLES[name](name not in RELEVANCE_OPS), "cpu", dtype, name)
    expected = run(name, to(args, "cpu", torch.float64, name))
    got = run(name, to(args, "cuda", dtype, name))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.device.type == "cuda"
        scale = max(float(e.detach().abs().max()), 1.0) if e.numel() else 1.0
        # ops with a dtype argument return that dtype in both runs: compare the values in float64
        torch.testing.assert_close(g.double().cpu(), e.double(), rtol=TOL[dtype], atol=TOL[dtype] * scale)


@needs_cuda
@pytest.mark.parametrize("name", OPS)
def test_opcheck_cuda(name):
    args = to(SAMPLES[name](False), "cuda", torch.float32, name)
    opcheck(getattr(torch.ops.lrpcpp, name).default, args)


@needs_cuda
def test_cpu_cuda_mix_is_a_clear_error():
    x = torch.randn(2, 4, device="cuda")
    with pytest.raises(RuntimeError, match=r"expected weight to be on the same device as x \(cuda:0\), got cpu"):
        torch.ops.lrpcpp.linear_epsilon(x, torch.randn(3, 4), None, 1e-6)


@pytest.mark.compile
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_on_cuda(dtype):
    torch.manual_seed(0)
    model = Head(8).to("cuda", dtype)
    x = torch.randn(2, 5, 8, device="cuda", dtype=dtype)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    expected = relevance(model, x)
    torch.testing.assert_close(relevance(compiled, x), expected, rtol=TOL[dtype], atol=TOL[dtype])


# ----------------------------------------------------------------------------- gradient-times-input
def close_to(got, expected, dtype):
    scale = max(float(expected.abs().max()), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(got.double().cpu(), expected, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "grad_shape,factor_shape",
    [
        ((2, 3, 12), ()),
        ((2, 3, 12), (12,)),
        ((5, 7), (7,)),
        ((2, 3, 12), (1, 3, 12)),
        ((2, 3, 12), (3, 1)),
        ((2, 3, 12), (2, 3, 12)),
        ((4, 1), (1,)),
    ],
    ids=str,
)
def test_gi_scale_backward_on_cuda(dtype, grad_shape, factor_shape):
    """Factors that repeat along grad (read in place), and other broadcasts (expanded first)."""
    grad = torch.randn(grad_shape, dtype=torch.float64).to(dtype).double()
    factor = torch.randn(factor_shape, dtype=torch.float64).to(dtype).double()
    out = torch.ops.lrpcpp.gi_scale_backward(grad.to("cuda", dtype), factor.to("cuda", dtype), dtype)
    assert out.dtype == dtype and out.shape == grad.shape
    close_to(out, grad * factor, dtype)
    wide = torch.ops.lrpcpp.gi_scale_backward(grad.to("cuda", dtype), factor.to("cuda", dtype), torch.float32)
    assert wide.dtype == torch.float32
    close_to(wide, grad * factor, torch.float32)


@needs_cuda
def test_gi_scale_backward_expanded_grad_and_mixed_dtypes_on_cuda():
    grad = torch.ones(1, device="cuda", dtype=torch.bfloat16).expand(4, 6)  # the gradient of a sum
    scale = torch.full((6,), 1.0 / 3.0, device="cuda")
    out = torch.ops.lrpcpp.gi_scale_backward(grad, scale, torch.bfloat16)
    assert torch.equal(out, (grad.float() * scale).to(torch.bfloat16))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gi_scale_backward_keeps_the_gradients_layout_on_cuda(dtype):
    """A transposed gradient (the layout of F.scaled_dot_product_attention's gradients): the output
    has its strides and the CPU op's values (both the product rounded once), for factors that repeat
    along the memory order, that do not, and an fp32 factor (read in place for fp16/bf16)."""
    grad = torch.randn(2, 5, 3, 4, dtype=torch.float64).to(dtype).transpose(1, 2)
    factors = (torch.tensor(0.3), torch.randn(4), torch.randn(3, 1, 4), torch.randn(3, 5, 1))
    for factor in [f.to(dtype) for f in factors] + [factors[1]]:
        for out_dtype in (dtype, torch.float32):
            expected = torch.ops.lrpcpp.gi_scale_backward(grad, factor, out_dtype)
            out = torch.ops.lrpcpp.gi_scale_backward(grad.cuda(), factor.cuda(), out_dtype)
            assert out.stride() == grad.stride() and out.dtype == expected.dtype
            assert torch.equal(out.cpu(), expected)


@needs_cuda
def test_gi_identity_fp16_factor_is_finite_on_cuda():
    x = torch.tensor([0.0, 1.0, 0.0, float("nan")], device="cuda", dtype=torch.float16, requires_grad=True)
    y = torch.sigmoid(x.detach())
    y[2] = -y[2]
    out = torch.ops.lrpcpp.gi_identity(x, y, 1e-10)
    torch.testing.assert_close(out, y, rtol=0, atol=0, equal_nan=True)
    out.backward(torch.ones_like(out))
    assert x.grad[0] == 65504 and x.grad[2] == -65504 and torch.isfinite(x.grad[:3]).all()
    assert torch.isnan(x.grad[3])


@needs_cuda
@pytest.mark.parametrize("x_dtype,y_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)], ids=str)
def test_gi_identity_mixed_dtypes_on_cuda(x_dtype, y_dtype):
    x0 = torch.randn(5, 33, dtype=torch.float64)
    x = x0.to("cuda", x_dtype).requires_grad_()
    y = torch.nn.functional.silu(x.detach().to(y_dtype))
    g = torch.randn(5, 33, dtype=torch.float64)
    out = torch.ops.lrpcpp.gi_identity(x, y, 1e-10)
    assert out.dtype == y_dtype and torch.equal(out, y)
    out.backward(g.to("cuda", y_dtype))
    assert x.grad.dtype == x_dtype
    expected = ref.gi_identity(x.detach().double().cpu(), y.double().cpu(), g.to(y_dtype).double(), 1e-10)
    tol = max(TOL[x_dtype], TOL[y_dtype])
    torch.testing.assert_close(x.grad.double().cpu(), expected, rtol=tol, atol=tol * float(expected.abs().max()))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,ns", [((3, 2500), [2500]), ((2, 3, 4, 5), [4, 5]), ((7, 33), [33])], ids=str)
def test_gi_layer_norm_backward_on_cuda(dtype, shape, ns):
    x = torch.randn(shape, dtype=torch.float64).to(dtype).double()
    g = torch.randn(shape, dtype=torch.float64).to(dtype).double()
    w = torch.randn(ns, dtype=torch.float64).to(dtype).double()
    rstd = torch.native_layer_norm(x.to("cuda", dtype), ns, None, None, 1e-5)[2]  # the forward's, per row
    out = torch.ops.lrpcpp.gi_layer_norm_backward(g.to("cuda", dtype), rstd, ns, w.to("cuda", dtype))
    assert out.dtype == dtype
    close_to(out, ref.gi_layer_norm(x, ns, w, g, 1e-5), dtype)


@pytest.mark.compile
@needs_cuda
def test_gi_compile_on_cuda():
    x, w, scale = (t.cuda() for t in gi_inputs())
    expected = input_gradient(gi_block, x, w, scale)
    torch._dynamo.reset()
    got = input_gradient(torch.compile(gi_block, fullgraph=True), x, w, scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("level", ["registry", "operations"])
@pytest.mark.parametrize("family", ["llama", "bert", "gpt2", "mixtral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attribute_on_cuda_matches_cpu(family, dtype, level):
    pytest.importorskip("transformers", reason="whole-model tests need transformers (requirements-dev.txt)")
    from models import build, inputs

    model = build(family, dtype=torch.float32)
    kw = inputs(family, dtype=torch.float32)
    expected = lrpcpp.attribute(model, **kw, level=level)
    model = model.to("cuda", dtype)
    got = lrpcpp.attribute(
        model,
        level=level,
        target=expected.target.cuda(),
        **{k: v.to("cuda", dtype) if v.is_floating_point() else v.cuda() for k, v in kw.items()},
    )
    assert torch.isfinite(got.relevance).all()
    if level == "operations":  # the same calls ruled on the GPU as on the CPU
        assert got.coverage.unruled == expected.coverage.unruled and got.coverage.seen == expected.coverage.seen
    a, b = got.token_relevance.double().cpu().flatten(), expected.token_relevance.double().flatten()
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))
    else:
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9


@needs_cuda
@pytest.mark.parametrize("name,level", [("resnet", "registry"), ("vit", "registry"), ("vit", "operations")])
def test_vision_model_on_cuda_matches_cpu(name, level):
    """A CNN under the epsilon-gamma-box preset (z-box on the pixels, gamma on the convolutions; a preset
    needs the registry level) and a ViT in torchvision's layout, explained on the GPU as on the CPU."""
    import vision_models as vm
    from lrpcpp.models import presets

    model, x = getattr(vm, name)(dtype=torch.float32), vm.images(dtype=torch.float32)
    kw = dict(level=level)
    if name == "resnet":
        kw["preset"] = presets.get_preset("epsilon_gamma_box", low=vm.LOW, high=vm.HIGH)
    expected = lrpcpp.attribute(model, pixel_values=x, **kw)
    # the preset's bounds stay float64 CPU tensors, as a user writes them
    got = lrpcpp.attribute(model.cuda(), pixel_values=x.cuda(), target=expected.target.cuda(), **kw)
    assert got.relevance.device.type == "cuda" and torch.isfinite(got.relevance).all()
    b = expected.relevance.double()
    torch.testing.assert_close(got.relevance.double().cpu(), b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))


# ----------------------------------------------------------------------------- what a GPU exposes
# element-wise kernels: name -> (op, number of tensor inputs); every input is a flat tensor of n values
def _elementwise(name, ts):
    if name == "stab_div":
        return ops.stab_div(ts[0], ts[1], 1e-6, 2.0, None)
    if name == "stab_div float32 out":
        return ops.stab_div(ts[0], ts[1], 1e-6, 1.0, torch.float32)
    if name == "add2_relevance":
        return ops.add2_relevance(ts[0], ts[1], ts[2], 1e-8, [True, True])
    if name == "gi_identity_factor":
        return ops.gi_identity_factor(ts[0], ts[1], 1e-10)
    if name == "gi_scale_backward":
        return ops.gi_scale_backward(ts[0], ts[1], ts[0].dtype)
    if name == "gamma_stab_div":
        return ops.gamma_stab_div(ts[0], ts[1], ts[2].abs(), None, 0, 0.25, 1e-6, False)
    raise KeyError(name)


ELEMENTWISE = {
    "stab_div": 2,
    "stab_div float32 out": 2,
    "add2_relevance": 3,
    "gi_identity_factor": 2,
    "gi_scale_backward": 2,
    "gamma_stab_div": 3,
}


def _flat(out):
    return [o for o in (out if isinstance(out, (tuple, list)) else [out]) if o is not None]


@on_devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 15, 16, 17, 33, 1027])
@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_unaligned_storage_and_tails(device, dtype, n, name):
    """Storage one element past a 16-byte boundary takes the scalar path; it must give bitwise the
    values of the vector path on aligned copies, for sizes around the vector width."""
    torch.manual_seed(n)
    bufs = [torch.randn(n + 1, dtype=torch.float64).to(device, dtype) for _ in range(ELEMENTWISE[name])]
    shifted = [b[1:] for b in bufs]  # data_ptr = base + one element: not 16-byte aligned
    aligned = [s.clone() for s in shifted]
    assert all(s.data_ptr() % 16 != 0 for s in shifted) and all(a.data_ptr() % 16 == 0 for a in aligned)
    got, expected = _flat(_elementwise(name, shifted)), _flat(_elementwise(name, aligned))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.device.type == device and g.shape == e.shape
        assert torch.equal(g, e)


@needs_cuda
def test_grid_stride_past_one_launch():
    """More elements than one launch of 65535 blocks x 256 threads x 4-wide packs covers: every element,
    up to the last, is written (float32, vector path and scalar path)."""
    n = 65535 * 256 * 4 + 4 * 1000 + 3
    r = torch.randn(n, device="cuda")
    z = torch.randn(n, device="cuda")
    expected = r.double() / ref.stab(z.double() * 2.0, 1e-6)
    for shift in (0, 1):
        got = ops.stab_div(r[shift:], z[shift:], 1e-6, 2.0, None)
        torch.testing.assert_close(got.double(), expected[shift:], rtol=2e-6, atol=0)
    del expected
    torch.cuda.empty_cache()


def _row_case(name, rows, length, device, dtype):
    """(lrpcpp's result, the float64 reference) of a row kernel over `rows` rows of `length`."""
    x = torch.randn(rows, length, dtype=torch.float64).to(dtype)
    g = torch.randn(rows, length, dtype=torch.float64).to(dtype)
    x64, g64 = x.double(), g.double()
    if name == "softmax_relevance":
        s = torch.softmax(x.float(), -1).to(dtype)
        got = ops.softmax_relevance(g.to(device), x.to(device), s.to(device), -1, 1.0)
        return got, x64 * (g64 - s.double() * g64.sum(-1, keepdim=True))
    w = torch.randn(length, dtype=torch.float64).to(dtype)
    if name == "layer_norm_relevance":
        b = torch.randn(length, dtype=torch.float64).to(dtype)
        # seeded with its output, the usual seed (a random R over stab(y) near 0 is ill-conditioned)
        g = torch.nn.functional.layer_norm(x64, [length], w.double(), b.double(), 1e-5).to(dtype)
        g64 = g.double()
        got = ops.layer_norm_relevance(g.to(device), x.to(device), [length], w.to(device), b.to(device), 1e-5, 1e-6)
        return got, ref.layer_norm(x64, [length], w.double(), b.double(), 1e-5, g64, 1e-6)
    rstd = torch.native_layer_norm(x.to(device), [length], None, None, 1e-5)[2]  # the forward's, per row
    got = ops.gi_layer_norm_backward(g.to(device), rstd, [length], w.to(device))
    return got, ref.gi_layer_norm(x64, [length], w.double(), g64, 1e-5)


ROW_OPS = ["softmax_relevance", "layer_norm_relevance", "gi_layer_norm_backward"]


@on_devices
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "name,length",
    [(n, k) for n in ROW_OPS for k in [1, 2, 31, 32, 33, 1023, 1024, 1025, 5000] if k > 1 or n == "softmax_relevance"],
)  # a norm over 1 value: variance 0
def test_row_lengths_across_warp_counts(device, dtype, length, name):
    """One block per row: rows shorter than a warp, around a warp, around the 1024-thread block, and
    longer than the block (each thread loops)."""
    got, expected = _row_case(name, 3, length, device, dtype)
    assert got.device.type == device and got.dtype == dtype
    close_to(got, expected, dtype)


@on_devices
@pytest.mark.parametrize("name", ROW_OPS)
def test_many_short_rows(device, name):
    """70,000 rows: more blocks than 65535 (the grid's y/z limit; x must be used)."""
    got, expected = _row_case(name, 70_000, 8, device, torch.float32)
    close_to(got, expected, torch.float32)


@on_devices
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask", ["none", "-inf", "finite"])
@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_softmax_every_dim_masks_and_temperatures(device, dtype, mask, temperature, dim):
    """Masked logits (-inf, or the dtype's lowest value as many models add) carry no relevance and stay
    finite, along every dim and for temperatures below and above 1."""
    torch.manual_seed(0)
    x0 = torch.randn(3, 5, 37, dtype=torch.float64) * 2
    masked = torch.rand(x0.shape) < 0.3
    masked.select(dim, 0).fill_(False)  # every slice along dim keeps one entry
    x = x0.to(dtype)
    if mask != "none":
        x = x.masked_fill(masked, float("-inf") if mask == "-inf" else torch.finfo(dtype).min)
    x = x.to(device).requires_grad_()
    s = lf.softmax(x, dim, temperature)
    R = torch.randn(s.shape, dtype=torch.float64).to(dtype)
    s.backward(R.to(device))
    got = x.grad
    assert got.device.type == device and torch.isfinite(got).all()
    if mask != "none":
        assert (got.cpu()[masked] == 0).all()
    expected = ref.softmax(x.detach().double().cpu(), R.double(), dim, temperature, s=s.detach().double().cpu())
    close_to(got, expected, dtype)


@on_devices
def test_strided_broadcast_and_stride0_inputs(device):
    """Non-contiguous, broadcast and stride-0 (expanded) inputs give the values of contiguous copies."""
    torch.manual_seed(0)
    dense = lambda t: t.contiguous().clone()  # noqa: E731
    wide = torch.randn(6, 40, device=device)
    r, z = wide[:, ::2], wide[:, 1::2]  # strided
    assert torch.equal(ops.stab_div(r, z, 1e-6, 1.0, None), ops.stab_div(dense(r), dense(z), 1e-6, 1.0, None))
    row = torch.randn(20, device=device).expand(6, 20)  # stride 0 along dim 0
    assert torch.equal(ops.stab_div(row, z, 1e-6, 1.0, None), ops.stab_div(dense(row), dense(z), 1e-6, 1.0, None))
    # add2: b broadcast (its relevance summed back to its shape)
    g, a, b = (
        torch.randn(6, 20, device=device),
        torch.randn(6, 20, device=device).t().contiguous().t(),
        torch.randn(20, device=device),
    )
    ra, rb = ops.add2_relevance(g, a, b, 1e-8, [True, True])
    ea, eb = ref.add2(a.double().cpu(), b.double().cpu(), g.double().cpu(), 1e-8)
    close_to(ra, ea, torch.float32)
    close_to(rb, eb, torch.float32)
    assert rb.shape == b.shape
    # softmax and layer norm over transposed (non-contiguous) inputs, along the strided dim
    x = torch.randn(20, 6, device=device).t()
    s = torch.softmax(x, -1)
    gs = torch.randn(20, 6, device=device).t()
    assert torch.equal(
        ops.softmax_relevance(gs, x, s, -1, 2.0), ops.softmax_relevance(dense(gs), dense(x), dense(s), -1, 2.0)
    )
    w = torch.randn(20, device=device)
    assert torch.equal(
        ops.layer_norm_relevance(gs, x, [20], w, None, 1e-5, 1e-6),
        ops.layer_norm_relevance(dense(gs), dense(x), [20], w, None, 1e-5, 1e-6),
    )
    rstd = torch.native_layer_norm(x, [20], None, None, 1e-5)[2]
    assert torch.equal(
        ops.gi_layer_norm_backward(gs, rstd, [20], w), ops.gi_layer_norm_backward(dense(gs), rstd, [20], w)
    )
    # gi_scale_backward: an expanded (stride-0) gradient, and factors that repeat or broadcast
    grad = torch.randn(1, 20, device=device).expand(6, 20)
    for factor in (torch.randn(20, device=device), torch.randn(6, 1, device=device), torch.tensor(0.5, device=device)):
        assert torch.equal(
            ops.gi_scale_backward(grad, factor, torch.float32),
            ops.gi_scale_backward(dense(grad), dense(factor.expand(6, 20)), torch.float32),
        )


@on_devices
@pytest.mark.parametrize("shape", [(0,), (0, 8), (4, 0), (2, 0, 3)], ids=str)
def test_empty_tensors(device, shape):
    """Every kernel returns an empty result of the right shape and launches nothing on empty input."""
    e = torch.empty(shape, device=device)
    last = shape[-1]
    assert ops.stab_div(e, e, 1e-6, 1.0, None).shape == shape
    assert all(t.shape == shape for t in ops.add2_relevance(e, e, e, 1e-8, [True, True]))
    assert ops.gi_identity_factor(e, e, 1e-10).shape == shape
    assert ops.gi_scale_backward(e, e, torch.bfloat16).shape == shape
    assert ops.softmax_relevance(e, e, e, -1, 1.0).shape == shape
    assert ops.softmax_relevance(e, e, e, 0, 0.5).shape == shape
    if last > 0:
        w = torch.ones(last, device=device)
        assert ops.layer_norm_relevance(e, e, [last], w, w, 1e-5, 1e-6).shape == shape
        assert ops.gi_layer_norm_backward(e, e[..., :1], [last], w).shape == shape
    if device == "cuda":
        torch.cuda.synchronize()


@on_devices
def test_mixed_dtypes(device):
    """Kernels that read one dtype and write another, against the float64 reference."""
    torch.manual_seed(0)
    r64, z64 = torch.randn(5, 33, dtype=torch.float64), torch.randn(5, 33, dtype=torch.float64)
    r, z = r64.to(device, torch.bfloat16), z64.to(device, torch.bfloat16)
    out = ops.stab_div(r, z, 1e-6, 1.0, torch.float32)  # bf16 in, float32 out
    assert out.dtype == torch.float32
    close_to(out, r.double().cpu() / ref.stab(z.double().cpu(), 1e-6), torch.float32)
    # bf16 gradient, float32 factor, bf16 result: the product in float32, rounded once
    g = torch.randn(4, 33, device=device).to(torch.bfloat16)
    f = torch.randn(33, device=device)
    out = ops.gi_scale_backward(g, f, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, (g.float() * f).to(torch.bfloat16))
    # softmax evaluated in float32 (its dtype argument) for bf16 logits; relevance back in bf16
    x = r.detach().requires_grad_()
    s = torch.ops.lrpcpp.softmax(x, -1, 1.0, torch.float32)
    s.backward(torch.ones_like(s))
    assert x.grad.dtype == torch.bfloat16
    close_to(x.grad, ref.softmax(x.detach().double().cpu(), torch.ones(5, 33, dtype=torch.float64), -1), torch.bfloat16)


# ---------------------------------------------------------------------------- CUDA only: syncs, graphs, streams
FORWARD_OPS = [n for n in OPS if n not in RELEVANCE_OPS]


@needs_cuda
@pytest.mark.parametrize("name", FORWARD_OPS)
def test_no_host_sync_in_relevance_backward(name):
    """The forward and the relevance backward of every op queue work without waiting for the GPU."""
    torch.manual_seed(0)
    args = to(SAMPLES[name](True), "cuda", torch.float32)
    if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        pytest.skip(f"{name} takes no input that carries relevance")
    run(name, args)  # warm-up: lazy initialisation (cuBLAS, cuDNN handles) may synchronise once
    args = to(SAMPLES[name](True), "cuda", torch.float32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(name, args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def _graph_ops(t):
    """Relevance kernels of every family on the static inputs t."""
    return [
        ops.stab_div(t["r"], t["z"], 1e-6, 1.0, None),
        *ops.add2_relevance(t["r"], t["z"], t["a"], 1e-8, [True, True]),
        ops.softmax_relevance(t["r"], t["z"], t["s"], -1, 2.0),
        ops.layer_norm_relevance(t["r"], t["z"], [64], t["w"], None, 1e-5, 1e-6),
        ops.gi_scale_backward(t["r"], t["w"], torch.float32),
        ops.gi_layer_norm_backward(t["r"], t["s"][:, :1], [64], t["w"]),
    ]


@needs_cuda
def test_cuda_graph_capture_and_replay():
    """The kernels can be captured in a CUDA graph (no sync, no allocation on the host side) and a
    replay on new input values gives the eager results."""
    torch.manual_seed(0)

    def fresh():
        z = torch.randn(16, 64, device="cuda")
        return {
            "r": torch.randn(16, 64, device="cuda"),
            "z": z,
            "a": torch.randn(16, 64, device="cuda"),
            "s": torch.softmax(z / 2.0, -1),
            "w": torch.randn(64, device="cuda"),
        }

    static = fresh()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _graph_ops(static)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = _graph_ops(static)
    for _ in range(2):
        new = fresh()
        for k, v in new.items():
            static[k].copy_(v)
        graph.replay()
        torch.cuda.synchronize()
        for got, expected in zip(outs, _graph_ops(new)):
            assert torch.equal(got, expected)


@needs_cuda
def test_ops_run_on_the_current_stream():
    """Launched on a side stream, a kernel waits for the work queued before it on that stream: inputs
    written there after a long sleep are the ones read (a kernel on another stream would read them
    before they are written)."""
    torch.manual_seed(0)
    n = 1 << 20
    src = {k: torch.randn(n, device="cuda") for k in ("r", "z", "a")}
    src["s"], src["w"] = torch.rand(n, device="cuda"), torch.randn(64, device="cuda")
    expected = _graph_ops({k: v.view(-1, 64) if v.numel() == n else v for k, v in src.items()})
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the inputs are written
        for k in dst:
            dst[k].copy_(src[k])
        got = _graph_ops({k: v.view(-1, 64) if v.numel() == n else v for k, v in dst.items()})
    side.synchronize()
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


@pytest.mark.skipif(bool(NO_CUDA) or torch.cuda.device_count() < 2, reason=NO_CUDA or "needs two CUDA devices")
def test_ops_on_a_second_device():
    """Inputs on cuda:1 while cuda:0 is current: the device guard launches on cuda:1."""
    torch.manual_seed(0)
    x = torch.randn(8, 64, device="cuda:1")
    w = torch.randn(64, device="cuda:1")
    with torch.cuda.device(0):
        out = ops.layer_norm_relevance(x, x, [64], w, None, 1e-5, 1e-6)
        ra, _ = ops.add2_relevance(x, x, x, 1e-8, [True, True])
    assert out.device == x.device and ra.device == x.device
    close_to(
        out, ref.layer_norm(x.double().cpu(), [64], w.double().cpu(), None, 1e-5, x.double().cpu(), 1e-6), torch.float32
    )


@on_devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recipes_compute_the_kept_inputs_bitwise(device, dtype):
    """The explicit LLaMA-style block of test_recipes.py: the normalised inputs and the gated product
    computed again in the backward pass (lrpcpp/_recipes.py) give the relevance of the kept tensors,
    bitwise, on each device's kernels."""
    from test_recipes import block, params, relevance

    p = {k: v.to(device) for k, v in params(dtype).items()}
    x = torch.randn(1, 12, 16, dtype=dtype, device=device)
    with_recipes, without = relevance(block, x, p), relevance(block, x, p, recipes=False)
    assert torch.equal(with_recipes, without) and with_recipes.abs().sum() > 0

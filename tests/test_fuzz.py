"""Property-based fuzzing of every operator the library registers (found through torch.ops, so new
ops are picked up): arguments drawn from their schema types, with shapes that include 0-size dims,
all dtypes, meta tensors, non-contiguous strides and the values 0, +-inf, NaN and denormals. Each
call either returns or raises an error whose message names the op; never a crash. A call that
returns with finite float32 / float64 inputs and moderate scalars (epsilon and temperature in
[1e-6, 2], so that no finite value may overflow) gives finite outputs. Derandomized, so a run is
reproducible."""

import math

import lrpcpp  # noqa: F401  (loads torch.ops.lrpcpp)
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SKIP = {"cuda_version"}  # takes no argument
# every schema the dispatcher holds in the lrpcpp namespace
OPS = sorted(
    {n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("lrpcpp::")}
    - SKIP
)

KERNEL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
OTHER_DTYPES = [torch.int64, torch.bool, torch.float8_e4m3fn, torch.complex64]
SPECIALS = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40]  # 1e-40: a float32 denormal
# floats small enough that no finite input overflows: the op's stabilisers and temperatures
FLOATS = [1e-6, 0.25, 1.0, 2.0]
BAD_FLOATS = [0.0, -1.0, math.nan, math.inf, -math.inf, 1e-310]


def sizes():
    return st.lists(st.integers(0, 3), min_size=0, max_size=4)


@st.composite
def tensor(draw, shape, dtype, device, specials):
    """A tensor of `shape`: normal values, some replaced by specials; sometimes a strided view."""
    n = math.prod(shape)
    values = torch.randn(n, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))), dtype=torch.float64)
    if specials and n:
        for _ in range(draw(st.integers(1, 3))):
            values[draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIALS))
    if dtype.is_floating_point or dtype.is_complex:
        t = values.to(dtype)
    else:
        t = values.round().clamp(-3, 3).to(dtype)
    t = t.reshape(shape)
    if len(shape) >= 2 and draw(st.booleans()):  # the same values in a non-contiguous layout
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif len(shape) >= 1 and shape[-1] > 0 and draw(st.booleans()):
        big = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        t = big[..., ::2]
    return t.to(device)


@st.composite
def call_args(draw, name):
    """Arguments for lrpcpp.<name> and whether the property 'finite in, finite out' applies."""
    schema = getattr(torch.ops.lrpcpp, name).default._schema
    device = draw(st.sampled_from(["cpu", "cpu", "cpu", "meta"]))
    dtype = draw(st.sampled_from(KERNEL_DTYPES))
    specials = draw(st.booleans())
    checked = not specials and device == "cpu" and dtype in (torch.float64, torch.float32)
    base = draw(sizes())  # most tensors share this shape or a related one, so some calls are valid
    args = []
    for a in schema.arguments:
        kind = str(a.real_type)
        if kind in ("Tensor", "Optional[Tensor]"):
            if kind.startswith("Optional") and draw(st.booleans()):
                args.append(None)
                continue
            how = draw(st.sampled_from(["base", "base", "last", "swap", "free"]))
            shape = {"base": base, "last": base[-1:], "swap": base[::-1], "free": None}[how]
            shape = draw(sizes()) if shape is None else list(shape)
            t_dtype = dtype
            if draw(st.integers(0, 9)) == 0:  # now and then another dtype
                t_dtype = draw(st.sampled_from(KERNEL_DTYPES + OTHER_DTYPES))
                checked = checked and t_dtype in (torch.float64, torch.float32)
            args.append(draw(tensor(shape, t_dtype, device, specials)))
        elif kind in ("float", "Optional[float]"):
            if kind.startswith("Optional") and draw(st.booleans()):
                args.append(None)
                continue
            bad = draw(st.integers(0, 4)) == 0
            value = draw(st.sampled_from(BAD_FLOATS if bad else FLOATS))
            checked = checked and not bad
            args.append(value)
        elif kind in ("int", "Optional[int]"):
            if kind.startswith("Optional") and draw(st.booleans()):
                args.append(None)
                continue
            args.append(draw(st.integers(-3, 3)))
        elif kind in ("List[int]", "Optional[List[int]]"):
            if kind.startswith("Optional") and draw(st.booleans()):
                args.append(None)
                continue
            args.append(draw(st.lists(st.integers(-2, 3), min_size=0, max_size=3)))
        elif kind == "bool":
            args.append(draw(st.booleans()))
        elif kind == "List[bool]":  # a fixed size (bool[2], bool[3]): the schema's
            args.append(draw(st.lists(st.booleans(), min_size=a.N or 2, max_size=a.N or 2)))
        elif kind == "str":
            args.append(draw(st.sampled_from(["none", "tanh", "fast"])))
        elif kind in ("ScalarType", "Optional[ScalarType]"):
            if kind.startswith("Optional") and draw(st.booleans()):
                args.append(None)
                continue
            args.append(draw(st.sampled_from(KERNEL_DTYPES + [torch.int64, torch.float8_e4m3fn])))
        else:
            raise AssertionError(f"the fuzz test has no strategy for {kind} ({name}.{a.name})")
    return args, checked


def mean_of_nothing(x, dim):
    """Whether mean(x, dim) averages over no elements (a 0-size reduced dim)."""
    dims = range(x.dim()) if not dim else dim
    return x.dim() > 0 and any(x.shape[d] == 0 for d in dims) or x.numel() == 0


def finite(t):
    return bool(torch.isfinite(t if t.is_complex() else t.double()).all())


def outputs(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


def check_call(name, args, checked):
    op = getattr(torch.ops.lrpcpp, name)
    try:
        result = op(*args)
    except (RuntimeError, ValueError, IndexError) as e:
        message = str(e).split("\n")[0]
        assert f"lrpcpp.{name}" in message or f"lrpcpp::{name}" in message, f"{name}: {message}"
        return
    finite_in = all(finite(t) for t in args if isinstance(t, torch.Tensor) and t.device.type == "cpu")
    if name == "mean" and mean_of_nothing(*args[:2]):
        finite_in = False  # the mean of no elements is NaN, as torch's (lrpcpp.mean's forward is torch's)
    for out in outputs(result):
        if checked and finite_in and isinstance(out, torch.Tensor) and out.device.type == "cpu":
            assert finite(out), f"{name}: non-finite output from finite inputs"


@pytest.mark.parametrize(
    "name",
    OPS,
)
def test_fuzz_op(name):
    @settings(
        max_examples=40,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(call_args(name))
    def run(case):
        args, checked = case
        check_call(name, args, checked)

    run()


def test_every_op_is_fuzzed():
    assert len(OPS) > 50 and "linear_epsilon" in OPS and "gi_layer_norm_backward" in OPS

"""Bad input gets a clear error naming the op, the argument and what was expected; empty tensors
work; zero pre-activations give no NaN; double backward raises."""

import lrpcpp.functional as lf
import pytest
import torch

f64 = torch.float64


def x_(*shape, dtype=f64, grad=True):
    return torch.randn(*shape, dtype=f64).to(dtype).requires_grad_(grad)


BAD_CALLS = [
    # (call, exception, message pattern)
    (
        lambda: lf.linear_epsilon(x_(2, 5), x_(3, 4)),
        RuntimeError,
        r"linear_epsilon: expected the last dimension of x \[2, 5\] to equal in_features = weight.shape\[1\] = 4",
    ),
    (lambda: lf.linear_epsilon(x_(2, 5), x_(3, 5, 1)), RuntimeError, r"expected weight to be 2-D"),
    (lambda: lf.linear_epsilon(x_(2, 5), x_(3, 5), x_(4)), RuntimeError, r"expected bias to have 3 elements"),
    (
        lambda: lf.linear_epsilon(x_(2, 5), x_(3, 5, dtype=torch.float32)),
        RuntimeError,
        r"expected weight to have the dtype of x \(Double\), got Float",
    ),
    (
        lambda: lf.linear_epsilon(torch.ones(2, 5, dtype=torch.long), torch.ones(3, 5, dtype=torch.long)),
        RuntimeError,
        r"linear_epsilon: expected x to be a floating-point tensor .* got Long",
    ),
    (
        lambda: lf.linear_epsilon(x_(2, 5), x_(3, 5), epsilon=-1.0),
        RuntimeError,
        r"expected epsilon to be a finite number >= 0, got -1",
    ),
    (
        lambda: lf.linear_epsilon(x_(2, 5), torch.empty(3, 5, dtype=f64, device="meta")),
        RuntimeError,
        r"expected weight to be on the same device as x \(cpu\), got meta",
    ),
    (lambda: lf.conv2d_epsilon(x_(1, 3, 5), x_(2, 3, 3, 3)), RuntimeError, r"expected x to be 4-D"),
    (lambda: lf.conv2d_epsilon(x_(1, 4, 5, 5), x_(2, 3, 3, 3)), RuntimeError, r"expected x to have 3 channels"),
    (
        lambda: lf.add2(x_(2, 3), x_(4, 3)),
        RuntimeError,
        r"add2: expected a \[2, 3\] and b \[4, 3\] to be broadcastable",
    ),
    (lambda: lf.add2(x_(2, 3), x_(2, 3), epsilon=-0.1), RuntimeError, r"add2: expected epsilon"),
    (
        lambda: lf.mul2(x_(2, 3), x_(2, 3, dtype=torch.float32)),
        RuntimeError,
        r"mul2: expected b to have the dtype of a",
    ),
    (lambda: lf.matmul(x_(2, 3), x_(4, 5)), RuntimeError, r"matmul: expected a.shape\[-1\] to equal b.shape\[-2\]"),
    (
        lambda: lf.matmul(x_(3), x_(3, 5)),
        RuntimeError,
        r"matmul: expected a \[..., n, k\] and b \[..., k, m\] to have at least 2",
    ),
    (lambda: lf.matmul(x_(2, 2, 3), x_(3, 3, 4)), RuntimeError, r"batch dimensions .* broadcastable"),
    (lambda: lf.softmax(x_(2, 3), 2), IndexError, r"softmax: expected dim in \[-2, 1\] .* got 2"),
    (lambda: lf.softmax(x_(2, 3), -3), IndexError, r"softmax: expected dim in \[-2, 1\]"),
    (lambda: lf.softmax(x_(2, 3), 1, temperature=0.0), RuntimeError, r"expected temperature to be a finite number > 0"),
    (lambda: lf.softmax(torch.ones(2, 3, dtype=torch.int32), 1), RuntimeError, r"expected x to be a floating-point"),
    (
        lambda: lf.layer_norm(x_(2, 3), [4]),
        RuntimeError,
        r"layer_norm: expected x \[2, 3\] to end with normalized_shape \[4\]",
    ),
    (
        lambda: lf.layer_norm(x_(2, 3), [3], x_(4)),
        RuntimeError,
        r"expected weight to have shape normalized_shape = \[3\]",
    ),
    (lambda: lf.layer_norm(x_(2, 3), [3], epsilon=-1.0), RuntimeError, r"layer_norm: expected epsilon"),
    (lambda: lf.rms_norm_identity(x_(2, 3), []), RuntimeError, r"expected normalized_shape to have at least one"),
    (lambda: lf.rms_norm_identity(x_(2, 3), [3], None, -1.0), RuntimeError, r"expected eps to be a finite number >= 0"),
    (lambda: lf.mean(x_(2, 3), [2]), IndexError, r"mean: expected every dim in \[-2, 1\]"),
    (lambda: lf.mean(x_(2, 3), [1, -1]), RuntimeError, r"mean: dim -1 appears more than once"),
    (lambda: lf.normalize_identity(x_(2, 3), 2.0, 5), IndexError, r"normalize_identity: expected dim in"),
    (lambda: lf.gelu(x_(2, 3), "fast"), RuntimeError, r"expected approximate to be 'none' or 'tanh', got 'fast'"),
    (lambda: lf.relu(torch.ones(3, dtype=torch.long)), RuntimeError, r"relu_identity: expected x to be a floating"),
    (
        lambda: lf.stab_div(x_(2, 3), x_(3, 2), 1e-6),
        RuntimeError,
        r"stab_div: expected relevance to have the shape of z",
    ),
    (
        lambda: lf.stab_div(x_(2, 3), x_(2, 3), 1e-6, dtype=torch.float16),
        RuntimeError,
        r"expected dtype to be z's dtype \(Double\) or float32",
    ),
    # gradient-times-input ops
    (
        lambda: lf.gi_identity(x_(2, 3), x_(3, 2)),
        RuntimeError,
        r"gi_identity: expected x \[2, 3\] and y \[3, 2\] to have the same shape",
    ),
    (
        lambda: lf.gi_identity(x_(2, 3), torch.ones(2, 3, dtype=torch.long)),
        RuntimeError,
        r"gi_identity: expected y to be a floating-point tensor .* got Long",
    ),
    (
        lambda: lf.gi_identity(torch.ones(2, 3, dtype=torch.int32), x_(2, 3)),
        RuntimeError,
        r"gi_identity: expected x to be a floating-point tensor .* got Int",
    ),
    (
        lambda: lf.gi_identity(x_(2, 3), torch.empty(2, 3, dtype=f64, device="meta")),
        RuntimeError,
        r"gi_identity: expected y to be on the same device as x \(cpu\), got meta",
    ),
    (
        lambda: lf.gi_identity(x_(2, 3), x_(2, 3), epsilon=-1e-10),
        RuntimeError,
        r"gi_identity: expected epsilon to be a finite number >= 0, got -1e-10",
    ),
    (
        lambda: torch.ops.lrpcpp.gi_identity_factor(x_(2, 3), x_(2, 4), 1e-10),
        RuntimeError,
        r"gi_identity_factor: expected x \[2, 3\] and y \[2, 4\] to have the same shape",
    ),
    (
        lambda: lf.gi_grad_scale(x_(2, 3), x_(2)),
        RuntimeError,
        r"gi_grad_scale: expected scale \[2\] to be broadcastable to x \[2, 3\], but they differ at dimension -1",
    ),
    (
        lambda: lf.gi_grad_scale(x_(2, 3), x_(1, 2, 3)),
        RuntimeError,
        r"gi_grad_scale: expected scale \[1, 2, 3\] to be broadcastable to x \[2, 3\], but it has more dimensions",
    ),
    (
        lambda: lf.gi_grad_scale(x_(2, 3), torch.ones(3, dtype=torch.long)),
        RuntimeError,
        r"gi_grad_scale: expected scale to be a floating-point tensor .* got Long",
    ),
    (
        lambda: lf.gi_grad_scale(x_(2, 3), torch.empty(3, dtype=f64, device="meta")),
        RuntimeError,
        r"gi_grad_scale: expected scale to be on the same device as x \(cpu\), got meta",
    ),
    (
        lambda: torch.ops.lrpcpp.gi_scale_backward(x_(2, 3), x_(4), f64),
        RuntimeError,
        r"gi_scale_backward: expected factor \[4\] to be broadcastable to grad \[2, 3\]",
    ),
    (
        lambda: torch.ops.lrpcpp.gi_scale_backward(x_(2, 3), x_(3), torch.long),
        RuntimeError,
        r"gi_scale_backward: expected dtype to be a floating-point type .*, got Long",
    ),
    (
        lambda: lf.gi_layer_norm(x_(2, 3), [4]),
        RuntimeError,
        r"gi_layer_norm: expected x \[2, 3\] to end with normalized_shape \[4\]",
    ),
    (
        lambda: lf.gi_layer_norm(x_(2, 3), [3], x_(4)),
        RuntimeError,
        r"gi_layer_norm: expected weight to have shape normalized_shape = \[3\]",
    ),
    (
        lambda: lf.gi_layer_norm(x_(2, 3), [3], None, torch.empty(3, dtype=f64, device="meta")),
        RuntimeError,
        r"gi_layer_norm: expected bias to be on the same device as x \(cpu\), got meta",
    ),
    (
        lambda: lf.gi_layer_norm(x_(2, 3), [3], eps=-1.0),
        RuntimeError,
        r"gi_layer_norm: expected eps to be a finite number >= 0, got -1",
    ),
    (
        lambda: lf.gi_layer_norm(torch.ones(2, 3, dtype=torch.long), [3]),
        RuntimeError,
        r"gi_layer_norm: expected x to be a floating-point tensor",
    ),
    (
        lambda: torch.ops.lrpcpp.gi_layer_norm_backward(x_(2, 4), x_(2, 1), [3], None),
        RuntimeError,
        r"gi_layer_norm_backward: expected grad \[2, 4\] to end with normalized_shape \[3\]",
    ),
    (
        lambda: torch.ops.lrpcpp.gi_layer_norm_backward(x_(2, 3), x_(2, 3), [3], None),
        RuntimeError,
        r"gi_layer_norm_backward: expected rstd to hold one value per row of grad \[2, 3\] \(its leading dims, then "
        r"1 dims of size 1, as native_layer_norm returns it\), got \[2, 3\]",
    ),
    (
        lambda: torch.ops.lrpcpp.gi_layer_norm_backward(x_(2, 3, dtype=torch.float32), x_(2, 1), [3], x_(3)),
        RuntimeError,
        r"gi_layer_norm_backward: expected weight to have the dtype of grad \(Float\), or float32 when grad is "
        r"float16 or bfloat16, got Double",
    ),
    # checks that come before ATen's own (whose messages do not name the op)
    (
        lambda: lf.conv2d_epsilon(x_(1, 3, 2, 2), x_(2, 3, 3, 3)),
        RuntimeError,
        r"conv2d_epsilon: expected the kernel \[2, 3, 3, 3\] .* to fit into the padded input \[1, 3, 2, 2\] \+ padding "
        r"\[0, 0\], but kernel extent 3 > padded input size 2 at dimension 2",
    ),
    (
        lambda: lf.conv2d_epsilon(x_(1, 3, 2, 5), x_(2, 3, 1, 3), dilation=3),
        RuntimeError,
        r"conv2d_epsilon: expected the kernel .* but kernel extent 7 > padded input size 5 at dimension 3",
    ),
    (
        lambda: lf.conv2d_gamma(x_(1, 4, 5, 5), x_(3, 2, 3, 3), groups=2),
        RuntimeError,
        r"conv2d_gamma: expected out_channels = weight.shape\[0\] = 3 to be divisible by groups = 2",
    ),
    (
        lambda: torch.ops.lrpcpp.conv2d_epsilon(
            x_(1, 3, 5, 5), x_(2, 3, 3, 3), None, [1, 1, 1], [0, 0], [1, 1], 1, 1e-6
        ),
        RuntimeError,
        r"conv2d_epsilon: expected stride, padding and dilation to have 2 values each",
    ),
    (
        lambda: lf.layer_norm(x_(2, 3), [3], x_(3, dtype=torch.float32)),
        RuntimeError,
        r"layer_norm: expected weight to have the dtype of x \(Double\), or float32 when x is float16 or bfloat16, "
        r"got Float",
    ),
    (
        lambda: lf.layer_norm_identity(x_(2, 3, dtype=torch.float32), [3], None, x_(3)),
        RuntimeError,
        r"layer_norm_identity: expected bias to have the dtype of x \(Float\).* got Double",
    ),
    (
        lambda: lf.gi_layer_norm(x_(2, 3, dtype=torch.float16), [3], x_(3, dtype=torch.bfloat16)),
        RuntimeError,
        r"gi_layer_norm: expected weight to have the dtype of x \(Half\).* got BFloat16",
    ),
    (
        lambda: lf.linear_epsilon(x_(2, 5).to(torch.float8_e4m3fn), x_(3, 5).to(torch.float8_e4m3fn)),
        RuntimeError,
        r"linear_epsilon: expected x to be a floating-point tensor \(float64, float32, float16 or bfloat16\), "
        r"got Float8_e4m3fn",
    ),
    (
        lambda: lf.silu(x_(4).to(torch.float8_e5m2)),
        RuntimeError,
        r"silu_identity: expected x to be a floating-point tensor .* got Float8_e5m2",
    ),
    (
        lambda: lf.softmax(x_(2, 3), 1, dtype=torch.float8_e4m3fn),
        RuntimeError,
        r"softmax: expected dtype to be a floating-point type \(float64, float32, float16 or bfloat16\), "
        r"got Float8_e4m3fn",
    ),
    (
        lambda: torch.ops.lrpcpp.identity_relevance(x_(2, 3), torch.float8_e4m3fn),
        RuntimeError,
        r"identity_relevance: expected dtype to be a floating-point type .* got Float8_e4m3fn",
    ),
    (
        lambda: lf.stab_div(x_(2, 3), x_(2, 3), 1e-6, float("nan")),
        RuntimeError,
        r"stab_div: expected scale to be a finite number, got nan",
    ),
    (
        lambda: lf.stab_div(x_(2, 3), x_(2, 3), 1e-6, float("inf")),
        RuntimeError,
        r"stab_div: expected scale to be a finite number, got inf",
    ),
    (
        lambda: lf.normalize_identity(x_(2, 3), 2.0, 1, float("inf")),
        RuntimeError,
        r"normalize_identity: expected eps to be a finite number >= 0, got inf",
    ),
    (
        lambda: lf.normalize_identity(x_(0, 3), -1.0, 1),
        RuntimeError,
        r"normalize_identity: expected x \[0, 3\] to be non-empty for the p = -1 norm",
    ),
    (
        lambda: lf.layer_norm(
            x_(2, 3, dtype=torch.bfloat16), [3], x_(3, dtype=torch.float32), x_(3, dtype=torch.bfloat16)
        ),
        RuntimeError,
        r"layer_norm: expected bias to have the dtype of weight \(Float\), got BFloat16",
    ),
    # a relevance op's output must have the shape its forward gives
    (
        lambda: torch.ops.lrpcpp.linear_epsilon_relevance(x_(1, 3), x_(2, 5), x_(3, 5), x_(1, 3), 1e-6),
        RuntimeError,
        r"linear_epsilon_relevance: expected output to have the shape \[2, 3\] of the forward, got \[1, 3\]",
    ),
    (
        lambda: torch.ops.lrpcpp.linear_flat_relevance(x_(0, 1), x_(1, 1), x_(1, 1), x_(0, 1), 1e-6, False),
        RuntimeError,
        r"linear_flat_relevance: expected output to have the shape \[1, 1\] of the forward, got \[0, 1\]",
    ),
    (
        lambda: torch.ops.lrpcpp.conv2d_gamma_relevance(
            x_(1, 2, 2, 2),
            x_(1, 3, 5, 5),
            x_(2, 3, 3, 3),
            None,
            None,
            x_(1, 2, 2, 2),
            [1, 1],
            [0, 0],
            [1, 1],
            1,
            0.25,
            1e-6,
            False,
        ),
        RuntimeError,
        r"conv2d_gamma_relevance: expected output to have the shape \[1, 2, 3, 3\] of the forward, "
        r"got \[1, 2, 2, 2\]",
    ),
    (
        lambda: torch.ops.lrpcpp.matmul_relevance(x_(3, 4), x_(2, 3), x_(3, 4), x_(3, 4), 1e-8, [True, True]),
        RuntimeError,
        r"matmul_relevance: expected output to have the shape \[2, 4\] of a @ b, got \[3, 4\]",
    ),
]


@pytest.mark.parametrize("call,exc,pattern", BAD_CALLS, ids=[str(i) for i in range(len(BAD_CALLS))])
def test_bad_input_raises_a_clear_error(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_relevance_op_checks_grad_shape():
    x, w = x_(2, 5), x_(3, 5)
    y = torch.ops.lrpcpp.linear_epsilon(x, w, None, 1e-6)
    with pytest.raises(RuntimeError, match=r"linear_epsilon_relevance: expected grad to have the shape of output"):
        torch.ops.lrpcpp.linear_epsilon_relevance(torch.ones(2, 4, dtype=f64), x, w, y.detach(), 1e-6)
    with pytest.raises(RuntimeError, match=r"softmax_relevance: expected output to have the shape of x"):
        torch.ops.lrpcpp.softmax_relevance(torch.ones(2, 4, dtype=f64), x.detach(), torch.ones(2, 4, dtype=f64), 1, 1.0)


@pytest.mark.parametrize(
    "build",
    [
        lambda x: lf.linear_epsilon(x, x_(3, 4, grad=False)),
        lambda x: lf.softmax(x, -1),
        lambda x: lf.layer_norm(x, [4]),
        lambda x: lf.add2(x, x),
        lambda x: lf.matmul(x, x.transpose(-1, -2)),
        lambda x: lf.mean(x, [-1]),
        lambda x: lf.gi_identity(x, torch.tanh(x.detach())),
        lambda x: lf.gi_grad_scale(x, torch.tensor(0.5, dtype=f64)),
        lambda x: lf.gi_layer_norm(x, [4]),
        # the vision rules
        lambda x: lf.linear_gamma(x, x_(3, 4, grad=False)),
        lambda x: lf.linear_alpha_beta(x, x_(3, 4, grad=False)),
        lambda x: lf.linear_z_box(
            x, x_(3, 4, grad=False), None, torch.tensor(-9.0, dtype=f64), torch.tensor(9.0, dtype=f64)
        ),
        lambda x: lf.linear_w_square(x, x_(3, 4, grad=False), gi=True),
    ],
)
def test_double_backward_raises(build):
    x = x_(2, 4)
    y = build(x)
    # the relevance op's missing derivative on the second backward, or the refusal of create_graph
    with pytest.raises(RuntimeError, match=r"derivative for lrpcpp::\w+ is not implemented|double backward"):
        (g,) = torch.autograd.grad(y, x, y, create_graph=True)
        g.sum().backward()


# Rules whose backward does not depend on x (identity: R_x = R; the gradient-times-input scalings
# g * factor with the factor saved without a graph): with a constant seed, create_graph=True would
# return a relevance with no graph, and a second backward would silently miss its part.
NO_GRAPH_BACKWARD = {
    "silu_identity": lambda x: lf.silu(x),
    "gelu_identity": lambda x: lf.gelu(x, "tanh"),
    "tanh_identity": lambda x: lf.tanh(x),
    "relu_identity": lambda x: lf.relu(x),
    "sigmoid_identity": lambda x: lf.sigmoid(x),
    "rms_norm_identity": lambda x: lf.rms_norm_identity(x, [4], x_(4, grad=False)),
    "layer_norm_identity": lambda x: lf.layer_norm_identity(x, [4]),
    "normalize_identity": lambda x: lf.normalize_identity(x, 2.0, -1),
    "stop_relevance": lambda x: lf.stop_relevance(x),
    "gi_identity": lambda x: lf.gi_identity(x, torch.tanh(x)),
    "gi_grad_scale": lambda x: lf.gi_grad_scale(x, torch.tensor(0.5, dtype=f64)),
    "gi_layer_norm": lambda x: lf.gi_layer_norm(x, [4]),
}


@pytest.mark.parametrize("op", sorted(NO_GRAPH_BACKWARD))
@pytest.mark.parametrize("seed", ["constant", "carried"])
def test_create_graph_through_a_rule_without_graph_raises(op, seed):
    x = x_(2, 4)
    y = NO_GRAPH_BACKWARD[op](x)
    grad_out = torch.ones_like(y) if seed == "constant" else y
    with pytest.raises(RuntimeError, match=rf"lrpcpp\.{op}: double backward is not supported.*create_graph=True"):
        torch.autograd.grad(y, x, grad_out, create_graph=True)
    # without create_graph the same backward works
    y = NO_GRAPH_BACKWARD[op](x)
    (g,) = torch.autograd.grad(y, x, grad_out.detach())
    assert g.shape == x.shape and not g.requires_grad


@pytest.mark.parametrize(
    "build",
    [
        lambda x: lf.linear_epsilon(x, x_(3, 4, grad=False)),
        lambda x: lf.softmax(x, -1),
        lambda x: lf.layer_norm(x, [4]),
        lambda x: lf.add2(x, x),
        lambda x: lf.mul2(x, x),
        lambda x: lf.matmul(x, x_(4, 2, grad=False)),
        lambda x: lf.mean(x, [0]),
        lambda x: lf.silu(x),
        lambda x: lf.rms_norm_identity(x, [4]),
        lambda x: lf.stop_relevance(x),
    ],
    ids=["linear", "softmax", "layer_norm", "add2", "mul2", "matmul", "mean", "silu", "rms_norm", "stop"],
)
def test_empty_tensors(build):
    x = x_(0, 4)
    y = build(x)
    y.backward(y)
    assert x.grad.shape == x.shape


def test_zero_preactivations_give_no_nan():
    x = torch.zeros(3, 4, dtype=torch.float32, requires_grad=True)
    y = lf.linear_epsilon(x, torch.randn(5, 4))
    y.backward(torch.ones_like(y))  # R / stab(0) = R / eps, finite
    assert torch.isfinite(x.grad).all()
    a = torch.zeros(4, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    lf.add2(a, b).backward(torch.ones(4))
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    m = torch.zeros(2, 3, requires_grad=True)
    lf.mean(m, [1]).backward(torch.ones(2))
    assert torch.isfinite(m.grad).all()
    ln = torch.ones(2, 4, requires_grad=True)  # constant rows: y = bias exactly
    lf.layer_norm(ln, [4]).backward(torch.ones(2, 4))
    assert torch.isfinite(ln.grad).all()
    mm = torch.zeros(2, 3, requires_grad=True)
    lf.matmul(mm, torch.zeros(3, 2, requires_grad=True)).backward(torch.ones(2, 2))
    assert torch.isfinite(mm.grad).all()


# ----------------------------------------------------------------------------- vision rules
VISION_BAD_CALLS = [
    (
        lambda: lf.linear_gamma(x_(2, 5), x_(3, 5), gamma=-0.5),
        RuntimeError,
        r"linear_gamma: expected gamma to be a finite number >= 0, got -0.5",
    ),
    (
        lambda: lf.linear_gamma(x_(2, 5), x_(3, 5), None, 0.25, 1e-6, x_(3, 4)),
        RuntimeError,
        r"linear_gamma: expected weight_abs to have the shape of weight \[3, 5\], got \[3, 4\]",
    ),
    (
        lambda: lf.linear_gamma(x_(2, 5), x_(3, 5), None, 0.25, 1e-6, x_(3, 5, dtype=torch.float32)),
        RuntimeError,
        r"linear_gamma: expected weight_abs to have the dtype of weight \(Double\), got Float",
    ),
    (
        lambda: lf.linear_alpha_beta(x_(2, 5), x_(3, 5), alpha=2.0, beta=2.0),
        RuntimeError,
        r"linear_alpha_beta: expected alpha - beta = 1 .* got alpha=2, beta=2",
    ),
    (
        lambda: lf.conv2d_alpha_beta(x_(1, 2, 4, 4), x_(3, 2, 3, 3), alpha=0.5, beta=-0.5),
        RuntimeError,
        r"conv2d_alpha_beta: expected finite alpha and beta with beta >= 0",
    ),
    (
        lambda: lf.linear_z_box(x_(2, 5), x_(3, 5), None, x_(4), x_(5)),
        RuntimeError,
        r"linear_z_box: expected lower \[4\] to be broadcastable to x \[2, 5\], but they differ at dimension -1",
    ),
    (
        lambda: lf.conv2d_z_box(x_(1, 2, 4, 4), x_(3, 2, 3, 3), None, x_(1, 1, 2, 1, 1), x_(1)),
        RuntimeError,
        r"conv2d_z_box: expected lower \[1, 1, 2, 1, 1\] to be broadcastable to x \[1, 2, 4, 4\], but it has more",
    ),
    (
        lambda: lf.linear_z_box(x_(2, 5), x_(3, 5), None, x_(5), torch.ones(5, dtype=torch.long)),
        RuntimeError,
        r"linear_z_box: expected upper to be a floating-point tensor",
    ),
    (
        lambda: lf.conv2d_gamma(x_(1, 4, 5, 5), x_(2, 3, 3, 3)),
        RuntimeError,
        r"conv2d_gamma: expected x to have 3 channels \(weight.shape\[1\] \* groups\), got 4",
    ),
    (
        lambda: lf.conv2d_w_square(x_(1, 3, 5, 5), x_(2, 3, 3, 3), epsilon=-1.0),
        RuntimeError,
        r"conv2d_w_square: expected epsilon to be a finite number >= 0",
    ),
    (
        lambda: lf.linear_flat(x_(2, 5), x_(3, 4)),
        RuntimeError,
        r"linear_flat: expected the last dimension of x \[2, 5\] to equal in_features = weight.shape\[1\] = 4",
    ),
    (
        lambda: torch.ops.lrpcpp.linear_z_plus_relevance(x_(2, 4), x_(2, 5), x_(3, 5), None, x_(2, 3), 1e-6, False),
        RuntimeError,
        r"linear_z_plus_relevance: expected grad to have the shape of output \[2, 3\], got \[2, 4\]",
    ),
    (
        lambda: torch.ops.lrpcpp.conv2d_gamma_relevance(
            x_(1, 2, 3, 3),
            x_(1, 3, 5, 5),
            x_(2, 3, 3, 3),
            None,
            None,
            x_(1, 2, 3, 3),
            [1, 1],
            [0, 0],
            [1, 1],
            1,
            -1.0,
            1e-6,
            False,
        ),
        RuntimeError,
        r"conv2d_gamma_relevance: expected gamma to be a finite number >= 0",
    ),
    (
        lambda: torch.ops.lrpcpp.gamma_stab_div(x_(2, 3), x_(2, 3), x_(2, 3), x_(3), 2, 0.25, 1e-6, False),
        IndexError,
        r"gamma_stab_div: expected bias_dim in \[-2, 1\], got 2",
    ),
    (
        lambda: torch.ops.lrpcpp.gamma_stab_div(x_(2, 3), x_(2, 3), x_(2, 3), x_(2), -1, 0.25, 1e-6, False),
        RuntimeError,
        r"gamma_stab_div: expected bias to have 3 elements \(output.shape\[1\]\), got 2",
    ),
    (
        lambda: torch.ops.lrpcpp.alpha_beta_stab_div(x_(2, 3), x_(2, 3), x_(2, 3), x_(3, 2), 2.0, 1.0, 1e-6, False),
        RuntimeError,
        r"alpha_beta_stab_div: expected neg_sum to have the shape of output \[2, 3\], got \[3, 2\]",
    ),
    (
        lambda: torch.ops.lrpcpp.split_times_input(x_(2, 3), x_(2, 3), x_(2, 3, dtype=torch.float32), False),
        RuntimeError,
        r"split_times_input: expected b to have the dtype of x \(Double\), got Float",
    ),
]


@pytest.mark.parametrize("call,exc,pattern", VISION_BAD_CALLS, ids=[str(i) for i in range(len(VISION_BAD_CALLS))])
def test_vision_rules_bad_input_raises_a_clear_error(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.parametrize(
    "build",
    [
        lambda x: lf.linear_gamma(x, x_(3, 4, grad=False)),
        lambda x: lf.linear_alpha_beta(x, x_(3, 4, grad=False)),
        lambda x: lf.linear_z_plus(x, x_(3, 4, grad=False)),
        lambda x: lf.linear_flat(x, x_(3, 4, grad=False), gi=True),
        lambda x: lf.conv2d_gamma(x.reshape(0, 1, 2, 2), x_(3, 1, 1, 1, grad=False)),
    ],
    ids=["gamma", "alpha_beta", "z_plus", "flat", "conv2d_gamma"],
)
def test_vision_rules_empty_tensors(build):
    x = x_(0, 4)
    y = build(x)
    y.backward(y)
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("rule", ["gamma", "alpha_beta", "z_plus", "z_box", "flat", "w_square"])
def test_vision_rules_zero_input_gives_no_nan(rule):
    x = torch.zeros(3, 4, dtype=torch.float32, requires_grad=True)
    w = torch.randn(5, 4)
    lo, hi = torch.tensor(-1.0), torch.tensor(1.0)
    y = {
        "gamma": lambda: lf.linear_gamma(x, w),
        "alpha_beta": lambda: lf.linear_alpha_beta(x, w),
        "z_plus": lambda: lf.linear_z_plus(x, w),
        "z_box": lambda: lf.linear_z_box(x, w, None, lo, hi),
        "flat": lambda: lf.linear_flat(x, w),
        "w_square": lambda: lf.linear_w_square(x, w),
    }[rule]()
    y.backward(torch.ones_like(y))
    assert torch.isfinite(x.grad).all()

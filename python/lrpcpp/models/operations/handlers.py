"""The per-operation rules of gradient mode (RULES.md section 2) and :data:`RULES`, the table that
maps each torch function to its handler; :data:`EXACT`, the functions whose ordinary gradient is
already the gradient-mode rule; :data:`GATES`, the functions whose output a CP-LRP product holds
constant, and :data:`KEEPS_GATE`, those whose output stays a gate."""

from types import MappingProxyType
from typing import Any, Callable, Iterable, List, Mapping, Protocol, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from ..explicit.pass_through import DROPOUT, PASS_THROUGH
from ..tracking import carries, const, inplace_form, with_gradient_of
from .recurrent import RECURRENT

_T = Tensor


def _spellings(names: Iterable[str], *owners) -> List[Callable]:
    return [getattr(o, n) for n in names for o in owners if getattr(o, n, None) is not None]


# ----------------------------------------------------------------------------- handlers
# A handler is called as handler(mode, func, *args, **kwargs) with the arguments of the torch call,
# once at least one argument carries relevance, with the rule modes suspended. It returns the
# result, or NotImplemented to run the call with its ordinary gradient (then it must be in EXACT
# for the arguments it declines, or it is reported as unruled).


class _Shares(Protocol):
    """What the product rules ask of the mode (:class:`~lrpcpp.models.operations.mode.GradientRules`)."""

    uniform: bool

    def is_gate(self, t: Any) -> bool: ...

    def share(self, t: Tensor, share: float) -> Tensor: ...


def products(mode: _Shares, operands: Sequence) -> List:
    """The operands of a product, each carrier with its share of the gradient (RULES.md section 2):
    ``attnlrp`` splits it evenly; ``cp-lrp`` holds the gates (softmax and activation outputs)
    constant and splits it among the others, or evenly when all or none are gates."""
    carrying = [i for i, o in enumerate(operands) if carries(o)]
    shares = {i: 1.0 / len(carrying) for i in carrying}
    if not mode.uniform:
        gates = [i for i in carrying if mode.is_gate(operands[i])]
        if 0 < len(gates) < len(carrying):
            shares = {i: 0.0 if i in gates else 1.0 / (len(carrying) - len(gates)) for i in carrying}
    return [mode.share(o, shares[i]) if i in shares else const(o) for i, o in enumerate(operands)]


def _product(mode, func, input, other, *args, out=None, **kwargs):
    # (the other arguments: tensordot's dims, bilinear's weight and bias, cross's dim)
    if out is not None or not (carries(input) and carries(other)):
        return NotImplemented
    a, b = products(mode, (input, other))
    return func(a, b, *args, **kwargs)


def _grouped_mm(mode, func, mat_a, mat_b, *args, **kwargs):
    # a mixture of experts' grouped matrix product: linear in a carrier times expert weights (its
    # ordinary gradient), a product when both operands carry relevance
    if not (carries(mat_a) and carries(mat_b)):
        return NotImplemented
    a, b = products(mode, (mat_a, mat_b))
    return func(a, b, *args, **kwargs)


def _affine_mm(mode, func, input, *factors, beta=1, alpha=1, out=None, **named):
    # beta * input + alpha * (a @ b): the factors by position or by name (addmm's mat1 and mat2,
    # baddbmm's and addbmm's batch1 and batch2, addmv's mat and vec, addr's vec1 and vec2)
    factors += tuple(
        named.pop(n) for n in ("mat1", "mat2", "batch1", "batch2", "mat", "vec", "vec1", "vec2") if n in named
    )
    if out is not None or named or len(factors) != 2 or not all(carries(f) for f in factors):
        return NotImplemented
    a, b = products(mode, factors)
    return func(input, a, b, beta=beta, alpha=alpha)


def _addcmul(mode, func, input, tensor1, tensor2, *, value=1, out=None):
    # input + value * tensor1 * tensor2, element-wise
    if out is not None or not (carries(tensor1) and carries(tensor2)):
        return NotImplemented
    a, b = products(mode, (tensor1, tensor2))
    return func(input, a, b, value=value)


def _einsum(mode, func, equation, *operands):
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(equation, str) or sum(carries(o) for o in operands) < 2:
        return NotImplemented
    return torch.einsum(equation, *products(mode, operands))


def _chain(mode, func, *matrices, **kwargs):
    # a product of several matrices (torch.linalg.multi_dot's list, torch.chain_matmul's arguments):
    # the gradient split among its carriers as a product of two's is
    listed = len(matrices) == 1 and isinstance(matrices[0], (list, tuple))
    operands = tuple(matrices[0]) if listed else matrices
    if sum(carries(o) for o in operands) < 2 or kwargs.get("out") is not None:
        return NotImplemented
    shared = products(mode, operands)
    return func(shared, **kwargs) if listed else func(*shared, **kwargs)


def _matrix_power(mode, func, input, n, *args, **kwargs):
    # A^n (n > 1): a product of n carrying factors, each with 1 / n of the gradient, as prod's; A^0 is
    # a constant; a negative power inverts A, which no rule here describes
    if not carries(input) or not isinstance(n, int) or n < 0 or kwargs.get("out") is not None:
        return NotImplemented
    return func(mode.share(input, 1.0 / n) if n > 1 else input, n, *args, **kwargs)


def _clamp(mode, func, input, *args, **kwargs):
    # bounds that carry relevance make it an element-wise max and min, a selection whose own gradient
    # gives the selected value all of it; constant bounds: an element-wise function, the identity rule
    if any(carries(b) for b in list(args) + list(kwargs.values())):
        return func(input, *args, **kwargs)
    return _IDENTITY_RULE(mode, func, input, *args, **kwargs)


def _scatter_reduce(mode, func, input, *args, **kwargs):
    # sums, means and maxima of the values scattered to each place: their own gradient, as
    # scatter_add's and max's; a product of them has no rule here
    reduce = args[3] if len(args) > 3 else kwargs.get("reduce")
    return func(input, *args, **kwargs) if reduce in ("sum", "mean", "amax", "amin") else NotImplemented


def _grid_sample(mode, func, input, grid, *args, **kwargs):
    # an interpolation at constant points is linear in the input: its own gradient; at points that
    # carry relevance (a spatial transformer's), a product that no rule here describes
    return NotImplemented if carries(grid) else func(input, grid, *args, **kwargs)


def _bagged(rules, func, args: list, kwargs: dict, table_at: int, weights_at: int):
    # sums, means or maxima of a table's rows per bag: linear in the table and in a sum's per-sample
    # weights (their own gradient, as embedding's); a product of the two where both carry relevance
    named = "per_sample_weights" in kwargs
    weights = kwargs["per_sample_weights"] if named else args[weights_at] if len(args) > weights_at else None
    if carries(args[table_at]) and carries(weights):
        args[table_at], weights = products(rules, (args[table_at], weights))
        if named:
            kwargs = {**kwargs, "per_sample_weights": weights}
        else:
            args[weights_at] = weights
    return func(*args, **kwargs)


def _embedding_bag(rules, func, weight, input, /, *args, **kwargs):
    # torch.embedding_bag(weight, indices, offsets, scale_grad_by_freq, mode, sparse, per_sample_weights, ...)
    # (the mode is rules here: the function has an argument "mode" of its own)
    return _bagged(rules, func, [weight, input, *args], kwargs, 0, 6)


def _functional_embedding_bag(rules, func, input, weight, /, *args, **kwargs):
    # F.embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
    # per_sample_weights, ...) ruled as one call (torch.compile records it as one); with max_norm, which
    # renormalises the table's rows in place, its body's calls get their rules
    if (args[1] if len(args) > 1 else kwargs.get("max_norm")) is not None:
        return NotImplemented
    return _bagged(rules, func, [input, weight, *args], kwargs, 1, 8)


def _renorm(mode, func, input, p, dim, maxnorm, *, out=None):
    # each slice along dim scaled to a norm of at most maxnorm, by torch's factor maxnorm / (norm + 1e-7)
    # where the norm exceeds it: a normaliser, held constant; the value is torch's own
    if out is not None or not carries(input):
        return NotImplemented
    with torch.no_grad():
        value = func(input, p, dim, maxnorm)
        others = [d for d in range(input.dim()) if d != dim % input.dim()]
        norm = torch.linalg.vector_norm(input, p, others, keepdim=True)
        scale = torch.where(norm > maxnorm, maxnorm / (norm + 1e-7), torch.ones_like(norm))
    return with_gradient_of(value, input * scale)


def _sdpa(mode, func, query, key, value, *args, **kwargs):
    """``softmax(q kᵀ s + mask) v`` stays one kernel: the products' shares go to q, k and v as the
    registry's attention entries give them (AttnLRP: a quarter each to q and k, half to v; CP-LRP:
    q and k held constant, v takes all)."""
    qk = [t for t in (query, key) if carries(t)]
    if not mode.uniform:
        q_share, v_share = 0.0, 1.0
    elif carries(value):
        q_share, v_share = (0.5 / len(qk) if qk else 0.0), (0.5 if qk else 1.0)
    else:
        q_share, v_share = 1.0 / max(len(qk), 1), 1.0
    q, k = (mode.share(t, q_share) if carries(t) else const(t) for t in (query, key))
    v = mode.share(value, v_share) if carries(value) else const(value)
    return func(q, k, v, *args, **kwargs)


def _div(mode, func, input, other, *args, **kwargs):
    # a relevance-carrying divisor is a normaliser: held constant
    if not carries(other):
        return NotImplemented
    return func(input, other.detach(), *args, **kwargs)


def _rdiv(mode, func, input, other):
    # Tensor.__rdiv__(self, other) is other / self: self is the divisor
    return func(input.detach(), other) if carries(input) else NotImplemented


def _solve(mode, func, A, B, *args, **kwargs):
    # X = A^-1 B (torch.linalg.solve, solve_triangular: A X = B, or X A = B with left=False): a
    # relevance-carrying system matrix is a divisor, held constant; X is linear in B, whose gradient
    # is then the rule
    if not carries(A):
        return NotImplemented
    return func(A.detach(), B, *args, **kwargs)


def _triangular_solve(mode, func, B, A, *args, **kwargs):
    # torch.triangular_solve(b, A): the right-hand side first
    return func(B, A.detach(), *args, **kwargs) if carries(A) else NotImplemented


def _held_constant(mode, func, *args, **kwargs):
    """A normaliser (``rsqrt``, ``reciprocal``, a norm, a variance): computed as torch does, its
    result held constant."""
    out = func(*args, **kwargs)
    if isinstance(out, (tuple, list)):
        return type(out)(o.detach() if isinstance(o, Tensor) else o for o in out)
    return out.detach()


def _identity(inplace: bool = False) -> Callable:
    """An element-wise function of one relevance carrier: the identity rule, ``g_x = g_y y / stab(x)``
    (``gi_identity``) with ``y`` computed by torch itself."""

    def handler(mode, func, input, *args, **kwargs):
        if not carries(input) or any(carries(a) for a in list(args) + list(kwargs.values())):
            return NotImplemented
        in_place = inplace or bool(kwargs.get("inplace", False))
        if "inplace" in kwargs:
            kwargs = dict(kwargs, inplace=False)
        with torch.no_grad():
            y = func(input.clone() if in_place else input, *args, **kwargs)
        if in_place:
            return input.copy_(torch.ops.lrpcpp.gi_identity(input.clone(), y, mode.epsilon))
        return torch.ops.lrpcpp.gi_identity(input, y, mode.epsilon)

    return handler


_IDENTITY_RULE = _identity()  # (one handler, called by the rules below and by identity_rule)


def identity_rule(mode, f: Callable, x: Tensor) -> Tensor:
    """``f(x)`` with the identity rule where ``x`` carries relevance (``f(x)`` itself otherwise): the
    rule of an element-wise function's call, for a rule made of several steps (recurrent.py)."""
    out = _IDENTITY_RULE(mode, f, x)
    return f(x) if out is NotImplemented else out


def _layer_norm(mode, func, input, normalized_shape, weight=None, bias=None, eps=1e-5, *args):
    if not carries(input) or carries(weight) or carries(bias):
        return NotImplemented
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    return torch.ops.lrpcpp.gi_layer_norm(input, shape, const(weight), const(bias), eps)


def _held_deviation(input, groups, weight, eps, out):
    """``out``, torch's value of a group (or instance) normalisation, with the gradient of
    ``(x - mean) / σ ⊙ w``: each group's standard deviation held constant, as ``gi_layer_norm`` does
    over its normalised dims. The added term is an exact zero, so the value stays torch's."""
    grouped = input.reshape(input.shape[0], groups, -1)
    with torch.no_grad():
        inv = torch.rsqrt(grouped.var(-1, unbiased=False, keepdim=True) + eps)
    lin = ((grouped - grouped.mean(-1, keepdim=True)) * inv).reshape(input.shape)
    if weight is not None:
        lin = lin * weight.reshape(1, -1, *([1] * (input.dim() - 2)))
    return with_gradient_of(out, lin)


def _group_norm(mode, func, input, num_groups, weight=None, bias=None, eps=1e-5, *args, **kwargs):
    # F.group_norm(input, num_groups, weight, bias, eps); torch.group_norm adds cudnn_enabled
    if not carries(input) or carries(weight) or carries(bias):
        return NotImplemented
    with torch.no_grad():
        out = func(input, num_groups, weight, bias, eps, *args, **kwargs)
    return _held_deviation(input, num_groups, const(weight), eps, out)


def _instance_norm(
    mode,
    func,
    input,
    running_mean=None,
    running_var=None,
    weight=None,
    bias=None,
    use_input_stats=True,
    momentum=0.1,
    eps=1e-5,
):
    # a group norm with one group per channel; with running statistics (use_input_stats=False) an
    # affine map, whose own gradient is the rule
    if not carries(input) or carries(weight) or carries(bias):
        return NotImplemented
    if not use_input_stats:
        return func(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    with torch.no_grad():
        out = func(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    return _held_deviation(input, input.shape[1], const(weight), eps, out)


def _rms_norm(mode, func, input, *args, **kwargs):
    # the identity rule over the whole normalisation, as for an RMSNorm module
    return _IDENTITY_RULE(mode, func, input, *args, **kwargs)


def _normalize(mode, func, input, p=2.0, dim=1, eps=1e-12, out=None):
    # x / max(||x||, eps), F.normalize's own formula, with the norm held constant
    if out is not None or not carries(input):
        return NotImplemented
    with torch.no_grad():
        denom = input.norm(p, dim, keepdim=True).clamp_min(eps).expand_as(input)
    return input / denom


def _cosine_similarity(mode, func, x1, x2, dim=1, eps=1e-8):
    # sum(x1 x2) / (||x1|| ||x2||), the norms held constant (normalisers) and the product of the two
    # split as any product's; the value is torch's own
    if not (carries(x1) or carries(x2)):
        return NotImplemented
    with torch.no_grad():
        out = func(x1, x2, dim, eps)
        n1, n2 = (x.norm(2, dim, keepdim=True).clamp_min(eps) for x in (x1, x2))
    a, b = products(mode, (x1, x2))
    lin = ((a / n1) * (b / n2)).sum(dim)
    return with_gradient_of(out, lin)


def _glu(mode, func, input, dim=-1):
    # a * sigmoid(b) of the two halves: the identity rule on the sigmoid (a gate), then the product's
    # rule; the value is torch's own
    if not carries(input):
        return NotImplemented
    with torch.no_grad():
        out = func(input, dim)
    a, b = input.chunk(2, dim)
    gate = identity_rule(mode, torch.sigmoid, b)
    mode.mark_gate(gate)
    lin = torch.mul(*products(mode, (a, gate)))
    return with_gradient_of(out, lin)


def _addcdiv(mode, func, input, tensor1, tensor2, *, value=1, out=None):
    # input + value * tensor1 / tensor2: a relevance-carrying divisor held constant (linear otherwise)
    if out is not None or not carries(tensor2):
        return NotImplemented
    return func(input, tensor1, tensor2.detach(), value=value)


def _lerp(mode, func, start, end, weight, *, out=None):
    # start + weight * (end - start): with a relevance-carrying weight, a product of the weight and the
    # difference (linear otherwise); the value is torch's own
    if out is not None or not carries(weight):
        return NotImplemented
    with torch.no_grad():
        value = func(start, end, weight)
    lin = start + torch.mul(*products(mode, (weight, end - start)))
    return with_gradient_of(value, lin)


def _prod(mode, func, input, *args, **kwargs):
    # a product of n carrying factors (along dim, or of all): each factor's gradient scaled by 1 / n,
    # the uniform rule of a product of two
    if not carries(input) or kwargs.get("out") is not None:
        return NotImplemented
    dim = args[0] if args else kwargs.get("dim")  # (dtype is keyword-only)
    n = input.numel() if dim is None else input.shape[dim]
    return func(mode.share(input, 1.0 / n) if n > 1 else input, *args, **kwargs)


def _cumprod(mode, func, input, *args, **kwargs):
    # y_j = x_0 ... x_j along dim, a product of j + 1 carrying factors: y_j's gradient scaled by
    # 1 / (j + 1), the uniform rule of a product for each output
    if not carries(input) or kwargs.get("out") is not None:
        return NotImplemented
    out = func(input, *args, **kwargs)
    dim = args[0] if args else kwargs["dim"]
    n = out.shape[dim] if out.dim() else 1
    if n == 1:
        return out
    # (made on the output's device, in share_scale's dtype: float32 for half precision)
    counts = torch.arange(1, n + 1, dtype=torch.promote_types(out.dtype, torch.float32), device=out.device)
    shape = [1] * out.dim()
    shape[dim] = n
    return torch.ops.lrpcpp.gi_grad_scale(out, counts.reciprocal().reshape(shape))


def _pow(mode, func, input, exponent, *args, **kwargs):
    # x ** c, a power of a carrier, and c ** x, an exponential of one: element-wise, the identity rule
    if isinstance(input, Tensor) and isinstance(exponent, (int, float)):
        return _IDENTITY_RULE(mode, func, input, exponent, *args, **kwargs)
    if isinstance(input, (int, float)) and isinstance(exponent, Tensor):
        return _IDENTITY_RULE(mode, lambda x: func(input, x, *args, **kwargs), exponent)
    return NotImplemented


def _without_relu(names: Tuple[str, ...]) -> Tuple[str, ...]:
    return tuple(n for n in names if n not in _GRADIENT_IS_IDENTITY)


def _table(*groups) -> dict:
    table: dict = {}
    for funcs, handler in groups:
        for f in funcs:
            table[f] = handler
    return table


_ACTIVATIONS: Tuple[str, ...] = (
    "silu",
    "gelu",
    "relu",
    "elu",
    "celu",
    "selu",
    "leaky_relu",
    "relu6",
    "hardtanh",
    "hardswish",
)
_ACTIVATIONS += ("hardsigmoid", "softplus", "mish", "tanh", "sigmoid", "logsigmoid", "tanhshrink", "softsign")
_ACTIVATIONS += ("prelu", "rrelu", "threshold", "hardshrink", "softshrink")
_ELEMENTWISE: Tuple[str, ...] = ("tanh", "sigmoid", "relu", "exp", "sqrt", "square")
_CLAMPS = ("clamp", "clip", "clamp_min", "clamp_max")  # (with constant bounds; see _clamp)
_ELEMENTWISE += _CLAMPS
# (erf: a GELU written out, x * (1 + erf(x / sqrt(2))) / 2, as ESM has it; the logarithms and the
# trigonometric and hyperbolic functions: periodic activations, log-scaled features)
_ELEMENTWISE += ("erf", "erfc", "expm1", "exp2", "log", "log1p", "log2", "log10")
_ELEMENTWISE += ("sin", "cos", "atan", "sinh", "asinh", "tan", "asin", "acos", "cosh", "acosh", "atanh", "sinc")
# (the logit, the inverse error function and the gamma function's logarithm and derivative; the
# fractional part and the remainders of a constant divisor)
_ELEMENTWISE += ("logit", "erfinv", "lgamma", "digamma", "frac", "fmod", "remainder", "__mod__")
# torch.special's spellings of them (expit: the sigmoid; psi: digamma; gammaln: lgamma)
_SPECIAL = _spellings(
    ["erf", "erfc", "erfinv", "expm1", "exp2", "log1p", "expit", "logit", "sinc", "psi", "digamma", "gammaln"],
    torch.special,
)
# relu's and abs's own gradients are the identity rule's gradient form exactly (relu(x) = relu'(x) x, 0
# where x <= 0; |x| = sign(x) x): they are in EXACT, not given the factor y / stab(x)
_GRADIENT_IS_IDENTITY = ("relu", "relu_", "abs", "absolute", "abs_", "absolute_")
_MUL = ("mul", "multiply", "__mul__", "__rmul__")
_MATMUL = ("matmul", "__matmul__", "bmm", "mm")
_GROUPED_MM = _spellings(["_grouped_mm"], torch) + _spellings(["grouped_mm"], F)
_DIV = ("div", "divide", "true_divide", "__truediv__", "__div__")
# (products of two operands, by other names; linalg.vecdot's is spelled below)
_PRODUCTS = ("tensordot", "bilinear", "cross", "outer", "ger", "kron", "mv", "dot", "vdot", "inner")
_AFFINE = ("addmm", "baddbmm", "addbmm", "addmv", "addr")  # beta * input + alpha * a product
_CHAINS = _spellings(["multi_dot"], torch.linalg) + _spellings(["chain_matmul"], torch)
_MATRIX_POWERS = _spellings(["matrix_power"], torch.linalg, torch, _T)
# (logsumexp: the log of a softmax's denominator, as in an attention sink's scale sigmoid(lse - sink))
# linear systems A X = B: the system matrix divides, as a matrix inverse (held constant, as reciprocal)
# does (torch.linalg.solve_triangular: a gated delta rule's chunk transform, as in LaraMini)
_SOLVES = _spellings(["solve", "solve_triangular"], torch.linalg)
_TRIANGULAR_SOLVE = _spellings(["triangular_solve"], torch, _T)  # (its right-hand side first)
_NORMALISERS: Tuple[str, ...] = ("rsqrt", "reciprocal", "norm", "var", "std", "var_mean", "std_mean", "logsumexp")
# (distances and hypotenuses are norms; logcumsumexp: running softmax denominators, logaddexp: one of two)
_NORMALISERS += ("cdist", "dist", "pairwise_distance", "hypot", "logcumsumexp", "logaddexp", "logaddexp2")
# step functions: their output is a constant of the input wherever it has a gradient (which is zero), so
# it carries no relevance (a sign times a magnitude: the magnitude takes all of the product's)
_STEPS = ("sign", "sgn", "round", "floor", "ceil", "trunc", "fix", "heaviside", "angle")

# Described where it is public, as lrpcpp.models.operations.RULES.
RULES: Mapping[Callable, Callable] = MappingProxyType(
    _table(
        # products of two relevance carriers: the gradient split (attnlrp) or the gate held (cp-lrp)
        (_spellings(_MUL + _MATMUL, torch, _T), _product),
        (_spellings(["__rmatmul__"], _T), lambda m, f, a, b: _product(m, f, a, b)),
        (_spellings(["mul_", "multiply_", "__imul__"], _T), inplace_form(_product, _T.mul)),
        (_spellings(_AFFINE, torch, _T), _affine_mm),
        (_spellings(["addcmul"], torch, _T), _addcmul),
        (_spellings(_PRODUCTS, torch, _T) + [F.bilinear, torch.linalg.cross, torch.linalg.vecdot], _product),
        (_CHAINS, _chain),
        (_MATRIX_POWERS, _matrix_power),
        ([F.glu, torch._C._nn.glu], _glu),
        # torch's fused recurrent layers and cells, step by step (recurrent.py)
        *(([f], handler) for f, handler in RECURRENT.items()),
        (_spellings(["addcdiv"], torch, _T), _addcdiv),
        (_spellings(["lerp"], torch, _T), _lerp),
        (_GROUPED_MM, _grouped_mm),
        ([torch.einsum], _einsum),
        ([F.scaled_dot_product_attention], _sdpa),
        # normalisers: a relevance-carrying divisor, rsqrt, reciprocal, norms: held constant
        (_spellings(_DIV, torch, _T), _div),
        (_spellings(["div_", "divide_", "true_divide_", "__itruediv__", "__idiv__"], _T), _div),
        (_spellings(["__rdiv__", "__rtruediv__"], _T), _rdiv),
        (_spellings(_NORMALISERS, torch, _T) + [F.pairwise_distance], _held_constant),
        ([torch.linalg.norm, torch.linalg.vector_norm], _held_constant),
        (_spellings(_STEPS, torch, _T), _held_constant),
        ([F.cosine_similarity, torch.cosine_similarity], _cosine_similarity),
        (_spellings(["prod"], torch, _T), _prod),
        (_spellings(["cumprod"], torch, _T), _cumprod),
        (_spellings(["inv"], torch.linalg) + _spellings(["inverse"], torch, _T), _held_constant),  # 1 / A
        ([F.normalize], _normalize),
        (_SOLVES, _solve),
        (_TRIANGULAR_SOLVE, _triangular_solve),
        ([F.layer_norm, torch.layer_norm], _layer_norm),
        ([F.group_norm, torch.group_norm], _group_norm),
        ([F.instance_norm], _instance_norm),
        ([F.rms_norm, torch.rms_norm], _rms_norm),
        # element-wise functions of one carrier: the identity rule (relu's gradient is it: EXACT)
        (_spellings(_without_relu(_ACTIVATIONS), F), _IDENTITY_RULE),
        (_spellings(_without_relu(_ELEMENTWISE), torch, _T) + _SPECIAL, _IDENTITY_RULE),
        (_spellings(["pow", "__pow__"], torch, _T), _pow),
        (_spellings(_CLAMPS, torch, _T), _clamp),  # (after the element-wise functions: bounds may carry)
        (_spellings(["elu_", "leaky_relu_", "hardtanh_"], F, torch), _identity(inplace=True)),
        (_spellings([n + "_" for n in _without_relu(_ELEMENTWISE)], _T), _identity(inplace=True)),
        (_spellings(["scatter_reduce"], torch, _T), _scatter_reduce),
        (_spellings(["grid_sampler"], torch), _grid_sample),  # (F.grid_sample's body calls it)
        (_spellings(["embedding_bag"], torch), _embedding_bag),
        ([F.embedding_bag], _functional_embedding_bag),
        (_spellings(["renorm"], torch, _T), _renorm),
    )
)

# Element-wise functions of one carrier (the identity rule). A custom autograd.Function whose forward
# returns the result of one of them on its relevance-carrying input gets that rule too (mode.py).
ELEMENTWISE = frozenset(
    _spellings(_without_relu(_ACTIVATIONS), F)
    + _spellings(_without_relu(_ELEMENTWISE) + ("pow",), torch, _T)
    + _SPECIAL
    + _spellings(_GRADIENT_IS_IDENTITY, F, torch, _T)
)

# Linear maps, additions, reductions by summation, softmax, selection, masking and reshaping: their
# ordinary gradient is the gradient-mode rule (with a product or a division, when only one factor,
# or only the numerator, carries relevance). Described where it is public, as
# lrpcpp.models.operations.EXACT.
_LINEAR: Tuple[str, ...] = ("add", "sub", "subtract", "rsub", "neg", "negative", "sum", "mean", "cumsum", "nansum")
_LINEAR += ("nanmean", "cumsum_", "complex")  # (complex(a, b) = a + ib)
_LINEAR += ("softmax", "log_softmax", "index_add", "scatter_add", "conv1d", "conv2d", "conv3d", "sum_to_size")
# (the other products, addcdiv divides, lerp weighs: linear where their rule declines, with one
# factor, no divisor, no weight carrying relevance; the trapezoidal rule sums)
_LINEAR += ("diff", "addcdiv", "lerp", "trapezoid", "trapz", "cumulative_trapezoid") + _PRODUCTS
_INPLACE: Tuple[str, ...] = (
    "add_",
    "sub_",
    "subtract_",
    "neg_",
    "__iadd__",
    "__isub__",
    "__neg__",
    "__add__",
    "__radd__",
)
_INPLACE += ("__sub__", "__rsub__", "index_add_", "scatter_add_", "__setitem__", "index_put", "index_put_")
_INPLACE += ("masked_scatter", "masked_scatter_", "fill_", "zero_")
_FUNCTIONAL: Tuple[str, ...] = (
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
)
_FUNCTIONAL += ("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d")
_FUNCTIONAL += ("adaptive_avg_pool3d", "batch_norm", "softmax", "log_softmax", "interpolate", "embedding", "pad")
# more rearrangements, each output value a copy of one input value (so a gate stays one through them):
# a strided view of windows (Longformer's chunks), sliding windows (Tensor.unfold; F.unfold, which
# calls im2col: ConvBERT's span convolution), the parts of a complex tensor (FNet's Fourier mixing
# keeps .real; the attributes are seen as their getters: the descriptors themselves are no table's
# keys, since torch.compile cannot compare them); F.fold (col2im) sums the windows back, a linear map
_WINDOWS = _spellings(["as_strided", "real", "imag"], torch) + _spellings(["as_strided", "unfold"], _T)
_WINDOWS += _spellings(["unfold"], F) + _spellings(["im2col"], torch._C._nn)
_WINDOWS += [getattr(_T, n).__get__ for n in ("real", "imag")]
# and selections and permutations like max and min's: sorting, the k-th value and the median, running
# maxima, a masked selection, a copy of a slice, finite values kept, pixels shuffled into channels
_SELECTIONS: Tuple[str, ...] = ("sort", "msort", "kthvalue", "median", "nanmedian", "cummax", "cummin")
# (a quantile weighs the two order statistics around it by constants; copysign puts a step's sign
# on a magnitude, which takes all of the relevance, as a product of a sign and a value does)
_SELECTIONS += ("masked_select", "quantile", "nanquantile", "copysign", "aminmax")
_SELECTIONS += ("narrow_copy", "nan_to_num", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle")
_SELECTIONS += ("_pack_padded_sequence", "_pad_packed_sequence")  # (a recurrent layer's packed input)
_WINDOWS += _spellings(_SELECTIONS, torch, _T) + _spellings(["pixel_shuffle", "pixel_unshuffle"], F)
_SUMMED_BACK = _spellings(["fold"], F) + _spellings(["col2im"], torch._C._nn)
# the discrete Fourier transforms are linear maps (Mega's FFT convolutions: rfft, a product with the
# transformed kernel, irfft)
_FFT = _spellings(
    [p + n for n in ("fft", "fft2", "fftn") for p in ("", "i", "r", "ir")] + ["hfft", "ihfft", "fftshift", "ifftshift"],
    torch.fft,
)
EXACT = frozenset(
    list(PASS_THROUGH)
    + list(DROPOUT)
    + _spellings(_LINEAR + _MUL + _MATMUL + _DIV + _AFFINE + ("addcmul",), torch, _T)
    + _spellings(_INPLACE + ("mul_", "multiply_", "__imul__", "div_", "divide_", "__itruediv__"), _T)
    + _spellings(["__rmatmul__", "__rdiv__", "__rtruediv__"], _T)
    + _spellings(_FUNCTIONAL, F)
    + [torch.einsum, F.scaled_dot_product_attention, F.bilinear, torch.linalg.cross, torch.linalg.vecdot]
    + _CHAINS
    + _GROUPED_MM
    + _FFT
    + _WINDOWS
    + _SUMMED_BACK
    + _SOLVES
    + _TRIANGULAR_SOLVE
    + _spellings(_GRADIENT_IS_IDENTITY, F, torch, _T)
)

# Functions whose output is a gate: CP-LRP holds it constant where it meets another carrier in a
# product (attention weights; activation outputs, as in a gated MLP's act(gate) * up).
GATES = frozenset(
    _spellings(("softmax",), torch, _T, F)
    + _spellings(_ACTIVATIONS, F)
    + _spellings(("tanh", "sigmoid", "relu"), torch, _T)
    + _spellings(["expit"], torch.special)
)

# Functions whose output is no gate, whatever their input: a top-k selection picks a mixture of
# experts' routes, and the routing weights it returns multiply the experts' outputs in a product
# that RULES.md section 4 splits uniformly under either method (CP-LRP holds no routing weight).
ROUTING = frozenset(_spellings(("topk",), torch, _T))

# Functions through which a gate stays a gate: casts, views, windows, selections other than top-k, and
# dropout (not linear maps or sums, whose output mixes the gate with other values, such as a scan over
# an activation's output).
KEEPS_GATE = frozenset(list(PASS_THROUGH) + list(DROPOUT) + _WINDOWS) - ROUTING

__all__ = ["RULES", "EXACT", "ELEMENTWISE", "GATES", "KEEPS_GATE", "ROUTING"]

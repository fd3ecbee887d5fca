"""Float64 transcriptions of the rules in RULES.md, in plain PyTorch.

Each function takes the op's inputs and the relevance ``R`` arriving at its
output and returns the relevance of the inputs, computed straight from the
formula (no autograd, no lrpcpp). Tests compare lrpcpp's relevance with these.
"""

import torch
import torch.nn.functional as F


def stab(z, eps):
    """z + eps * sign(z), sign(0) = +1."""
    return z + eps * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def sum_to(t, shape):
    """Sum a broadcast tensor back to `shape` (torch's broadcasting rules)."""
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead > 0 else t
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def linear_epsilon(x, w, b, R, eps, y=None):
    # z_ij = x_i w_ji; R_i = sum_j z_ij / stab(y_j) R_j   (Eq. 8); y: the op's own output when given
    y = x @ w.T + (b if b is not None else 0) if y is None else y
    z = x.unsqueeze(-2) * w  # [..., out, in]
    return (z * (R / stab(y, eps)).unsqueeze(-1)).sum(-2)


def conv2d_epsilon(x, w, b, R, stride, padding, dilation, eps, y=None):
    """Matrix form through unfold (groups = 1): each output pixel is a linear map of one patch."""
    n, c, h, wd = x.shape
    kh, kw = w.shape[-2:]
    y = F.conv2d(x, w, b, stride, padding, dilation) if y is None else y
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [n, c*kh*kw, L]
    wm = w.reshape(w.shape[0], -1)  # [out, c*kh*kw]
    rn = (R / stab(y, eps)).reshape(n, w.shape[0], -1)  # [n, out, L]
    r_cols = cols * torch.einsum("oi,nol->nil", wm, rn)
    return F.fold(r_cols, (h, wd), (kh, kw), dilation=dilation, padding=padding, stride=stride)


def add2(a, b, R, eps):
    y = a + b
    rn = R / stab(y, eps)
    return sum_to(a * rn, a.shape), sum_to(b * rn, b.shape)


def mul2(a, b, R, a_relevant=True, b_relevant=True):
    share = 0.5 if (a_relevant and b_relevant) else 1.0
    return (sum_to(R * share, a.shape) if a_relevant else None, sum_to(R * share, b.shape) if b_relevant else None)


def matmul(a, b, R, eps, a_relevant=True, b_relevant=True, o=None):
    # O_ij = sum_k a_ik b_kj: each term a_ik b_kj, split in two when both operands take relevance
    both = a_relevant and b_relevant
    o = a @ b if o is None else o
    rn = R / stab((2.0 if both else 1.0) * o, eps)
    shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    ae = a.expand(*shape, *a.shape[-2:])
    be = b.expand(*shape, *b.shape[-2:])
    terms = ae.unsqueeze(-1) * be.unsqueeze(-3)  # [..., i, k, j]
    per_term = terms * rn.unsqueeze(-2)
    ra = sum_to(per_term.sum(-1), a.shape) if a_relevant else None
    rb = sum_to(per_term.sum(-3), b.shape) if b_relevant else None
    return ra, rb


def softmax(x, R, dim, temperature=1.0, s=None):
    """`s`: the op's own output when given (a weight that rounds to 0 in a low-precision dtype masks
    the logit, as the rule does), else the float64 softmax."""
    s = torch.softmax(x / temperature, dim) if s is None else s
    # masked logits take x' = 0: -inf, and finite mask values whose softmax weight is exactly 0
    xp = torch.where((x == float("-inf")) | (s == 0), torch.zeros_like(x), x / temperature)
    return xp * (R - s * R.sum(dim, keepdim=True))


def layer_norm(x, normalized_shape, w, b, eps, R, epsilon):
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    mu = x.mean(dims, keepdim=True)
    sigma = torch.sqrt(((x - mu) ** 2).mean(dims, keepdim=True) + eps)
    w = w if w is not None else torch.ones(normalized_shape, dtype=x.dtype)
    y = (x - mu) / sigma * w + (b if b is not None else 0)
    h = w / sigma * (R / stab(y, epsilon))
    return x * (h - h.mean(dims, keepdim=True))


def mean(x, dims, keepdim, R, eps):
    dims = tuple(range(x.dim())) if not dims else tuple(d % x.dim() for d in dims)
    s = x.sum(dims, keepdim=True)
    r = R
    if not keepdim:
        for d in sorted(dims):
            r = r.unsqueeze(d)
    return x * r / stab(s, eps)


def identity(x, R):
    return R.to(x.dtype)


def rms_norm_hf(x, w, eps):
    """The LLaMA-style RMSNorm forward: fp32 arithmetic, cast back before the weight."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y * w if w is not None else y


# ----------------------------------------------------------------------------- gradient-times-input
# RULES.md section 2: autograd carries g = R / x. These return the gradient g_x of an input from
# the gradient g arriving at the op's output; the relevance is then x * g_x.


def gi_identity(x, y, g, eps, max_factor=None):
    """Identity rule for y = f(x) element-wise: g_x = g * y / stab(x); the factor y / stab(x)
    clamped to [-max_factor, max_factor] when given (the storage type's finite range)."""
    factor = y / stab(x, eps)
    if max_factor is not None:
        factor = factor.clamp(-max_factor, max_factor)
    return g * factor


def gi_grad_scale(g, scale):
    return g * scale


def gi_layer_norm(x, normalized_shape, w, g, eps):
    """sigma detached: g_x = rstd * (h - mean(h)), h = g * w, the mean over the normalised dims."""
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    mu = x.mean(dims, keepdim=True)
    rstd = 1.0 / torch.sqrt(((x - mu) ** 2).mean(dims, keepdim=True) + eps)
    h = g * (w if w is not None else 1.0)
    return rstd * (h - h.mean(dims, keepdim=True))


# ----------------------------------------------------------------------------- vision rules
# RULES.md section 3, written out term by term: for z_j = sum_i x_i w_ij + b_j each rule names a
# numerator n_ij per input and output, and R_i = sum_j n_ij / stab(sum_i n_ij) R_j. `mask` marks the
# real inputs of each output (0 where a convolution's zero padding stands); x, lower and upper are
# [..., in], w is [out, in].


def _pos(v):
    return v.clamp(min=0)


def _neg(v):
    return v.clamp(max=0)


def _share(num, den, R, eps):
    # num [..., out, in], den [..., out], R [..., out] -> [..., in]
    return (num * (R / stab(den, eps)).unsqueeze(-1)).sum(-2)


def vision_rule(
    rule, x, w, b, R, eps, mask=None, gamma=0.25, alpha=2.0, beta=1.0, lower=None, upper=None, bias="ignore"
):
    """The relevance of x by one rule of RULES.md section 3 (float64, straight from the formula).
    ``bias="denominator"`` (alpha-beta, z-plus, w-square): zennit's convention, b+ joins the sum of the
    positive terms and b- that of the negative ones (w-square: b**2 joins the denominator); "ignore"
    leaves the bias out."""
    counted = bias == "denominator" and b is not None
    xi = x.unsqueeze(-2)  # [..., 1, in]
    mask = torch.ones_like(x).unsqueeze(-2) if mask is None else mask.unsqueeze(-2)
    if rule == "gamma":
        # z_j >= 0: x+ (W + g W+) + x- (W + g W-); z_j < 0: x+ (W + g W-) + x- (W + g W+);
        # the bias is the weight of a constant input +1: b + g b+ (positive outputs), b + g b- (negative)
        z = x @ w.T + (b if b is not None else 0)
        up, down = w + gamma * _pos(w), w + gamma * _neg(w)
        num_p = _pos(xi) * up + _neg(xi) * down
        num_n = _pos(xi) * down + _neg(xi) * up
        bias_p = 0 if b is None else b + gamma * _pos(b)
        bias_n = 0 if b is None else b + gamma * _neg(b)
        pos = (z >= 0).unsqueeze(-1)
        num = torch.where(pos, num_p, num_n)
        den = torch.where(z >= 0, num_p.sum(-1) + bias_p, num_n.sum(-1) + bias_n)
        return _share(num, den, R, eps)
    if rule == "z_plus":  # z-plus is alpha = 1, beta = 0
        rule, alpha, beta = "alpha_beta", 1.0, 0.0
    if rule == "alpha_beta":
        terms = xi * w
        tp, tn = _pos(terms), _neg(terms)
        den_p = tp.sum(-1) + (_pos(b) if counted else 0)
        den_n = tn.sum(-1) + (_neg(b) if counted else 0)
        rel = alpha * _share(tp, den_p, R, eps)
        return rel - beta * _share(tn, den_n, R, eps) if beta else rel
    if rule == "z_box":
        num = xi * w - lower.unsqueeze(-2) * _pos(w) - upper.unsqueeze(-2) * _neg(w)
    elif rule == "flat":
        num = torch.ones_like(xi * w) * mask
    elif rule == "w_square":
        num = (w * w) * mask
        return _share(num, num.sum(-1) + (b * b if counted else 0), R, eps)
    else:
        raise ValueError(rule)
    return _share(num, num.sum(-1), R, eps)


def conv2d_vision_rule(rule, x, w, b, R, stride, padding, dilation, eps, lower=None, upper=None, **params):
    """vision_rule over a convolution (groups = 1): each output pixel is a linear map of one patch;
    the patches' relevance is folded back (summing overlaps). Padding is no input: its numerators
    are 0 (zero x and bounds, and a zero mask for the input-free rules)."""
    n, c, h, wd = x.shape
    kh, kw = w.shape[-2:]

    def patches(t):  # [n, c, h, w] -> [n, L, c*kh*kw]
        t = t.expand(n, c, h, wd) if t.dim() == 4 else t.expand(x.shape)
        return F.unfold(t, (kh, kw), dilation=dilation, padding=padding, stride=stride).transpose(1, 2)

    cols = patches(x)
    mask = patches(torch.ones_like(x))
    lo = patches(torch.as_tensor(lower, dtype=x.dtype).expand(x.shape)) if lower is not None else None
    hi = patches(torch.as_tensor(upper, dtype=x.dtype).expand(x.shape)) if upper is not None else None
    wm = w.reshape(w.shape[0], -1)
    r = R.reshape(n, w.shape[0], -1).transpose(1, 2)  # [n, L, out]
    rel = vision_rule(rule, cols, wm, b, r, eps, mask=mask, lower=lo, upper=hi, **params)  # [n, L, c*kh*kw]
    return F.fold(rel.transpose(1, 2), (h, wd), (kh, kw), dilation=dilation, padding=padding, stride=stride)


def linear_map_epsilon(f, x, R, eps):
    """The epsilon rule over a map f linear in x (a pooling), from its matrix M (the images of the unit
    tensors): R_x = x * ((R / stab(f(x))) M)."""
    n_in = x.numel()
    basis = torch.eye(n_in, dtype=x.dtype).reshape(n_in, *x.shape)
    matrix = torch.stack([f(b).reshape(-1) for b in basis], 1)  # [out, in]
    y = (matrix @ x.reshape(-1)).reshape(R.shape)
    return x * ((R / stab(y, eps)).reshape(1, -1) @ matrix).reshape(x.shape)


def winner_takes_all(x, R, indices, n):
    """Max pooling's rule over n spatial dimensions: each window's relevance R goes to its maximum, the
    input at ``indices`` (torch's flat index into the spatial plane of each sample and channel)."""
    lead = x.shape[: x.dim() - n]
    flat = torch.zeros(*lead, x.shape[x.dim() - n :].numel(), dtype=R.dtype)
    flat.scatter_add_(-1, indices.reshape(*lead, -1), R.reshape(*lead, -1))
    return flat.reshape(x.shape)

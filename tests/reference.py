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
    return (sum_to(R * share, a.shape) if a_relevant else None,
            sum_to(R * share, b.shape) if b_relevant else None)


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


def softmax(x, R, dim, temperature=1.0):
    s = torch.softmax(x / temperature, dim)
    xp = torch.where(x == float("-inf"), torch.zeros_like(x), x / temperature)
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

"""A hand-written float64 AttnLRP reference of the classifier in functional_model.py, from RULES.md
(sections 2 and 4), in gradient-times-input form: the forward pass written out op by op from the
model's parameters, then the backward pass written out op by op, carrying ``g = R / x``; the
relevance of the input embeddings is ``e * g_e``. No autograd and no lrpcpp.

Rules (``rules="attnlrp"``):
* linear layers, residual adds, the residual scalars (constants), rotary embedding (cos/sin carry
  no relevance), the scale 1/sqrt(d) and the mask: their own gradient (ε-rule with ε = 0);
* ``F.rms_norm``: identity rule, i.e. the normaliser rsqrt(mean(x²) + eps) held constant;
* ``relu(x)²``: identity rule, ``g_x = g_y · f(x) / stab(x)`` with ε = 1e-10;
* ``q kᵀ`` and ``A v``: products of two relevant tensors, each operand gets half (uniform), so q and
  k get a quarter of their gradient and v half of its own;
* softmax: the AttnLRP rule (Prop. 3.1), which in this form is the softmax's own gradient;
* mean pooling over the unmasked tokens: the denominator (the number of tokens) is a constant;
* LayerNorm: σ held constant (the ε-rule on the rest, with ε = 0).

``rules="cp"``: CP-LRP, q and k carry nothing (the attention weights are constants, v gets all).
``rules="gradient"``: every rule switched to the plain gradient: the result must then be autograd's
gradient times input (a check of the transcription itself)."""

import math

import torch
from reference import stab

IDENTITY_EPS = 1e-10


def _rms(x):
    """(x * r, r): the forward of F.rms_norm without weight, with its eps (the dtype's)."""
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)
    return x * r, r


def _rms_back(x, r, g, rules):
    """rms_norm backward: r held constant (identity rule), or the full gradient."""
    if rules != "gradient":
        return g * r
    return r * g - x * r**3 * (g * x).mean(-1, keepdim=True)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def _rope_back(g, cos, sin):
    """The transpose of the rotation (cos/sin constants)."""
    half = g.shape[-1] // 2
    g1, g2 = g[..., :half], g[..., half:]
    return torch.cat([g1 * cos - g2 * sin, g1 * sin + g2 * cos], dim=-1)


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    rstd = 1.0 / torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    return xc * rstd * w + b, xc, rstd


def _layer_norm_back(xc, rstd, w, g, rules):
    h = g * w
    if rules != "gradient":  # sigma constant: the gradient of (x - mean(x)) * rstd
        return rstd * (h - h.mean(-1, keepdim=True))
    xhat = xc * rstd
    return rstd * (h - h.mean(-1, keepdim=True) - xhat * (h * xhat).mean(-1, keepdim=True))


def _linear(x, lin):
    return x @ lin.weight.T + lin.bias


def relevance(model, input_ids, attention_mask, target, rules="attnlrp", identity_eps=IDENTITY_EPS):
    """(relevance of the input embeddings [batch, seq, dim], the explained logits [batch]) of the
    class ``target`` (an int), under ``rules`` ("attnlrp", "cp" or "gradient"); ``identity_eps``: the
    stabiliser of the identity rule."""
    assert rules in ("attnlrp", "cp", "gradient")
    with torch.no_grad():
        return _relevance(model, input_ids, attention_mask, target, rules, identity_eps)


def _relevance(model, input_ids, attention_mask, target, rules, identity_eps):
    b, s = input_ids.shape
    heads, hd = model.blocks[0].attn.heads, model.blocks[0].attn.head_dim
    d = heads * hd
    e = model.tok.weight[input_ids]  # the input embeddings, whose relevance is explained
    keep = attention_mask.bool()
    m = attention_mask.to(e.dtype)[..., None]  # [b, s, 1]
    bias = torch.zeros(b, 1, 1, s, dtype=e.dtype).masked_fill(~keep[:, None, None, :], float("-inf"))
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=e.dtype) / hd)
    angles = torch.arange(s, dtype=e.dtype)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()

    def heads_of(t):  # [b, s, d] -> [b, h, s, hd]
        return t.view(b, s, heads, hd).transpose(1, 2)

    # ---------------------------------------------------------------- forward, keeping what the backward needs
    x, r0 = _rms(e)
    saved = []
    for block in model.blocks:
        att = block.attn
        f = {"x": x}
        f["xa"], f["ra"] = _rms(x)
        q, k, v = (heads_of(_linear(f["xa"], lin)) for lin in (att.c_q, att.c_k, att.c_v))
        f["v"] = v
        f["qr"], f["kr"] = _rope(q, cos, sin), _rope(k, cos, sin)
        f["qn"], f["rq"] = _rms(f["qr"])
        f["kn"], f["rk"] = _rms(f["kr"])
        scores = f["qn"] @ f["kn"].transpose(-1, -2) / math.sqrt(hd) + bias
        f["A"] = torch.softmax(scores, dim=-1)
        o = (f["A"] @ v).transpose(1, 2).reshape(b, s, d)
        x1 = x + block.attn_scale * _linear(o, att.c_proj)
        f["x1"] = x1
        f["xm"], f["rm"] = _rms(x1)
        f["hidden"] = _linear(f["xm"], block.mlp.c_fc)
        act = torch.relu(f["hidden"]).square()
        f["act"] = act
        x = x1 + block.mlp_scale * _linear(act, block.mlp.c_proj)
        saved.append(f)
    count = m.sum(dim=1)  # [b, 1], a constant
    pooled = (x * m).sum(dim=1) / count
    ln = model.norm
    z, xc, rstd = _layer_norm(pooled, ln.weight, ln.bias, ln.eps)
    logits = _linear(z, model.head)

    # ---------------------------------------------------------------- backward, g = R / x
    g_z = model.head.weight[target].expand(b, d)  # seed 1 on the target logit
    g_pooled = _layer_norm_back(xc, rstd, ln.weight, g_z, rules)
    g_x = g_pooled[:, None, :] * m / count[:, None, :]
    for block, f in zip(reversed(model.blocks), reversed(saved)):
        att = block.attn
        # x = x1 + mlp_scale * mlp(rms(x1))
        g_act = (block.mlp_scale * g_x) @ block.mlp.c_proj.weight
        h = f["hidden"]
        if rules == "gradient":
            g_hidden = g_act * 2 * torch.relu(h)
        else:  # identity rule on relu(x)^2
            g_hidden = g_act * f["act"] / stab(h, identity_eps)
        g_xm = g_hidden @ block.mlp.c_fc.weight
        g_x1 = g_x + _rms_back(f["x1"], f["rm"], g_xm, rules)
        # x1 = x + attn_scale * c_proj(A v)
        g_o = (block.attn_scale * g_x1) @ att.c_proj.weight
        g_o = heads_of(g_o)
        g_A = g_o @ f["v"].transpose(-1, -2)
        g_v = f["A"].transpose(-1, -2) @ g_o
        if rules == "attnlrp":  # A v: uniform, half each
            g_A, g_v = g_A / 2, g_v / 2
        elif rules == "cp":  # the attention weights are constants: v gets all
            g_A = torch.zeros_like(g_A)
        A = f["A"]
        g_scores = A * (g_A - (A * g_A).sum(-1, keepdim=True)) / math.sqrt(hd)  # softmax, then the scale
        g_qn = g_scores @ f["kn"]
        g_kn = g_scores.transpose(-1, -2) @ f["qn"]
        if rules == "attnlrp":  # q k^T: uniform, half each
            g_qn, g_kn = g_qn / 2, g_kn / 2
        g_q = _rope_back(_rms_back(f["qr"], f["rq"], g_qn, rules), cos, sin)
        g_k = _rope_back(_rms_back(f["kr"], f["rk"], g_kn, rules), cos, sin)

        def flat(t):
            return t.transpose(1, 2).reshape(b, s, d)

        g_xa = flat(g_q) @ att.c_q.weight + flat(g_k) @ att.c_k.weight + flat(g_v) @ att.c_v.weight
        g_x = g_x1 + _rms_back(f["x"], f["ra"], g_xa, rules)
    g_e = _rms_back(e, r0, g_x, rules)
    return e * g_e, logits[:, target]

"""``nn.MultiheadAttention.forward`` under the layer rules of a preset: its packed input
projection and its output projection each take their rule, the attention itself is
``F.scaled_dot_product_attention`` (or, when the weights are requested, the explicit softmax), so
the patch's treatment of attention applies."""

from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..rules import Rule, weight_transforms
from .families import UnsupportedModelError

__all__ = ["mha_forward", "check_mha"]


def _rows(t, rows: slice):
    if t is None:
        return None
    return tuple(u[rows] for u in t) if isinstance(t, tuple) else t[rows]


def mha_forward(mha: nn.MultiheadAttention, in_rule: Optional[Rule], out_rule: Optional[Rule], gi: bool) -> Callable:
    """``nn.MultiheadAttention.forward`` (packed input projection) with the rules on its input and
    output projections. The attention itself is ``F.scaled_dot_product_attention`` (or, when the
    weights are requested, the explicit softmax), so the patch's treatment of attention applies."""

    def project(rule: Optional[Rule], x: Tensor, rows: slice, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        w = weight[rows]
        b = None if bias is None else bias[rows]
        if rule is None:  # the patch's own treatment of a linear map
            return F.linear(x, w, b)
        return rule.linear(x, w, b, _rows(weight_transforms(rule, weight), rows), gi)

    def forward(
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif mha.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # [seq, batch, embed] from here on
        e, h = mha.embed_dim, mha.num_heads
        d = e // h
        tgt, bsz = query.shape[0], query.shape[1]
        src = key.shape[0]
        q = project(in_rule, query, slice(0, e), mha.in_proj_weight, mha.in_proj_bias)
        k = project(in_rule, key, slice(e, 2 * e), mha.in_proj_weight, mha.in_proj_bias)
        v = project(in_rule, value, slice(2 * e, 3 * e), mha.in_proj_weight, mha.in_proj_bias)
        q = q.reshape(tgt, bsz * h, d).transpose(0, 1).reshape(bsz, h, tgt, d)
        k = k.reshape(src, bsz * h, d).transpose(0, 1).reshape(bsz, h, src, d)
        v = v.reshape(src, bsz * h, d).transpose(0, 1).reshape(bsz, h, src, d)
        mask = _additive_mask(attn_mask, key_padding_mask, bsz, h, tgt, src, q.dtype, q.device)
        if need_weights:
            scores = torch.matmul(q, k.transpose(-2, -1)) / (d**0.5)
            if mask is not None:
                scores = scores + mask
            if is_causal and mask is None:
                causal = torch.ones(tgt, src, dtype=torch.bool, device=q.device).tril()
                scores = scores.masked_fill(~causal, float("-inf"))
            weights = torch.softmax(scores, dim=-1)
            out = torch.matmul(weights, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
            weights = None
        out = out.permute(2, 0, 1, 3).reshape(tgt, bsz, e)
        out = project(out_rule, out, slice(0, e), mha.out_proj.weight, mha.out_proj.bias)
        if not batched:
            out = out.squeeze(1)
        elif mha.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            weights = weights.detach()
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    return forward


def _additive_mask(attn_mask, key_padding_mask, bsz, h, tgt, src, dtype, device) -> Optional[Tensor]:
    """nn.MultiheadAttention's masks (True or -inf = not attended) as one additive float mask."""
    mask = None

    def as_float(m: Tensor) -> Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    if attn_mask is not None:
        m = as_float(attn_mask)
        mask = m.reshape(bsz, h, tgt, src) if m.dim() == 3 else m
    if key_padding_mask is not None:
        kp = as_float(key_padding_mask).reshape(bsz, 1, 1, src)
        mask = kp if mask is None else mask + kp
    return mask


def check_mha(name: str, mha: nn.MultiheadAttention) -> None:
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn or mha.dropout:
        raise UnsupportedModelError(
            f"lrpcpp: the layer rules of a preset support nn.MultiheadAttention with one packed input "
            f"projection, no bias_k/bias_v, no add_zero_attn and no dropout; {name} has another configuration "
            f"(override it with rules={{'{name}.in_proj': None, '{name}.out_proj': None}} to keep its projections "
            "as they are)"
        )

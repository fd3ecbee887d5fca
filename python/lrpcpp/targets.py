"""Explainable scalar targets built from a model's output, for ``lrpcpp.attribute(target=...)``.

They are written so that the same code is right in both semantics: the ordinary gradient of what
they compute is the gradient-times-input rule, and under :class:`lrpcpp.ExplicitRules` every
operation they use maps to its explicit rule.
"""

from typing import Optional

from torch import Tensor

__all__ = ["mean_pooling", "cosine_similarity"]


def mean_pooling(hidden: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """The mean of ``hidden`` (``[batch, seq, dim]``) over the unmasked positions: ``[batch, dim]``.

    This is how sentence-transformers models such as all-MiniLM-L6-v2 turn token states into one
    sentence embedding. The mask and the token count are constants.
    """
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def cosine_similarity(a: Tensor, b: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """``cos(a, b)`` along ``dim``, explained as a product of two relevance-carrying vectors.

    The norms are held constant (the cosine is then bilinear in ``a`` and ``b``) and the relevance of
    the product is split evenly between ``a`` and ``b``: the value is computed as
    ``(<â, b̂ₒ> + <âₒ, b̂>) / 2``, where ``ₒ`` marks a tensor held constant; both halves equal the cosine.
    """
    a_unit = a / a.norm(dim=dim, keepdim=True).detach().clamp(min=eps)
    b_unit = b / b.norm(dim=dim, keepdim=True).detach().clamp(min=eps)
    return 0.5 * ((a_unit * b_unit.detach()).sum(dim=dim) + (a_unit.detach() * b_unit).sum(dim=dim))

"""The torch functions that pass relevance on unchanged: :data:`PASS_THROUGH`, whose ordinary
gradient is the exact relevance rule, and :data:`DROPOUT`, which is off."""

import torch
from torch import Tensor
from torch.nn import functional as F

# Dropout is off (RULES.md section 4), whatever the training flag: the input is returned unchanged,
# so the forward value is the eval-mode one and the relevance passes through as it is.
DROPOUT = frozenset(
    {
        F.dropout,
        F.dropout1d,
        F.dropout2d,
        F.dropout3d,
        F.alpha_dropout,
        F.feature_alpha_dropout,
        torch.dropout,
        torch.dropout_,
        torch.feature_dropout,
        torch.feature_dropout_,
        torch.alpha_dropout,
        torch.alpha_dropout_,
        torch.feature_alpha_dropout,
        torch.feature_alpha_dropout_,
    }
)

_PASS_TENSOR_METHODS = (
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "transpose",
    "t",
    "permute",
    "movedim",
    "moveaxis",
    "swapaxes",
    "swapdims",
    "expand",
    "expand_as",
    "broadcast_to",
    "contiguous",
    "clone",
    "to",
    "type",
    "type_as",
    "float",
    "double",
    "half",
    "bfloat16",
    "__getitem__",
    "select",
    "narrow",
    "index_select",
    "gather",
    "take_along_dim",
    "masked_fill",
    "masked_fill_",
    "where",
    "split",
    "split_with_sizes",
    "tensor_split",
    "chunk",
    "unbind",
    "repeat",
    "repeat_interleave",
    "tile",
    "roll",
    "flip",
    "tril",
    "triu",
    "diagonal",
    "copy_",
    "requires_grad_",
    "topk",
    # placements: a carrier's values written where an index says (a router's scores scattered over
    # the experts)
    "scatter",
    "scatter_",
    "index_copy",
    "index_copy_",
    "masked_scatter",
    "masked_scatter_",
    # selections, winner-takes-all as max pooling: the maximum (minimum) takes all the relevance
    "max",
    "min",
    "amax",
    "amin",
    "maximum",
    "minimum",
)
_PASS_TORCH_FUNCTIONS = (
    "reshape",
    "flatten",
    "squeeze",
    "unsqueeze",
    "transpose",
    "t",
    "permute",
    "movedim",
    "moveaxis",
    "swapaxes",
    "swapdims",
    "broadcast_to",
    "clone",
    "select",
    "narrow",
    "index_select",
    "gather",
    "take_along_dim",
    "masked_fill",
    "where",
    "split",
    "split_with_sizes",
    "tensor_split",
    "chunk",
    "unbind",
    "repeat_interleave",
    "tile",
    "roll",
    "flip",
    "tril",
    "triu",
    "diagonal",
    "cat",
    "concat",
    "concatenate",
    "stack",
    "hstack",
    "vstack",
    "topk",
    # (placements and selections as above; complex views, for rotary embeddings by complex products)
    "scatter",
    "index_copy",
    "masked_scatter",
    "view_as_real",
    "view_as_complex",
    "max",
    "min",
    "amax",
    "amin",
    "maximum",
    "minimum",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "adaptive_max_pool1d",
)
_PASS_NN_FUNCTIONS = (
    "pad",
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
)

# Described where it is public, as lrpcpp.models.explicit.PASS_THROUGH.
PASS_THROUGH = frozenset(
    [getattr(Tensor, n) for n in _PASS_TENSOR_METHODS]
    + [
        f
        for n in _PASS_TORCH_FUNCTIONS
        for f in (getattr(torch, n), getattr(torch._C._VariableFunctions, n, None))
        if f is not None
    ]
    + [getattr(torch._C._nn, n) for n in _PASS_NN_FUNCTIONS]
    + [getattr(Tensor, n).__get__ for n in ("T", "mT", "H", "mH")]
    # (the same attributes as torch.compile passes them to a torch function mode from torch 2.14 on: the
    # aten operators they stand for)
    + [getattr(torch.ops.aten, n) for n in ("numpy_T", "mT", "matrix_H", "mH")]
)

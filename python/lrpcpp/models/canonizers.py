"""Canonizers: batch norms merged into the convolution before them (eval mode), so that a
convolution's rule sees the layer the model computes.

:func:`conv_bn_pairs` finds the pairs (by tracing the model with ``torch.fx``, else from
``nn.Sequential`` order), :func:`merged_conv_bn` computes the merged weight and bias (cached per
tensor version), :class:`MergedBatchNorm` stands in for a merged batch norm in a
:class:`lrpcpp.Composite`.
"""

import weakref
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.fx
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["conv_bn_pairs", "merged_conv_bn", "mergeable", "MergedBatchNorm"]

_PAIRS: "weakref.WeakKeyDictionary[nn.Module, Tuple[Tuple[int, ...], List[Tuple[str, str]]]]" = (
    weakref.WeakKeyDictionary()
)


def conv_bn_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """``(convolution name, batch-norm name)`` for every ``BatchNorm2d`` whose input is the output of
    an ``nn.Conv2d`` and nothing else, found by tracing the model with ``torch.fx``; where the model
    cannot be traced, the pairs that follow each other directly in an ``nn.Sequential``."""
    modules = dict(model.named_modules())
    if not any(isinstance(m, nn.BatchNorm2d) for m in modules.values()):
        return []
    structure = tuple(id(m) for m in modules.values())
    cached = _PAIRS.get(model)
    if cached is not None and cached[0] == structure:
        return list(cached[1])
    try:
        pairs = _traced_pairs(model, modules)
    except Exception:  # dynamic control flow, unsupported calls: fall back to the module structure
        pairs = _sequential_pairs(model)
    _PAIRS[model] = (structure, pairs)
    return list(pairs)


def _called_module(node: object) -> Optional[str]:
    """The qualified name of the module an ``fx`` node calls, or None for another node."""
    if isinstance(node, torch.fx.Node) and node.op == "call_module" and isinstance(node.target, str):
        return node.target
    return None


def _traced_pairs(model: nn.Module, modules: Mapping[str, nn.Module]) -> List[Tuple[str, str]]:
    graph = torch.fx.Tracer().trace(model)
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        name = _called_module(node)
        if name is not None:
            calls[name] = calls.get(name, 0) + 1
    pairs = []
    for node in graph.nodes:
        bn_name = _called_module(node)
        bn = None if bn_name is None else modules.get(bn_name)
        if bn_name is None or not isinstance(bn, nn.BatchNorm2d) or not node.args:
            continue
        src = node.args[0]
        conv_name = _called_module(src)
        conv = None if conv_name is None else modules.get(conv_name)
        if (
            conv_name is not None
            and isinstance(src, torch.fx.Node)
            and isinstance(conv, nn.Conv2d)
            and len(src.users) == 1
            and calls[conv_name] == 1
            and calls[bn_name] == 1
            and conv.out_channels == bn.num_features
        ):
            pairs.append((conv_name, bn_name))
    return pairs


def _sequential_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (a, conv), (b, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and conv.out_channels == bn.num_features:
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a, prefix + b))
    return pairs


def mergeable(bn: nn.BatchNorm2d) -> bool:
    return bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None


# conv weight -> (state of the sources, merged weight, merged bias)
_MERGED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def merged_conv_bn(conv: nn.modules.conv._ConvNd, bn: nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    """The weight and bias of ``bn(conv(x))`` as one convolution (eval-mode batch norm), computed in
    float64 and cast to the weight's dtype; computed once and reused while the convolution's and
    batch norm's tensors are unchanged."""
    sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    state: Tuple[Any, ...] = tuple(
        None if t is None else (id(t), t._version, t.data_ptr(), t.device, t.dtype) for t in sources
    )
    state += (bn.eps,)
    hit = _MERGED.get(conv.weight)
    if hit is not None and hit[0] == state:
        return hit[1], hit[2]
    running_mean, running_var = bn.running_mean, bn.running_var
    if running_mean is None or running_var is None:
        raise ValueError("lrpcpp: merged_conv_bn needs a batch norm with running statistics (track_running_stats=True)")
    with torch.no_grad():
        w = conv.weight.detach()
        var = running_var.detach().double()
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach().double()
        shift = -running_mean.detach().double()
        if conv.bias is not None:
            shift = shift + conv.bias.detach().double()
        bias = shift * scale
        if bn.bias is not None:
            bias = bias + bn.bias.detach().double()
        weight = (w.double() * scale.reshape(-1, 1, 1, 1)).to(w.dtype)
        bias = bias.to(w.dtype)
    _MERGED[conv.weight] = (state, weight, bias)
    return weight, bias


class MergedBatchNorm(nn.Module):
    """Stands in for a batch norm merged into the convolution before it (:class:`lrpcpp.Composite`
    with a preset): a copy of its input, as a batch norm's output is a new tensor."""

    def __init__(self, into: str) -> None:
        super().__init__()
        self.into = into

    def forward(self, x: Tensor) -> Tensor:
        return x.clone()

    def extra_repr(self) -> str:
        return f"merged into {self.into!r}"

"""The per-layer rule forwards of a preset: linear, convolution (with a batch norm merged into
it) and multi-head attention layers, put on a patched model by :func:`apply_preset`."""

import types
from typing import Any, Callable, Dict, List, Optional, Tuple, cast

from torch import Tensor, nn
from torch.nn import functional as F

from ..rules import Rule, weight_transforms
from .attention import check_mha, mha_forward
from .canonizers import conv_bn_pairs, mergeable, merged_conv_bn
from .presets import CONVOLUTIONS, Preset

__all__ = ["apply_preset", "conv_forward"]


def _conv_geometry(conv: nn.modules.conv._ConvNd) -> Tuple[List[int], str, List[int]]:
    """(explicit pre-padding, its mode, the convolution's numeric padding), as Conv2dEpsilon pads."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return [int(p) for p in conv._reversed_padding_repeated_twice], mode, [0] * len(conv.kernel_size)
    return [], "constant", [int(p) for p in conv.padding]


def _linear_forward(module: nn.Linear, rule: Rule, gi: bool) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        return rule.linear(x, module.weight, module.bias, weight_transforms(rule, module.weight), gi)

    return forward


def conv_forward(
    conv: nn.modules.conv._ConvNd, rule: Optional[Rule], gi: bool, bn: Optional[nn.BatchNorm2d] = None
) -> Callable[[Tensor], Tensor]:
    """The forward of any convolution layer (a batch norm is merged only into an ``nn.Conv2d``):
    ``rule.conv2d`` for an ``nn.Conv2d``, ``rule.convolution`` for the others (1-D, 3-D, transposed)."""
    pre_pad, mode, padding = _conv_geometry(conv)
    plain = types.MethodType(type(conv).forward, conv)
    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)

    def forward(x: Tensor) -> Tensor:
        merged = bn if bn is not None and not bn.training else None
        if rule is None and merged is None:
            return plain(x)
        bias: Optional[Tensor]
        if merged is not None:
            weight, bias = merged_conv_bn(conv, merged)
        else:
            weight, bias = conv.weight, conv.bias
        if pre_pad:
            x = F.pad(x, pre_pad, mode=mode)
        if rule is None:
            return F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)
        if isinstance(conv, nn.Conv2d):
            return rule.conv2d(
                x, weight, bias, conv.stride, padding, conv.dilation, conv.groups, weight_transforms(rule, weight), gi
            )
        return rule.convolution(
            x,
            weight,
            bias,
            list(conv.stride),
            padding,
            list(conv.dilation),
            transposed,
            list(conv.output_padding),
            conv.groups,
            weight_transforms(rule, weight),
            gi,
        )

    return forward


def _bn_forward(bn: nn.BatchNorm2d) -> Callable[[Tensor], Tensor]:
    plain = types.MethodType(type(bn).forward, bn)

    def forward(x: Tensor) -> Tensor:
        # merged into the convolution before it (eval mode); in training mode, the batch norm itself.
        # A copy, as the batch norm's output is a new tensor: code after it may update it in place
        # (a residual `out += identity`), which must not touch the output the convolution's rule keeps.
        return plain(x) if bn.training else x.clone()

    return forward


def apply_preset(handle: Any, preset: Preset) -> None:
    """Puts ``preset``'s layer rules on the model of a :class:`lrpcpp.PatchHandle`: an instance
    ``forward`` per linear, convolution and multi-head attention layer (and batch norm merged into
    the convolution before it), each undone by ``handle.remove()``. Records the rule of each layer
    in ``handle.layer_rules``."""
    model = handle.model
    gi = handle.mode == "gradient"
    assigned = preset.assign(model)
    modules = dict(model.named_modules())
    merged: Dict[str, nn.BatchNorm2d] = {}
    if preset.merge_batch_norm:
        for conv_name, bn_name in conv_bn_pairs(model):
            bn = modules[bn_name]
            if mergeable(bn):
                merged[conv_name] = bn
                handle.merged_batch_norms[conv_name] = bn_name
                handle._set_forward(bn_name, bn, _bn_forward(bn), f"merged into {conv_name}")
    for name, module in modules.items():
        if isinstance(module, nn.MultiheadAttention):
            in_rule, out_rule = assigned.get(f"{name}.in_proj"), assigned.get(f"{name}.out_proj")
            if in_rule is None and out_rule is None:
                continue
            check_mha(name, module)
            handle._set_forward(
                name, module, mha_forward(module, in_rule, out_rule, gi), f"projections: in {in_rule}, out {out_rule}"
            )
            for part, rule in (("in_proj", in_rule), ("out_proj", out_rule)):
                if rule is not None:
                    handle.layer_rules[f"{name}.{part}"] = rule
        elif isinstance(module, CONVOLUTIONS) and (name in assigned or name in merged):
            rule = assigned.get(name)
            what = f"rule {rule}" if rule is not None else "plain"
            if name in merged:
                what += f", batch norm {handle.merged_batch_norms[name]} merged"
            forward = conv_forward(cast(nn.modules.conv._ConvNd, module), rule, gi, merged.get(name))
            handle._set_forward(name, module, forward, what)
            if rule is not None:
                handle.layer_rules[name] = rule
        elif isinstance(module, nn.Linear) and name in assigned:
            rule = assigned[name]
            handle._set_forward(name, module, _linear_forward(module, rule, gi), f"rule {rule}")
            handle.layer_rules[name] = rule

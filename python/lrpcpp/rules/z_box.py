"""The z-box rule for an input layer with bounded inputs (RULES.md section 3)."""

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor, nn

from .. import functional as lf
from .. import modules as lm
from .base import Bound, Rule

__all__ = ["ZBox"]


@dataclass(frozen=True, eq=False)
class ZBox(Rule):
    """The z-box rule for an input layer with ``low <= x <= high`` (numbers, or tensors broadcastable
    to the layer's input such as per-channel ``[C, 1, 1]`` bounds)."""

    low: Bound = 0.0
    high: Bound = 1.0
    epsilon: float = 1e-6
    name = "z_box"
    transform = "abs"

    def _bounds(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return (
            torch.as_tensor(self.low, dtype=x.dtype, device=x.device),
            torch.as_tensor(self.high, dtype=x.dtype, device=x.device),
        )

    def linear(self, x, weight, bias, transform, gi):
        lo, hi = self._bounds(x)
        return lf.linear_z_box(x, weight, bias, lo, hi, self.epsilon, transform, gi)

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups, transform, gi):
        lo, hi = self._bounds(x)
        return lf.conv2d_z_box(x, weight, bias, lo, hi, stride, padding, dilation, groups, self.epsilon, transform, gi)

    def convolution(
        self, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, transform, gi
    ):
        lo, hi = self._bounds(x)
        return lf.convolution_z_box(
            x,
            weight,
            bias,
            lo,
            hi,
            stride,
            padding,
            dilation,
            transposed,
            output_padding,
            groups,
            self.epsilon,
            transform,
            gi,
        )

    def module(self, layer):
        cls = lm.LinearZBox if isinstance(layer, nn.Linear) else lm.Conv2dZBox
        return cls.from_module(layer, lower=self.low, upper=self.high, epsilon=self.epsilon)

    def __repr__(self) -> str:
        def show(b):
            return f"tensor{tuple(b.shape)}" if isinstance(b, Tensor) else repr(b)

        return f"ZBox(low={show(self.low)}, high={show(self.high)}, epsilon={self.epsilon})"

"""The epsilon rule (RULES.md section 1)."""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .. import functional as lf
from .. import modules as lm
from .base import Rule

__all__ = ["Epsilon"]


@dataclass(frozen=True)
class Epsilon(Rule):
    """The epsilon rule (RULES.md section 1). In gradient mode the layer keeps torch's own gradient,
    which is this rule with ``epsilon -> 0`` (RULES.md section 2)."""

    epsilon: float = 1e-6
    name = "epsilon"

    def linear(self, x, weight, bias, transform, gi):
        return F.linear(x, weight, bias) if gi else lf.linear_epsilon(x, weight, bias, self.epsilon)

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups, transform, gi):
        if gi:
            return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return lf.conv2d_epsilon(x, weight, bias, stride, padding, dilation, groups, self.epsilon)

    def convolution(
        self, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, transform, gi
    ):
        if gi:
            return torch.convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        return lf.convolution_epsilon(
            x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, self.epsilon
        )

    def module(self, layer):
        cls = lm.LinearEpsilon if isinstance(layer, nn.Linear) else lm.Conv2dEpsilon
        return cls.from_module(layer, epsilon=self.epsilon)

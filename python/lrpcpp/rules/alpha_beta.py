"""The alpha-beta rule (RULES.md section 3)."""

from dataclasses import dataclass

from torch import nn

from .. import functional as lf
from .. import modules as lm
from .base import Rule

__all__ = ["AlphaBeta"]


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """The alpha-beta rule, ``alpha - beta = 1`` (RULES.md section 3)."""

    alpha: float = 2.0
    beta: float = 1.0
    epsilon: float = 1e-6
    name = "alpha_beta"
    transform = "pos+neg"

    def linear(self, x, weight, bias, transform, gi):
        pos, neg = transform if transform is not None else (None, None)
        return lf.linear_alpha_beta(x, weight, bias, self.alpha, self.beta, self.epsilon, pos, neg, gi)

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups, transform, gi):
        pos, neg = transform if transform is not None else (None, None)
        return lf.conv2d_alpha_beta(
            x, weight, bias, stride, padding, dilation, groups, self.alpha, self.beta, self.epsilon, pos, neg, gi
        )

    def convolution(
        self, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, transform, gi
    ):
        pos, neg = transform if transform is not None else (None, None)
        return lf.convolution_alpha_beta(
            x,
            weight,
            bias,
            stride,
            padding,
            dilation,
            transposed,
            output_padding,
            groups,
            self.alpha,
            self.beta,
            self.epsilon,
            pos,
            neg,
            gi,
        )

    def module(self, layer):
        cls = lm.LinearAlphaBeta if isinstance(layer, nn.Linear) else lm.Conv2dAlphaBeta
        return cls.from_module(layer, alpha=self.alpha, beta=self.beta, epsilon=self.epsilon)

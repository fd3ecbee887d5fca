"""The alpha-beta rule (RULES.md section 3)."""

from dataclasses import dataclass

from torch import nn

from .. import functional as lf
from .. import modules as lm
from .base import BiasConvention, Rule

__all__ = ["AlphaBeta"]


@dataclass(frozen=True)
class AlphaBeta(BiasConvention, Rule):
    """The alpha-beta rule, ``alpha - beta = 1`` (RULES.md section 3). ``bias="ignore"`` leaves the
    layer's bias out of both sums (conservative); ``bias="denominator"`` puts ``b+`` into the sum of the
    positive terms and ``b-`` into that of the negative ones, as zennit does."""

    alpha: float = 2.0
    beta: float = 1.0
    epsilon: float = 1e-6
    bias: str = "ignore"
    name = "alpha_beta"
    transform = "pos+neg"

    def linear(self, x, weight, bias, transform, gi):
        pos, neg = transform if transform is not None else (None, None)
        return lf.linear_alpha_beta(
            x, weight, bias, self.alpha, self.beta, self.epsilon, pos, neg, gi, self.bias_in_denominator
        )

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups, transform, gi):
        pos, neg = transform if transform is not None else (None, None)
        return lf.conv2d_alpha_beta(
            x,
            weight,
            bias,
            stride,
            padding,
            dilation,
            groups,
            self.alpha,
            self.beta,
            self.epsilon,
            pos,
            neg,
            gi,
            self.bias_in_denominator,
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
            self.bias_in_denominator,
        )

    def module(self, layer):
        cls = lm.LinearAlphaBeta if isinstance(layer, nn.Linear) else lm.Conv2dAlphaBeta
        return cls.from_module(
            layer,
            alpha=self.alpha,
            beta=self.beta,
            epsilon=self.epsilon,
            bias_in_denominator=self.bias_in_denominator,
        )

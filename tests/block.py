"""A small transformer block written with lrpcpp ops, shared by the round-trip tests."""

import lrpcpp.functional as lf
import lrpcpp.modules as lm
import torch
from torch import nn


class Block(nn.Module):
    """Pre-norm attention + gated MLP, every relevance-carrying step an lrpcpp op."""

    def __init__(self, hidden: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.norm1 = lm.RMSNormIdentity(hidden, eps=1e-6)
        self.qkv = lm.LinearEpsilon(hidden, 3 * hidden, bias=False)
        self.out = lm.LinearEpsilon(hidden, hidden)
        self.softmax = lm.SoftmaxDT(-1, temperature=self.head_dim**0.5)
        self.norm2 = lm.LayerNormEpsilon(hidden)
        self.gate = lm.LinearEpsilon(hidden, 2 * hidden)
        self.up = lm.LinearEpsilon(hidden, 2 * hidden)
        self.act = lm.SiLUIdentity()
        self.down = lm.LinearEpsilon(2 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q = q.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        scores = lf.matmul(q, k.transpose(-1, -2))
        attn = lf.matmul(self.softmax(scores), v).transpose(1, 2).reshape(b, t, h)
        x = lf.add2(x, self.out(attn))
        hidden = self.norm2(x)
        mlp = self.down(lf.mul2(self.act(self.gate(hidden)), self.up(hidden)))
        return lf.add2(x, mlp)


class Head(nn.Module):
    """Block + mean pooling + a linear readout: one logit per batch item."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.block = Block(hidden)
        self.readout = lm.LinearEpsilon(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(lf.mean(lf.gelu(self.block(x)), [1])).squeeze(-1)


def relevance(model, x: torch.Tensor) -> torch.Tensor:
    """Input relevance of the model's output, seeded with the output itself."""
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(y)
    return x.grad

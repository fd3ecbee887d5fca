"""Explain a small LLaMA-style transformer block built from lrpcpp operators.

The block (RMSNorm, attention, gated MLP, residuals) runs on the embeddings of
a short sentence; a linear readout of the last token gives the logit to
explain. One backward pass, seeded with that logit, yields the relevance of
every input embedding; summed over the hidden dimension it is one value per
token. The script prints the per-token relevance and how much of the logit it
conserves, and names the rules that do not conserve (softmax bias, biases).

    make run          # or: PYTHONPATH=python .venv/bin/python examples/explain_block.py
"""

import torch
from torch import nn

import lrpcpp.functional as lf
import lrpcpp.modules as lm

TOKENS = ["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "."]


class LlamaStyleBlock(nn.Module):
    def __init__(self, vocab: int, hidden: int = 64, heads: int = 4, mlp: int = 172) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.embed = nn.Embedding(vocab, hidden)
        self.norm1 = lm.RMSNormIdentity(hidden, eps=1e-6)
        self.q = lm.LinearEpsilon(hidden, hidden, bias=False)
        self.k = lm.LinearEpsilon(hidden, hidden, bias=False)
        self.v = lm.LinearEpsilon(hidden, hidden, bias=False)
        self.o = lm.LinearEpsilon(hidden, hidden, bias=False)
        self.softmax = lm.SoftmaxDT(-1)
        self.norm2 = lm.RMSNormIdentity(hidden, eps=1e-6)
        self.gate = lm.LinearEpsilon(hidden, mlp, bias=False)
        self.up = lm.LinearEpsilon(hidden, mlp, bias=False)
        self.down = lm.LinearEpsilon(mlp, hidden, bias=False)
        self.act = lm.SiLUIdentity()
        self.readout = lm.LinearEpsilon(hidden, 1, bias=False)

    def heads_first(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        hn = self.norm1(x)
        q, k, v = self.heads_first(self.q(hn)), self.heads_first(self.k(hn)), self.heads_first(self.v(hn))
        causal = torch.full((n, n), float("-inf")).triu(1)
        scores = lf.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5 + causal
        attn = lf.matmul(self.softmax(scores), v).transpose(1, 2).reshape(b, n, h)
        x = lf.add2(x, self.o(attn))
        hn = self.norm2(x)
        x = lf.add2(x, self.down(lf.mul2(self.act(self.gate(hn)), self.up(hn))))
        return self.readout(x[:, -1]).squeeze(-1)


def main() -> None:
    torch.manual_seed(0)
    model = LlamaStyleBlock(vocab=len(TOKENS)).eval()
    ids = torch.arange(len(TOKENS)).unsqueeze(0)
    embeddings = model.embed(ids).detach().requires_grad_()

    logit = model(embeddings)
    logit.backward(logit)  # seed the relevance with the value to explain
    relevance = embeddings.grad[0].sum(-1)  # one value per token

    print(f"explained logit: {logit.item():+.5f}\n")
    peak = float(relevance.abs().max())
    for token, r in zip(TOKENS, relevance.tolist()):
        bar = ("+" if r >= 0 else "-") * round(20 * abs(r) / peak)
        print(f"  {token:>6s} {r:+.5f}  {bar}")
    total = float(relevance.sum())
    print(f"\nsum of token relevance: {total:+.5f}")
    print(f"conserved share of the logit: {total / logit.item():.1%}")
    print("(the softmax Deep Taylor rule keeps a bias term by design, so attention does not conserve "
          "exactly; linear layers here have no bias, and norms, activations, products and residual "
          "additions conserve)")
    if not torch.isfinite(embeddings.grad).all():
        raise SystemExit("non-finite relevance")


if __name__ == "__main__":
    main()

"""Explain a small LLaMA-style transformer block built from lrpcpp operators.

The block (RMSNorm, attention, gated MLP, residuals) runs on the embeddings of
a short sentence; a linear readout of the mean-pooled tokens gives the logit
to explain. One backward pass, seeded with that logit, yields the relevance of
every input embedding; summed over the hidden dimension it is one value per
token. The script prints the per-token relevance and checks conservation: the
token relevances plus what the softmax rule's bias term absorbs add up to the
logit.

    make run          # or: PYTHONPATH=python .venv/bin/python examples/explain_block.py
"""

import lrpcpp.functional as lf
import lrpcpp.modules as lm
import torch
from torch import nn

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
        # the 1/sqrt(d) scaling as the softmax temperature: a plain `scores * scale` outside
        # an lrpcpp op would scale the relevance flowing back through it as well
        self.softmax = lm.SoftmaxDT(-1, temperature=self.head_dim**0.5)
        self.norm2 = lm.RMSNormIdentity(hidden, eps=1e-6)
        self.gate = lm.LinearEpsilon(hidden, mlp, bias=False)
        self.up = lm.LinearEpsilon(hidden, mlp, bias=False)
        self.down = lm.LinearEpsilon(mlp, hidden, bias=False)
        self.act = lm.SiLUIdentity()
        self.readout = lm.LinearEpsilon(hidden, 1, bias=False)
        self.ledger: dict = {}  # relevance totals around the softmax, filled during backward

    def heads_first(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        hn = self.norm1(x)
        q, k, v = self.heads_first(self.q(hn)), self.heads_first(self.k(hn)), self.heads_first(self.v(hn))
        causal = torch.full((n, n), float("-inf")).triu(1)
        scores = lf.matmul(q, k.transpose(-1, -2)) + causal
        probs = self.softmax(scores)
        if probs.requires_grad:
            scores.register_hook(lambda r: self.ledger.__setitem__("into softmax", float(r.sum())))
            probs.register_hook(lambda r: self.ledger.__setitem__("out of softmax", float(r.sum())))
        attn = lf.matmul(probs, v).transpose(1, 2).reshape(b, n, h)
        x = lf.add2(x, self.o(attn))
        hn = self.norm2(x)
        x = lf.add2(x, self.down(lf.mul2(self.act(self.gate(hn)), self.up(hn))))
        return self.readout(lf.mean(x, [1])).squeeze(-1)  # mean-pooled sentence logit


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
    absorbed = model.ledger["out of softmax"] - model.ledger["into softmax"]
    print(f"\nsum of token relevance:                 {total:+.5f}")
    print(f"absorbed by the softmax bias term:      {absorbed:+.5f}")
    print(f"sum + absorbed (conservation check):    {total + absorbed:+.5f}  vs logit {logit.item():+.5f}")
    print(
        "(every other rule in this block conserves: bias-free linear layers, RMSNorm and SiLU with the\n"
        " identity rule, the uniform split of products, epsilon-LRP on residual additions and the mean)"
    )
    if not torch.isfinite(embeddings.grad).all():
        raise SystemExit("error: non-finite relevance")
    if abs(total + absorbed - logit.item()) > 1e-4 * max(1.0, abs(logit.item())):
        raise SystemExit("error: relevance is not conserved")


if __name__ == "__main__":
    main()

"""A small text classifier written in plain torch with functional ops, as a user writes one (in the
style of nanochat): no Hugging Face config, no family entry. Token embedding, ``F.rms_norm`` on the
residual stream and on q/k, rotary position embedding, bidirectional
``F.scaled_dot_product_attention``, a ``relu(x)²`` MLP, learned scalars on the residual branches,
mean pooling over the unmasked tokens, a final LayerNorm and a linear head."""

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, HEADS, LAYERS, CLASSES = 32, 16, 2, 2, 3


def rotary(seq: int, head_dim: int, dtype, device, base: float = 10000.0):
    """cos and sin of the rotary embedding, [seq, head_dim / 2], computed from the positions."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=dtype, device=device) / head_dim)
    angles = torch.arange(seq, dtype=dtype, device=device)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """x: [batch, heads, seq, head_dim]; rotates the pairs (x[..., i], x[..., i + head_dim / 2])."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.c_q, self.c_k, self.c_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin, keep):
        b, s, d = x.shape
        q, k, v = (f(x).view(b, s, self.heads, self.head_dim).transpose(1, 2) for f in (self.c_q, self.c_k, self.c_v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q), norm(k)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return self.c_proj(y.transpose(1, 2).reshape(b, s, d))


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn, self.mlp = Attention(dim, heads), MLP(dim)
        self.attn_scale, self.mlp_scale = nn.Parameter(torch.ones(())), nn.Parameter(torch.ones(()))

    def forward(self, x, cos, sin, keep):
        x = x + self.attn_scale * self.attn(norm(x), cos, sin, keep)
        return x + self.mlp_scale * self.mlp(norm(x))


class FunctionalClassifier(nn.Module):
    def __init__(self, vocab=VOCAB, dim=DIM, heads=HEADS, layers=LAYERS, classes=CLASSES):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = attention_mask.bool()
        x = norm(self.tok(input_ids))
        cos, sin = rotary(input_ids.shape[1], self.blocks[0].attn.head_dim, x.dtype, x.device)
        for block in self.blocks:
            x = block(x, cos, sin, keep)
        m = attention_mask.to(x.dtype)[..., None]
        pooled = (x * m).sum(dim=1) / m.sum(dim=1)
        return self.head(self.norm(pooled))


def build(seed: int = 0, dtype=torch.float64) -> FunctionalClassifier:
    """The classifier with random weights drawn from ``seed`` (biases, norm weights and the residual
    scalars included, so that none is a trivial 0 or 1)."""
    torch.manual_seed(seed)
    model = FunctionalClassifier().to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.4)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:  # LayerNorm weight, residual scalars
                p.uniform_(0.5, 1.5)
    return model


def inputs(batch: int = 2, seq: int = 7, seed: int = 1):
    """Token ids and an attention mask with right padding on the second row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1:, seq - 2 :] = 0
    return ids, mask


def bias_free(model: FunctionalClassifier) -> FunctionalClassifier:
    """Every bias zeroed (the linear layers' and the LayerNorm's)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    return model

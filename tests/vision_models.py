"""Small image models built from torch.nn alone, laid out as torchvision's are (so that the CPU suite
covers batch-norm merging, residual blocks, convolution rules and nn.MultiheadAttention without
torchvision): a ResNet with basic and downsampling blocks, and a Vision Transformer."""

import torch
from torch import nn


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv-bn-relu-conv-bn, a residual added in place, one shared ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 5, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 5, 2, 2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class EncoderBlock(nn.Module):
    """torchvision's ViT encoder block: pre-norm attention (nn.MultiheadAttention) and MLP."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class TinyViT(nn.Module):
    def __init__(
        self, image: int = 16, patch: int = 4, dim: int = 16, heads: int = 2, layers: int = 2, classes: int = 5
    ):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.layers = nn.ModuleList(EncoderBlock(dim, heads, 2 * dim) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.heads = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        for layer in self.layers:
            x = layer(x)
        return self.heads(self.ln(x)[:, 0])


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights and batch-norm statistics far from their initial values (non-trivial merges), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "bn" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
    return model.eval()


def resnet(dtype=torch.float64, seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    return randomise(TinyResNet(), seed).to(dtype)


def vit(dtype=torch.float64, seed: int = 0) -> TinyViT:
    torch.manual_seed(seed)
    return randomise(TinyViT(), seed).to(dtype)


def images(batch: int = 2, size: int = 16, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    """Normalised images: pixels in [0, 1] mapped with ImageNet's mean and standard deviation."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(batch, 3, size, size, generator=g, dtype=torch.float64)
    return ((pixels - MEAN) / STD).to(dtype)


MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).reshape(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).reshape(3, 1, 1)
LOW, HIGH = (0 - MEAN) / STD, (1 - MEAN) / STD  # the bounds of a normalised pixel, per channel

"""Vision families without a family entry (DeiT, Swin, ConvNeXt, CLIP) explained at the operation
level: chosen by level="auto", every call ruled or passed, the forward unchanged, the relevance a
rule's and not the plain gradient x input; where an entry exists, the registry's relevance."""

import warnings

import lrpcpp
import pytest
import torch
import transformers as tfm
import vision_models
from conftest import needs_redispatch
from lrpcpp.models.families import FAMILIES, Family
from lrpcpp.models.operations import UnruledOperationWarning
from torch import nn
from torch.nn import functional as F

_VIT_LIKE = dict(
    hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4
)


def _build(config_cls, model_cls, **config) -> nn.Module:
    torch.manual_seed(0)
    model = model_cls(config_cls(**config)).to(torch.float64).eval()
    with torch.no_grad():  # larger weights than the default init, so that outputs are far from zero
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


class ImageText(nn.Module):
    """CLIP with fixed captions: the image-text similarities of the given pixels."""

    def __init__(self, clip: nn.Module, input_ids: torch.Tensor):
        super().__init__()
        self.clip, self.input_ids = clip, input_ids

    def forward(self, pixel_values):
        return self.clip(input_ids=self.input_ids, pixel_values=pixel_values)


def deit():
    return _build(tfm.DeiTConfig, tfm.DeiTForImageClassification, num_labels=3, **_VIT_LIKE)


def swin():
    # window 3 on 8x8 and 4x4 patches: padded windows, and the second block of each stage shifted (rolled)
    return _build(
        tfm.SwinConfig,
        tfm.SwinForImageClassification,
        image_size=16,
        patch_size=2,
        embed_dim=8,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=3,
        num_labels=3,
    )


def convnext():
    # its LayerNorms run on channels first (the stem, the downsampling) and channels last (the blocks)
    return _build(
        tfm.ConvNextConfig,
        tfm.ConvNextForImageClassification,
        image_size=16,
        patch_size=2,
        num_stages=2,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_labels=3,
    )


def clip():
    text = dict(_VIT_LIKE, vocab_size=64, max_position_embeddings=8, bos_token_id=1, eos_token_id=2)
    for k in ("image_size", "patch_size"):
        text.pop(k)
    model = _build(tfm.CLIPConfig, tfm.CLIPModel, text_config=text, vision_config=_VIT_LIKE, projection_dim=8)
    ids = torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(2))
    return ImageText(model, ids)


MODELS = {"deit": deit, "swin": swin, "convnext": convnext, "clip": clip}


def _logits(out):
    return out.logits_per_image if hasattr(out, "logits_per_image") else out.logits


def _target(name):
    # CLIP: the similarity of each image to the second caption; the others: the top class
    return (lambda out: out.logits_per_image[:, 1]) if name == "clip" else None


def _pixels(batch: int = 2):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _plain_gradient_x_input(model, x, target):
    leaf = x.clone().requires_grad_()
    out = model(pixel_values=leaf)
    explained = target(out) if target is not None else _logits(out).gather(1, _logits(out).argmax(1, keepdim=True))
    explained.sum().backward()
    return leaf * leaf.grad


@pytest.mark.parametrize("name", sorted(MODELS))
def test_auto_picks_the_operation_level_with_every_call_ruled(name, request):
    if name == "clip":
        request.getfixturevalue("float64_default")
    model, x = MODELS[name](), _pixels()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnruledOperationWarning)
        got = lrpcpp.attribute(model, pixel_values=x, target=_target(name))
    assert got.coverage is not None, "a model without a family entry is explained at the operation level"
    assert got.coverage.unruled == {} and got.coverage.seen > 0
    assert got.relevance.shape == x.shape and torch.isfinite(got.relevance).all()
    assert got.relevance.abs().sum() > 0
    plain = _plain_gradient_x_input(model, x, _target(name))
    assert not torch.allclose(got.relevance, plain, rtol=1e-3, atol=1e-8), "the rules changed nothing"


def test_the_swin_and_convnext_paths_are_exercised(float64_default):
    x = _pixels()
    passed = lrpcpp.attribute(swin(), pixel_values=x).coverage.passed
    assert passed["torch.roll"] > 0 and passed["torch.nn.functional.pad"] > 0  # shifted and padded windows
    ruled = lrpcpp.attribute(convnext(), pixel_values=x).coverage.ruled
    assert ruled["torch.nn.functional.layer_norm"] == 5  # stem, two blocks, downsampling, the pooled output
    ruled = lrpcpp.attribute(clip(), pixel_values=x, target=_target("clip")).coverage.ruled
    assert ruled["Tensor.div"] == 1  # the image embedding's norm, held constant


@pytest.mark.parametrize("name", sorted(MODELS))
def test_patched_forward_is_bitwise_the_plain_forward(name, request):
    if name == "clip":
        request.getfixturevalue("float64_default")
    model, x = MODELS[name](), _pixels()
    plain = _logits(model(pixel_values=x))
    with lrpcpp.patch(model, level="operations") as handle:
        assert handle.level == "operations"
        patched = _logits(model(pixel_values=x.clone().requires_grad_()))
    assert torch.equal(patched, plain)


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_deit_described_like_vit_gives_the_registry_relevance(method, monkeypatch):
    # DeiT is ViT's architecture with a distillation token: with ViT's entry, the two levels agree
    monkeypatch.setitem(
        FAMILIES,
        "deit",
        Family(
            name="deit",
            model_types=("deit",),
            attention=("DeiTAttention", "DeiTSelfAttention"),
            q=("q_proj", "query"),
            k=("k_proj", "key"),
            v=("v_proj", "value"),
        ),
    )
    model, x = deit(), _pixels()
    ref = lrpcpp.attribute(model, pixel_values=x, method=method)
    got = lrpcpp.attribute(model, pixel_values=x, method=method, level="operations")
    assert ref.coverage is None and got.coverage.unruled == {}
    torch.testing.assert_close(got.relevance, ref.relevance, rtol=1e-10, atol=1e-12)


@needs_redispatch
@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_torchvision_style_vit_gives_the_registry_relevance(method):
    # torchvision is not a dependency: tests/vision_models.TinyViT has torchvision's ViT layout
    # (nn.MultiheadAttention, which needs no entry)
    model, x = vision_models.vit(), vision_models.images()
    ref = lrpcpp.attribute(model, pixel_values=x, method=method, level="registry")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnruledOperationWarning)
        got = lrpcpp.attribute(model, pixel_values=x, method=method)  # (no family entry: the operation level)
    assert ref.coverage is None and got.coverage.unruled == {}
    torch.testing.assert_close(got.relevance, ref.relevance, rtol=1e-10, atol=1e-12)


@needs_redispatch
@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_torchvision_vit_gives_the_registry_relevance(method):
    # torchvision's own VisionTransformer (vit_b_16's layout, a small config): nn.MultiheadAttention
    # called with need_weights=False, the class token, the encoder's dropout and LayerNorms
    pytest.importorskip(
        "torchvision",
        reason="torchvision does not install beside torch 2.13.0 CPU; make cuda-check runs this test in .venv-cuda",
    )
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = vision_models.randomise(VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=5)).double()
    x = vision_models.images(size=32)
    plain = model(x)
    ref = lrpcpp.attribute(model, pixel_values=x, method=method, level="registry")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnruledOperationWarning)
        got = lrpcpp.attribute(model, pixel_values=x, method=method, level="operations")
    assert ref.coverage is None and got.coverage.unruled == {} and got.coverage.seen > 0
    assert torch.equal(got.target, ref.target)
    torch.testing.assert_close(got.relevance, ref.relevance, rtol=1e-10, atol=1e-12)
    leaf = x.clone().requires_grad_()
    out = model(leaf)
    out.gather(1, got.target[:, None]).sum().backward()
    assert not torch.allclose(got.relevance, leaf * leaf.grad, rtol=1e-3, atol=1e-8), "the rules changed nothing"
    with lrpcpp.patch(model, method=method, level="operations") as handle:
        assert handle.level == "operations"
        assert torch.equal(model(x.clone().requires_grad_()), plain)
    assert torch.equal(model(x), plain)


class _Normed(nn.Module):
    """A convolution, a normalisation of its channels, a classifier."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 6, 3), norm, nn.Linear(6 * 14 * 14, 3)

    def forward(self, pixel_values):
        return self.head(self.norm(self.conv(pixel_values)).flatten(1))


def _norm_reference(norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
    # float64 transcription of RULES.md section 2: the deviation of each group held constant (an
    # instance norm is a group norm with one group per channel); running statistics: an affine map
    shape = (1, -1, 1, 1)
    w = norm.weight.reshape(shape) if norm.weight is not None else 1.0
    b = norm.bias.reshape(shape) if norm.bias is not None else 0.0
    if isinstance(norm, nn.InstanceNorm2d) and norm.track_running_stats:
        return (h - norm.running_mean.reshape(shape)) / torch.sqrt(norm.running_var.reshape(shape) + norm.eps) * w + b
    groups = norm.num_groups if isinstance(norm, nn.GroupNorm) else h.shape[1]
    g = h.reshape(h.shape[0], groups, -1)
    sd = torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + norm.eps).detach()
    return ((g - g.mean(-1, keepdim=True)) / sd).reshape(h.shape) * w + b


NORMS = {
    "group_norm": lambda: nn.GroupNorm(2, 6),
    "group_norm_plain": lambda: nn.GroupNorm(3, 6, affine=False),
    "instance_norm": lambda: nn.InstanceNorm2d(6, affine=True),
    "instance_norm_running": lambda: nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
}


@pytest.mark.parametrize("name", sorted(NORMS))
def test_group_and_instance_norm_hold_the_deviation_constant(name):
    torch.manual_seed(0)
    model = _Normed(NORMS[name]()).double().eval()
    with torch.no_grad():
        for p in model.norm.parameters():
            p.normal_(1.0, 0.5)
        if getattr(model.norm, "running_mean", None) is not None:
            model.norm.running_mean.normal_(0, 0.5)
            model.norm.running_var.uniform_(0.5, 1.5)
    x = _pixels()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnruledOperationWarning)
        got = lrpcpp.attribute(model, pixel_values=x, target=1, level="operations")
    assert got.coverage.unruled == {}
    assert got.coverage.ruled[f"torch.nn.functional.{name.split('_norm')[0]}_norm"] == 1
    leaf = x.clone().requires_grad_()
    model.head(_norm_reference(model.norm, model.conv(leaf)).flatten(1))[:, 1].sum().backward()
    torch.testing.assert_close(got.relevance, leaf * leaf.grad, rtol=1e-10, atol=1e-12)
    plain = model(x)
    with lrpcpp.patch(model, level="operations"):
        assert torch.equal(model(x.clone().requires_grad_()), plain)


def test_group_norm_keyword_arguments_and_torch_spelling():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.rand(4, dtype=torch.float64), None
    norm = nn.GroupNorm(2, 4, eps=1e-3).double()
    with torch.no_grad():
        norm.weight.copy_(w)
    leaf = x.clone().requires_grad_()
    (_norm_reference(norm, leaf) ** 2).sum().backward()
    for call in (
        lambda t: F.group_norm(t, 2, weight=w, bias=b, eps=1e-3),
        lambda t: torch.group_norm(t, 2, w, b, 1e-3, False),
    ):
        mine = x.clone().requires_grad_()
        with lrpcpp.models.operations.GradientRules() as mode:
            y = call(mine)
        assert torch.equal(y, F.group_norm(x, 2, w, b, 1e-3))
        (y**2).sum().backward()
        assert mode.coverage().unruled == {} and sum(mode.coverage().ruled.values()) == 1
        torch.testing.assert_close(mine.grad, leaf.grad, rtol=1e-10, atol=1e-12)

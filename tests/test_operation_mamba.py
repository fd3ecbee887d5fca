"""Mamba (selective state-space models) at the operation level, with the rules of MambaLRP (Jafari,
Montavon, Müller, Eberle, NeurIPS 2024, arXiv 2406.07592): SiLU and RMSNorm by the identity rule,
the step size and B, C held constant so that the scan is linear in its input, and the gate
``y * silu(z)`` split in half (AttnLRP) or held constant (CP-LRP)."""

import lrpcpp
import pytest
import torch
import transformers as tfm
from lrpcpp.models.operations import UnruledOperationWarning
from models import attribute_ruled, bias_free
from torch import nn
from torch.nn import functional as F

VOCAB = 40
METHODS = ["attnlrp", "cp-lrp"]


def build(seed: int = 0):
    """A random float64 Mamba of 2 layers. Every parameter is a float32 number (stored in float64),
    so that the casts of parameters that transformers' scan makes (``A_log.float()``, ``D.float()``,
    the step size's bias) are exact; the residual stays in float64."""
    torch.manual_seed(seed)
    config = tfm.MambaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        state_size=4,
        intermediate_size=32,
        conv_kernel=3,
        time_step_rank=4,
        num_hidden_layers=2,
        residual_in_fp32=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = tfm.MambaForCausalLM(config).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "A_log" not in name:
                p.normal_(0, 0.3)
            elif name.endswith("D") or name.endswith("bias"):
                p.normal_(0.5, 0.3)
            p.copy_(p.float().double())
    return model


def ids(batch: int = 2, seq: int = 6):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- the reference
def identity_rule(x, y):
    """``y = f(x)`` with the relevance of the output passed to the input unchanged: in gradient
    times input, the gradient ``y / x`` held constant."""
    return x * (y / x).detach()


def rms_norm(norm, x):
    """transformers' MambaRMSNorm (computed in float32) under the identity rule: its value, with
    the normalising factor held constant."""
    h = x.float()
    y = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(x.dtype)
    return identity_rule(x, y)


def mixer(m, x, method):
    """One selective-SSM mixer under MambaLRP, from its parameters. Δ, B and C are computed from the
    scanned sequence and held constant, so that exp(Δ A), Δ B and C are constants and the scan is a
    linear map of it; like transformers, the scan casts its input and B to float32."""
    seq, inner = x.shape[1], m.D.shape[0]
    rank, state = m.dt_proj.weight.shape[1], m.A_log.shape[1]
    u, z = (x @ m.in_proj.weight.T).transpose(1, 2).chunk(2, dim=1)  # [batch, inner, seq]
    k = m.conv1d.weight.shape[-1]
    u = F.conv1d(u, m.conv1d.weight, m.conv1d.bias, padding=k - 1, groups=inner)[..., :seq]
    u = identity_rule(u, F.silu(u))
    dt, B, C = (u.transpose(1, 2) @ m.x_proj.weight.T).detach().split([rank, state, state], dim=-1)
    dt = F.softplus(dt @ m.dt_proj.weight.T + m.dt_proj.bias).transpose(1, 2)  # [batch, inner, seq]
    A = -torch.exp(m.A_log.float())
    dA = torch.exp(A[None, :, None, :] * dt[..., None])  # [batch, inner, seq, state]
    dB = dt[..., None] * B[:, None].float()
    dBu = dB * u[..., None].float()
    h = torch.zeros(x.shape[0], inner, state, dtype=x.dtype)
    ys = []
    for t in range(seq):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append((h @ C[:, t, :, None])[..., 0])
    y = torch.stack(ys, dim=-1) + u * m.D[None, :, None]
    gate = identity_rule(z, F.silu(z))
    if method == "attnlrp":  # half of the relevance of the product to each factor
        out = 0.5 * (y * gate.detach()) + 0.5 * (y.detach() * gate)
    else:  # the gate held constant
        out = y * gate.detach()
    return out.transpose(1, 2) @ m.out_proj.weight.T


def reference(model, input_ids, target, method):
    """MambaLRP on the whole model, in gradient times input: (input relevance, explained logit)."""
    backbone = model.backbone
    x = backbone.embeddings.weight[input_ids].detach().clone().requires_grad_()
    h = x
    for block in backbone.layers:
        h = h + mixer(block.mixer, rms_norm(block.norm, h), method)
    logits = (rms_norm(backbone.norm_f, h) @ model.lm_head.weight.T).float()  # as transformers returns them
    out = logits[:, -1].gather(1, target[:, None])[:, 0]
    out.sum().backward()  # the float32 cast passes the seed 1 back unchanged
    return x * x.grad, out.detach()


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("method", METHODS)
def test_mamba_relevance_is_the_mambalrp_reference(method):
    model, input_ids = build(), ids()
    with pytest.raises(lrpcpp.UnsupportedModelError, match="register_family"):
        lrpcpp.patch(model, level="registry")
    got = attribute_ruled(model, input_ids=input_ids, method=method, epsilon=0.0)  # level="auto"
    want, logit = reference(model, input_ids, got.target, method)
    torch.testing.assert_close(got.output, logit, rtol=0, atol=0)
    torch.testing.assert_close(got.relevance, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method", METHODS)
def test_mamba_conserves_without_biases(method):
    # the scan (with Δ, B, C constant) and the D skip are linear, the norms and SiLUs identity rules,
    # the gate a product: on a bias-free model the relevance of the input sums to the logit (up to
    # the float32 casts in the scan). The conv1d bias absorbs a share otherwise.
    model, input_ids = bias_free(build()), ids()
    got = attribute_ruled(model, input_ids=input_ids, method=method)
    torch.testing.assert_close(got.relevance.sum((1, 2)).float(), got.output, rtol=1e-5, atol=0)
    model = build()
    with torch.no_grad():
        model.backbone.layers[0].mixer.conv1d.bias.zero_()
        model.backbone.layers[1].mixer.conv1d.bias.zero_()
    got = attribute_ruled(model, input_ids=input_ids, method=method)  # the dt_proj bias is held constant too
    torch.testing.assert_close(got.relevance.sum((1, 2)).float(), got.output, rtol=1e-5, atol=0)
    with_bias = attribute_ruled(build(), input_ids=input_ids, method=method)
    assert not torch.allclose(with_bias.relevance.sum((1, 2)).float(), with_bias.output, rtol=1e-2)


def test_mamba_coverage_and_forward_are_unchanged():
    model, input_ids = build(), ids()
    x = model.get_input_embeddings()(input_ids).detach()
    with torch.no_grad():
        plain = model(inputs_embeds=x).logits
    got = attribute_ruled(model, input_ids=input_ids, strict=True)
    assert got.coverage.unruled == {} and got.coverage.seen > 0
    # the identity rule on 3 RMSNorms and 4 SiLUs (after each mixer's convolution and on its gate: modules in
    # transformers 4.x, F.silu calls in 5.x); one gate product per mixer; nothing else is ruled
    ruled = dict(got.coverage.ruled)
    assert ruled.pop("torch.ops.lrpcpp.gi_identity") + ruled.pop("torch.nn.functional.silu", 0) == 7
    assert ruled == {"Tensor.mul": 2}
    with lrpcpp.patch(model, level="operations", strict=True) as handle:
        assert handle.patched["backbone.layers.0.mixer.x_proj"] == "output held constant (selective scan parameters)"
        patched = model(inputs_embeds=x.clone().requires_grad_()).logits
    assert torch.equal(patched, plain)
    assert torch.equal(got.output, plain[:, -1].gather(1, got.target[:, None])[:, 0])
    assert "forward" not in model.backbone.layers[0].mixer.__dict__
    assert not model.backbone.layers[0].mixer.x_proj._forward_hooks


def test_mamba_rule_differs_from_gradient_times_input():
    model, input_ids = build(), ids()
    got = attribute_ruled(model, input_ids=input_ids)
    x = model.get_input_embeddings()(input_ids).detach().requires_grad_()
    logits = model(inputs_embeds=x).logits[:, -1]
    logits.gather(1, got.target[:, None]).sum().backward()
    plain = x * x.grad
    assert (got.relevance - plain).norm() > 0.01 * plain.norm()


class _FusedScan(torch.autograd.Function):
    """A stand-in for a fused scan kernel: a custom autograd.Function the rules cannot see into."""

    @staticmethod
    def forward(ctx, u, D):
        ctx.save_for_backward(D)
        return u * D

    @staticmethod
    def backward(ctx, grad):
        (D,) = ctx.saved_tensors
        return grad * D, None


class _FusedMixer(nn.Module):
    """The layout of a selective-SSM mixer whose forward takes a fused kernel."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.x_proj, self.dt_proj = nn.Linear(width, 2, bias=False), nn.Linear(1, width)
        self.A_log, self.D = nn.Parameter(torch.zeros(width, 1)), nn.Parameter(torch.full((width,), 0.5))

    def forward(self, x):
        return _FusedScan.apply(x, self.D) * torch.sigmoid(self.x_proj(x)[..., :1])


class _Mixer(_FusedMixer):
    """With a plain torch ``slow_forward`` as well (transformers 4.x's MambaMixer, whose forward
    takes the fused kernels on a GPU when mamba_ssm and causal_conv1d are installed)."""

    def slow_forward(self, x):
        return x * self.D * torch.sigmoid(self.x_proj(x)[..., :1])


def test_a_mixer_with_a_torch_only_path_runs_it_at_the_operation_level():
    x = torch.randn(3, 4, dtype=torch.float64)
    fused = nn.Sequential(_FusedMixer()).double()
    with pytest.warns(UnruledOperationWarning, match="_FusedScan"):
        with lrpcpp.patch(fused, level="operations"):
            fused(x.clone().requires_grad_())
    model = nn.Sequential(_Mixer()).double()
    with lrpcpp.patch(model, level="operations", strict=True) as handle:
        assert handle.patched["0"] == "torch-only slow_forward"
        xr = x.clone().requires_grad_()
        model(xr).sum().backward()
    # the scan's parameters (here the gate computed by x_proj) held constant: relevance x * D * gate
    gate = torch.sigmoid(model[0].x_proj(x)[..., :1]).detach()
    torch.testing.assert_close(xr * xr.grad, x * model[0].D.detach() * gate, rtol=1e-12, atol=0)
    assert "forward" not in model[0].__dict__

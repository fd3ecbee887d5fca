"""Mamba2 at the operation level, with the rules of MambaLRP (Jafari, Montavon, Müller, Eberle,
NeurIPS 2024, arXiv 2406.07592) as for Mamba: the step size and B, C, which Mamba2's ``in_proj``
computes together with the gate and the scanned sequence, held constant, so that the chunked scan is
linear in its input; SiLU and RMSNorm by the identity rule; the gated RMSNorm's product
``y * silu(z)`` split in half (AttnLRP) or the gate held constant (CP-LRP), its normalising factor
held constant."""

import lrpcpp
import pytest
import torch
import transformers as tfm
from lrpcpp.models import patching
from models import attribute_ruled, bias_free, build_from_defaults
from torch.nn import functional as F

VOCAB = 40
METHODS = ["attnlrp", "cp-lrp"]


def build(seed: int = 0):
    """A random float64 Mamba2 of 2 layers, 4 heads in 2 groups, whose chunked scan runs over 2 chunks of 4
    positions. Every parameter is a float32 number (stored in float64): transformers computes the scan and
    the norms in float32."""
    torch.manual_seed(seed)
    config = tfm.Mamba2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        state_size=4,
        expand=2,
        num_heads=4,
        head_dim=8,
        n_groups=2,
        conv_kernel=3,
        chunk_size=4,
        num_hidden_layers=2,
        residual_in_fp32=False,
        use_bias=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = tfm.Mamba2ForCausalLM(config).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
            elif name.endswith("D") or name.endswith("bias") or name.endswith("norm.weight"):
                p.normal_(0.5, 0.3)
            p.copy_(p.float().double())
    return model


def ids(batch: int = 2, seq: int = 7):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- the reference
def identity_rule(x, y):
    """``y = f(x)`` with the relevance of the output passed to the input unchanged: in gradient
    times input, the gradient ``y / x`` held constant."""
    return x * (y / x).detach()


def rms_norm(norm, x, groups: int = 1):
    """``x`` normalised by its root mean square over each of ``groups`` groups of the last dim, times the
    weight, with the normalising factor held constant."""
    g = x.reshape(*x.shape[:-1], groups, -1)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).detach()
    return norm.weight * g.reshape(x.shape)


def product(y, gate, method):
    if method == "attnlrp":  # half of the relevance of the product to each factor
        return 0.5 * (y * gate.detach()) + 0.5 * (y.detach() * gate)
    return y * gate.detach()  # the gate held constant


def mixer(m, x, method):
    """One Mamba2 mixer under MambaLRP, from its parameters, as a recurrence over the positions (not
    transformers' chunked form): ``h_t = exp(Δ_t A) h_(t-1) + Δ_t B_t x_t``, ``y_t = C_t h_t + D x_t``
    per head, with Δ, B and C held constant."""
    batch, seq = x.shape[:2]
    heads, state = m.A_log.shape[0], m.ssm_state_size
    inner, conv_dim = m.out_proj.in_features, m.conv1d.in_channels
    groups = (conv_dim - inner) // (2 * state)
    z, xbc, dt = F.linear(x, m.in_proj.weight, m.in_proj.bias).split([inner, conv_dim, heads], dim=-1)
    k = m.conv1d.weight.shape[-1]
    xbc = F.conv1d(xbc.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=k - 1, groups=conv_dim)
    xbc = xbc[..., :seq].transpose(1, 2)
    xbc = identity_rule(xbc, F.silu(xbc))
    u, B, C = xbc.split([inner, groups * state, groups * state], dim=-1)
    B, C = (t.detach().reshape(batch, seq, groups, 1, state) for t in (B, C))
    B, C = (t.expand(-1, -1, -1, heads // groups, -1).reshape(batch, seq, heads, state) for t in (B, C))
    dt = F.softplus(dt.detach() + m.dt_bias).clamp(*m.time_step_limit)  # [batch, seq, heads]
    A = -torch.exp(m.A_log)
    u = u.reshape(batch, seq, heads, -1)
    h = torch.zeros(batch, heads, u.shape[-1], state, dtype=x.dtype)
    ys = []
    for t in range(seq):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        h = decay * h + (dt[:, t, :, None, None] * u[:, t, :, :, None]) * B[:, t, :, None, :]
        ys.append((h @ C[:, t, :, :, None])[..., 0] + m.D[:, None] * u[:, t])
    y = torch.stack(ys, dim=1).reshape(batch, seq, inner)
    gate = identity_rule(z, F.silu(z))
    norm = m.norm
    y = rms_norm(norm, product(y, gate, method), inner // getattr(norm, "group_size", inner))
    return F.linear(y, m.out_proj.weight, m.out_proj.bias)


def reference(model, input_ids, target, method):
    """MambaLRP on the whole model, in gradient times input: (input relevance, explained logit)."""
    backbone = model.backbone
    x = backbone.embeddings.weight[input_ids].detach().clone().requires_grad_()
    h = x
    for block in backbone.layers:
        h = h + mixer(block.mixer, identity_rule(h, block.norm(h)), method)
    logits = identity_rule(h, backbone.norm_f(h)) @ model.lm_head.weight.T
    out = logits[:, -1].gather(1, target[:, None])[:, 0]
    out.sum().backward()
    return x * x.grad, out.detach()


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("method", METHODS)
def test_mamba2_relevance_is_the_mambalrp_reference(method):
    model, input_ids = build(), ids()
    got = attribute_ruled(model, input_ids=input_ids, method=method, epsilon=0.0)  # level="auto"
    want, logit = reference(model, input_ids, got.target, method)
    # transformers computes the scan and the norms in float32: the reference, in float64, agrees to that
    torch.testing.assert_close(got.output.double(), logit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.relevance, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_mamba2_conserves_without_biases(method):
    # the scan (with Δ, B, C constant) and the D skip are linear, the norms and SiLUs identity rules, the
    # gate a product: on a bias-free model the relevance of the input sums to the logit (up to the
    # float32 computations in the scan). The biases (of the convolution, in_proj, out_proj) absorb a
    # share otherwise; the step size's bias is held constant with the step size.
    model, input_ids = bias_free(build()), ids()
    got = attribute_ruled(model, input_ids=input_ids, method=method)
    torch.testing.assert_close(got.relevance.sum((1, 2)).float(), got.output, rtol=1e-5, atol=0)
    with_bias = attribute_ruled(build(), input_ids=input_ids, method=method)
    assert not torch.allclose(with_bias.relevance.sum((1, 2)).float(), with_bias.output, rtol=1e-2)


def test_mamba2_coverage_and_forward_are_unchanged():
    model, input_ids = build(), ids()
    x = model.get_input_embeddings()(input_ids).detach()
    with torch.no_grad():
        plain = model(inputs_embeds=x).logits
    got = attribute_ruled(model, input_ids=input_ids, strict=True)
    assert got.coverage.unruled == {} and got.coverage.seen > 0
    ruled = dict(got.coverage.ruled)
    # no rule reaches Δ, B or C (the clamp of the step size is not seen with relevance): the identity rule on
    # 3 RMSNorms and 4 SiLUs (after each mixer's convolution and on its gate: modules in transformers 4.x,
    # F.silu calls in 5.x); per mixer one gate product and, in its gated norm, the normalising factor held
    assert ruled.pop("torch.ops.lrpcpp.gi_identity") + ruled.pop("torch.nn.functional.silu", 0) == 7
    assert ruled == {"Tensor.mul": 2, "Tensor.pow": 2, "torch.rsqrt": 2}
    with lrpcpp.patch(model, level="operations", strict=True) as handle:
        assert handle.patched["backbone.layers.0.mixer"].startswith("step size and B, C held constant")
        patched = model(inputs_embeds=x.clone().requires_grad_()).logits
    assert torch.equal(patched, plain)
    assert torch.equal(got.output, plain[:, -1].gather(1, got.target[:, None])[:, 0])
    assert "forward" not in model.backbone.layers[0].mixer.__dict__


def test_mamba2_rule_differs_from_the_plain_operation_level(monkeypatch):
    # without the held scan parameters (the mixer's forward unpatched), the products of Δ, B and C with the
    # sequence are split and the clamp of Δ takes the identity rule: another relevance
    model, input_ids = build(), ids()
    got = attribute_ruled(model, input_ids=input_ids)
    monkeypatch.setattr(patching, "_patch_chunked_scan", lambda *args: None)
    plain = lrpcpp.attribute(model, input_ids=input_ids, strict=True)
    assert plain.coverage.ruled["torch.clamp"] == 2
    assert (got.relevance - plain.relevance).norm() > 0.01 * got.relevance.norm()


def _bamba():
    torch.manual_seed(0)
    config = tfm.BambaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_indices=[1],
        mamba_n_heads=8,
        mamba_d_head=8,
        mamba_n_groups=1,
        mamba_d_state=16,
        mamba_chunk_size=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return tfm.BambaForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["falcon_h1", "bamba"])
def test_a_hybrid_of_attention_and_mamba2_mixers_holds_its_scan_parameters(family):
    # FalconH1: attention and a Mamba2 mixer side by side in each layer; Bamba: a Mamba2 layer, then an
    # attention layer. Under transformers 4.x their mixers' torch-only scans name their first argument
    # input_states, the forward's hidden_states, and Bamba's forward takes seq_idx besides (fused kernels only)
    model = build_from_defaults("falcon_h1") if family == "falcon_h1" else _bamba()
    input_ids = ids()
    with lrpcpp.patch(model) as handle:
        assert handle.level == "operations"
        assert any("step size and B, C held constant" in what for what in handle.patched.values()), handle.patched
    got = attribute_ruled(model, input_ids=input_ids)
    assert got.coverage.unruled == {}
    assert torch.isfinite(got.relevance).all() and got.relevance.abs().sum() > 0
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, -1]
    torch.testing.assert_close(logits.gather(1, got.target[:, None])[:, 0], got.output, rtol=1e-5, atol=1e-6)

"""A forward that writes into its input in place (CTRL scales its embeddings with ``*=``): the model
gets a copy of the relevance leaf, so autograd accepts the write, the relevance is that of the
out-of-place forward, and the caller's tensor is left as it was."""

import lrpcpp
import pytest
import torch
import transformers as tfm
from torch import nn


class _Scaled(nn.Module):
    def __init__(self, in_place: bool):
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.mix, self.head = nn.Linear(6, 6), nn.Linear(6, 3)
        self.in_place = in_place

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None):
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if self.in_place:
            h *= 3.0
        else:
            h = h * 3.0
        return self.head(torch.tanh(self.mix(h)) * h).mean(1)


class _ScaledIds(_Scaled):
    # a forward without inputs_embeds: the embedding module's output is the leaf
    def forward(self, input_ids):
        return super().forward(input_ids=input_ids)


@pytest.mark.parametrize("level", ["registry", "operations"])
@pytest.mark.parametrize("given", ["inputs_embeds", "input_ids", "input_ids, hooked"])
def test_a_forward_may_write_into_its_input(given, level):
    torch.manual_seed(0)
    cls = _ScaledIds if given == "input_ids, hooked" else _Scaled
    model, reference = cls(in_place=True).double(), cls(in_place=False).double()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 20, (2, 5))
    if given == "inputs_embeds":
        x = torch.randn(2, 5, 6, dtype=torch.float64)
        kept = x.clone()
        got = lrpcpp.attribute(model, inputs_embeds=x, level=level)
        want = lrpcpp.attribute(reference, inputs_embeds=x, level=level)
        assert torch.equal(x, kept)
    else:
        got = lrpcpp.attribute(model, input_ids=ids, level=level)
        want = lrpcpp.attribute(reference, input_ids=ids, level=level)
    assert torch.equal(got.relevance, want.relevance)
    assert torch.equal(got.output, want.output)


def test_ctrl_is_explained():
    torch.manual_seed(0)
    config = tfm.CTRLConfig(vocab_size=50, n_embd=16, n_layer=2, n_head=4, dff=32, n_positions=32)
    model = tfm.CTRLLMHeadModel(config).double().eval()
    ids = torch.randint(0, 50, (1, 7))
    got = lrpcpp.attribute(model, input_ids=ids)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    assert torch.equal(got.output[0], logits.max())
    assert torch.isfinite(got.relevance).all() and got.coverage is not None and not got.coverage.unruled

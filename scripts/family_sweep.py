#!/usr/bin/env python
"""Every causal language model of the installed transformers (or every encoder's sequence classifier,
or every image classifier), explained by ``lrpcpp.attribute``: which ones lrpcpp explains with a rule
for every relevance-carrying call, which calls it has no rule for, and which models fail, and where.

Run from the repository root::

    PYTHONPATH=python .venv/bin/python scripts/family_sweep.py [--task TASK] [--only gpt2 bloom ...]
        [--json FILE]

The models of a task, by model type, and what is explained:

* ``causal-lm`` (the default): ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, the top next-token logit after
  10 random token ids;
* ``sequence-classification``: ``MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES`` of the types that
  have no causal language model (the encoders), the top class of 10 random token ids;
* ``image-classification``: ``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES``, the top class of a random
  image of 64 x 64 pixels.

Each is built from its config's defaults, made small (hidden size 32, 2 layers, 4 heads, ...: the
attributes below, where the config or a multimodal config's text and vision configs have them; a
hybrid keeps a layer of each kind, a layer sized apart keeps its sizes in proportion, and a model
sized per stage keeps its stages), with random weights in float32, and explained with
``level="auto"`` (the registry where a family entry describes the model, else the operation level),
with ``use_cache=False`` (in the config, and as an argument where the forward takes it), for the model's
own call as well.
One forked process per model, so that a model that needs much memory or time (``--timeout``) does not
stop the sweep. Each model ends in one of:

* ``explained``: the explained value is the model's own logit and the relevance is finite, with a rule
  for every call (``coverage.unruled`` empty at the operation level);
* ``unruled``: explained, with the calls that kept their plain gradient named;
* ``lrpcpp error``: the attribution raised, though the model's own forward runs;
* ``model``: the model could not be built from its small config, or its own forward fails on it
  (a sweep's limit, not lrpcpp's: nested configs, required extra inputs, ...);
* ``timeout`` or ``crash``.
"""

import argparse
import inspect
import json
import os
import resource
import signal
import sys
import time
import traceback
import warnings

import lrpcpp
import torch
import transformers as tfm
from transformers import CONFIG_MAPPING, PretrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=128,
    vocab_size_per_layer_input=128,  # (Gemma 3n's and 4's per-layer embeddings)
    max_position_embeddings=128,
    n_embd=32,
    n_layer=2,
    n_head=4,
    d_model=32,
    n_positions=128,
    ffn_dim=64,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    moe_intermediate_size=32,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    shared_expert_intermediate_size=32,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    qk_head_dim=16,
    v_head_dim=8,
    n_shared_experts=1,
    n_group=1,  # (the routing groups of the experts)
    topk_group=1,
    moe_topk=2,
    expert_ffn_hidden_size=32,
    ffn_hidden_size=64,
    rotary_dim=4,
    attention_hidden_size=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    pooler_hidden_size=32,
    embedding_size=32,
    embedding_dim=32,
    num_blocks=2,
    attn_layer_period=2,  # hybrids of state-space and attention layers: an attention layer among 2
    attn_layer_offset=1,
    attn_layer_indices=[1],
    expert_layer_period=2,
    expert_layer_offset=1,
    window_size=2,  # (Swin: a window within the last stage of an image of IMAGE_SIZE)
    mamba_n_heads=8,  # (times mamba_d_head: mamba_expand x hidden_size)
    mamba_d_head=8,
    mamba_d_ssm=64,
    mamba_d_state=16,
    mamba_dt_rank=8,
    mamba_chunk_size=16,
    sliding_window=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MEMORY_LIMIT = 12 << 30  # address space of one model's process
# the model classes of each task by model type
TASKS = {
    "causal-lm": dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    "sequence-classification": {
        t: c
        for t, c in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.items()
        if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    },
    "image-classification": dict(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES),
}
IMAGE_SIZE = 64  # the image size of every config that has one


def small(config) -> None:
    """``config`` and its sub-configs (a multimodal model's text and vision configs) with the sizes of
    ``SMALL`` where they have them (not where they have one per stage: a list), and images of
    ``IMAGE_SIZE``; every kind of layer of its ``layer_types`` kept, and the layers that a heterogeneous
    config sizes apart (Gemma 4's full-attention heads) kept apart, their sizes scaled alike."""
    spec = vars(config).get("_heterogeneity_spec")  # (transformers 5's per_layer_config)
    if spec is not None:
        overrides = spec.per_layer_overrides
        config.per_layer_config = None  # homogeneous while the global sizes are set
        before = {key: getattr(config, key, None) for layer in overrides.values() for key in layer}
        _small_sizes(config)
        kept = {i: _scaled(layer, before, config) for i, layer in overrides.items() if i < config.num_hidden_layers}
        if kept:
            config.per_layer_config = kept
        return
    _small_sizes(config)


def _scaled(layer: dict, before: dict, config) -> dict:
    """A layer's own sizes in the ratio to the global ones that they had before ``small``."""
    scaled = {}
    for key, value in layer.items():
        old, new = before.get(key), getattr(config, key, None)
        same_kind = all(type(v) is int for v in (value, old, new))
        scaled[key] = max(1, round(new * value / old)) if same_kind and old else value
    return scaled


# the sizes that a config with sizes per stage (a list: ConvNeXt's, Swin's) derives from those lists
_PER_STAGE = ("depths", "hidden_sizes")
_OF_THE_STAGES = ("num_hidden_layers", "num_layers", "num_stages", "hidden_size")


def _small_sizes(config) -> None:
    staged = any(isinstance(getattr(config, k, None), (list, tuple)) for k in _PER_STAGE)
    # latent attention's head size: the rotary part (DeepSeek-V3's) or the whole query head (Mistral 4's)
    head, nope, rope = (getattr(config, k, None) for k in ("head_dim", "qk_nope_head_dim", "qk_rope_head_dim"))
    whole_head = all(type(v) is int for v in (head, nope, rope)) and head == nope + rope
    for key, value in SMALL.items():
        if staged and key in _OF_THE_STAGES:
            continue
        if hasattr(config, key) and not isinstance(getattr(config, key), (list, tuple)):
            try:
                setattr(config, key, value)
            except Exception:  # a derived or validated attribute: the default stays
                pass
    size = getattr(config, "image_size", None)  # (an int, or a height and a width)
    if size is not None:
        config.image_size = type(size)([IMAGE_SIZE] * len(size)) if isinstance(size, (list, tuple)) else IMAGE_SIZE
    if getattr(config, "kv_lora_rank", None):  # multi-head latent attention: a key and a value per head
        config.num_key_value_heads = config.num_attention_heads
    if whole_head:
        config.head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    if all(hasattr(config, k) for k in ("expand", "num_heads", "head_dim", "n_groups")):
        # a Mamba2 mixer: its heads span expand x hidden_size
        config.num_heads, config.n_groups = config.expand * config.hidden_size // config.head_dim, 1
    layers = getattr(config, "num_hidden_layers", None)
    for key in ("layer_types", "block_types"):  # (a CNN's layer types are its stages' kinds)
        types = getattr(config, key, None)
        if types is not None and layers is not None:
            kinds = set(types)  # the first layers, up to the first of each kind (a hybrid's attention layer)
            n = next((i for i in range(layers, len(types) + 1) if set(types[:i]) == kinds), len(types))
            # Gemma 3n's last layers reuse the keys and values of the first: as many again, to reuse them
            shared = bool(getattr(config, "num_kv_shared_layers", 0))
            try:
                setattr(config, key, types[:n] * (1 + shared))
                config.num_hidden_layers = n * (1 + shared)
                if shared:
                    config.num_kv_shared_layers = n
            except AttributeError:  # derived from other attributes
                pass
    for value in list(vars(config).values()):
        if isinstance(value, PretrainedConfig):
            small(value)


def build(model_type: str, task: str = "causal-lm") -> torch.nn.Module:
    config = CONFIG_MAPPING[model_type]()
    small(config)
    name = TASKS[task][model_type]
    cls = getattr(tfm, name if isinstance(name, str) else name[0])
    if not isinstance(config, cls.config_class):  # a multimodal config's language model
        config = config.get_text_config(decoder=True)
    if config.is_encoder_decoder and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = config.pad_token_id  # (the decoder's first input, T5's convention)
    if hasattr(config, "use_cache"):
        # (also for a forward that passes it on in **kwargs: a cache made for the default layers of an
        # all-state-space Granite 4 model fails)
        config.use_cache = False
    if task == "causal-lm":
        config.is_decoder = True  # (an encoder's language model head is a decoder's: a causal mask)
    torch.manual_seed(0)
    try:
        config._attn_implementation = "sdpa"
        model = cls(config)
    except ValueError:  # no sdpa implementation
        config._attn_implementation = "eager"
        model = cls(config)
    return model.eval()


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:240]}"


def explain(model_type: str, task: str = "causal-lm") -> dict:
    """The outcome for one model type (run in the child process)."""
    try:
        model = build(model_type, task)
        if task == "image-classification":
            channels = getattr(model.config, "num_channels", 3)
            inputs = dict(pixel_values=torch.randn(1, channels, IMAGE_SIZE, IMAGE_SIZE))
        else:
            inputs = dict(input_ids=torch.randint(3, 100, (1, 10)))
            eos = getattr(model.config, "eos_token_id", None)
            if task == "sequence-classification" and isinstance(eos, int):
                inputs["input_ids"][0, -1] = eos  # (T5's classifiers read the last one's state)
        if "use_cache" in inspect.signature(model.forward).parameters:
            inputs["use_cache"] = False  # (one forward, nothing generated: RWKV's cache breaks the backward)
        with torch.no_grad():
            logits = model(**inputs).logits[0]
            if task == "causal-lm":
                logits = logits[-1]  # the next token's
    except Exception as e:
        return dict(outcome="model", why=_short(e))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unruled calls are read from the coverage
        try:
            got = lrpcpp.attribute(model, **inputs)
        except Exception as e:
            frame = traceback.extract_tb(e.__traceback__)[-1]
            return dict(outcome="lrpcpp error", why=_short(e), where=f"{frame.filename}:{frame.lineno}")
    level = "registry" if got.coverage is None else "operations"
    checks = dict(
        level=level,
        finite=bool(torch.isfinite(got.relevance).all()),
        value=bool(torch.allclose(got.output[0], logits[got.target[0]], rtol=1e-4, atol=1e-5)),
    )
    unruled = dict(got.coverage.unruled) if got.coverage is not None else {}
    if not (checks["finite"] and checks["value"]):
        return dict(outcome="lrpcpp error", why=f"checks failed: {checks}", **checks)
    return dict(outcome="unruled" if unruled else "explained", unruled=unruled, **checks)


def run_forked(model_type: str, task: str, timeout: float) -> dict:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one model, its result as one JSON line on the pipe
        os.close(read)
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        try:
            result = explain(model_type, task)
        except BaseException as e:  # (MemoryError and the like: reported, not raised in a fork)
            result = dict(outcome="crash", why=_short(e))
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    start = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - start > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read)
            return dict(outcome="timeout", why=f"over {timeout:.0f} s")
        time.sleep(0.1)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    if not data:
        return dict(outcome="crash", why=f"exit status {status}")
    return json.loads(data)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), default="causal-lm", help="models to sweep (default causal-lm)")
    ap.add_argument("--only", nargs="+", default=None, help="model types to run (default: all)")
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per model (default 150)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    types = sorted(TASKS[args.task])
    unknown = sorted(set(args.only or ()) - set(types))
    if unknown:
        ap.error(f"not {args.task} model types of transformers {tfm.__version__}: {', '.join(unknown)}")
    results = {}
    for i, model_type in enumerate(t for t in types if not args.only or t in args.only):
        results[model_type] = result = run_forked(model_type, args.task, args.timeout)
        detail = result.get("why") or ", ".join(f"{n} x{c}" for n, c in sorted(result.get("unruled", {}).items()))
        print(f"[{i + 1}] {model_type}: {result['outcome']}" + (f" ({detail})" if detail else ""), flush=True)
    counts: dict = {}
    for result in results.values():
        counts[result["outcome"]] = counts.get(result["outcome"], 0) + 1
    versions = f"transformers {tfm.__version__}, torch {torch.__version__}"
    print(f"{versions}, {args.task}: {len(results)} model types: {counts}")
    if args.json:
        with open(args.json, "w") as f:
            summary = dict(transformers=tfm.__version__, torch=torch.__version__, task=args.task, results=results)
            json.dump(summary, f, indent=1)
    return 1 if counts.get("lrpcpp error") else 0


if __name__ == "__main__":
    sys.exit(main())

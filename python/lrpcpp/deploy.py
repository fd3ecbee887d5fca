"""Deploying explainable models: TorchScript archives, ``torch.export`` programs and ``torch.compile``.

A model patched by :func:`lrpcpp.patch` in gradient-times-input mode computes relevance in its
ordinary backward pass, through native ``lrpcpp::`` operators whose backward is C++. Traced or
exported in that state, it keeps those operators, so the saved model explains itself wherever the
lrpcpp library is loaded: in Python after ``import lrpcpp``, in C++ by linking ``liblrpcpp``; no
patching code runs there.

* :func:`export_archive`: a Hugging Face model (or any model that takes ``inputs_embeds``) to a
  TorchScript archive with the signature ``(inputs_embeds, attention_mask) -> logits``.
* :func:`export_program`: the same model as a ``torch.export`` program saved as ``.pt2``, with a
  dynamic batch and sequence length; a model of several inputs as :class:`ExplainableInputs`.
* :func:`attribute_deployed`: relevance through any such module (loaded archive, exported program,
  or a compiled wrapper), computed as :func:`lrpcpp.attribute` computes it.
* :func:`compile_attribute`: :func:`lrpcpp.attribute` with the patched model compiled by
  ``torch.compile(fullgraph=True)``, reusing the compiled graphs from call to call.
"""

import contextlib
import inspect
import json
import os
import sys
import warnings
import zipfile
from types import MappingProxyType
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import Tensor, nn

from ._build_info import VERSION
from .attribution import (
    Attribution,
    Target,
    attribute,
    attribution_of,
    decoder_mask,
    embedded,
    explaining,
    input_leaf,
    input_leaves,
    is_causal_decoder,
    last_positions,
    logits_of,
    position_ids,
    relevance_backward,
    relevance_of,
    select_target,
)
from .attribution import (
    model_kwargs as model_kwargs_of,
)
from .models.patching import METHODS
from .models.tracking import bodies_run, op_name

__all__ = [
    "ExplainableModel",
    "ExplainableInputs",
    "export_archive",
    "export_program",
    "archive_info",
    "attribute_deployed",
    "compile_attribute",
    "CompiledAttribute",
    "ExplainableArchive",
    "LrpcppRequired",
    "ARCHIVE_INFO_FILE",
    "MISSING_OPERATORS_MESSAGE",
]

#: name of the JSON record that :func:`export_archive` stores in the archive (an "extra file")
ARCHIVE_INFO_FILE = "lrpcpp.json"

#: what loading an archive says when the lrpcpp operators are not registered
MISSING_OPERATORS_MESSAGE = (
    "This archive calls lrpcpp operators, which are registered by the lrpcpp library: "
    "run `import lrpcpp` before torch.jit.load (in C++, link liblrpcpp, CMake target lrpcpp::lrpcpp)"
)

# relative tolerance of the check that an exported model reproduces lrpcpp.attribute
_CHECK_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _takes_use_cache(model: nn.Module) -> bool:
    """Whether ``model``'s forward has a ``use_cache`` argument (a Hugging Face decoder's cache, which
    the exported forms turn off)."""
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


class ExplainableModel(nn.Module):
    """``(inputs_embeds, attention_mask) -> logits`` of ``model``: the signature of every exported form.

    ``model`` is called as ``model(inputs_embeds=..., attention_mask=...)`` (with ``use_cache=False``
    where it takes that argument, and for a causal decoder ``position_ids`` counted over the unmasked
    tokens, as :func:`lrpcpp.attribute` passes them) and its ``.logits`` returned: ``[batch, seq,
    vocab]`` for a language model, ``[batch, classes]`` for a classifier. A model that returns a tensor
    is taken to return the logits themselves.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._use_cache = _takes_use_cache(model)
        self._causal = is_causal_decoder(model)

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        extra: Dict[str, Any] = {"use_cache": False} if self._use_cache else {}
        positions = position_ids(self.model, self._causal, attention_mask)
        if positions is not None:  # a left-padded row has the positions it has alone
            extra["position_ids"] = positions
        return logits_of(self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **extra))


class ExplainableInputs(nn.Module):
    """``(inputs) -> output`` of ``model`` for several inputs: the form :func:`export_program` exports
    when it is given more than one input.

    ``inputs`` is a dict of tensors by the model's keywords: each relevance input (``inputs_embeds``,
    ``pixel_values``, ``decoder_inputs_embeds``), the masks (``attention_mask``,
    ``decoder_attention_mask``) and, for a model whose forward takes no ``inputs_embeds`` (CLIP),
    ``input_ids`` as well, while ``embedding`` (the module that embeds them) returns ``inputs_embeds``
    in their place. The model's output is returned as it is (a Hugging Face model's ``ModelOutput``),
    so that :func:`attribute_deployed` picks the explained value from it as :func:`lrpcpp.attribute`
    does (a callable target gets the whole output).
    """

    def __init__(self, model: nn.Module, embedding: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.embedding = embedding
        self._use_cache = _takes_use_cache(model)
        self._causal = is_causal_decoder(model)

    def forward(self, inputs: Dict[str, Tensor]):
        kwargs: Dict[str, Any] = dict(inputs)
        if self._use_cache:
            kwargs["use_cache"] = False
        mask = kwargs.get("attention_mask")
        if mask is not None and "inputs_embeds" in kwargs and "position_ids" not in kwargs:
            positions = position_ids(self.model, self._causal, mask)
            if positions is not None:
                kwargs["position_ids"] = positions
        if self.embedding is None:
            return self.model(**kwargs)
        embeds = kwargs.pop("inputs_embeds")
        # the embedding's output replaced by inputs_embeds (the ids reach it reshaped, so no test of
        # which ids it got can be traced; export_program's check compares the relevance instead)
        hook = self.embedding.register_forward_hook(lambda m, args, out: embeds)
        try:
            return self.model(**kwargs)
        finally:
            hook.remove()


class LrpcppRequired(nn.Module):
    """The first part of an archive that ``torch.jit.load`` compiles.

    It is never called. Loading compiles the archive's code, and an operator that is not registered
    fails that compilation with TorchScript's "Unknown builtin op" error, which quotes the lines
    around the call. This module holds the first such call, next to the line that says what to do,
    so the error reads as :data:`MISSING_OPERATORS_MESSAGE`.
    """

    __constants__ = ["message"]

    def __init__(self):
        super().__init__()
        self.message = MISSING_OPERATORS_MESSAGE

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.lrpcpp.gi_grad_scale(x, x)
        if y.dim() < 0:
            raise RuntimeError(self.message)
        return y


class _NoEmbedding(nn.Module):
    def forward(self, input_ids: Tensor) -> Tensor:
        raise RuntimeError("this archive holds no input embeddings: the model had none; pass inputs_embeds")


class ExplainableArchive(nn.Module):
    """The module saved by :func:`export_archive`: ``forward(inputs_embeds, attention_mask) -> logits``
    runs the traced :class:`ExplainableModel`; ``embed(input_ids) -> inputs_embeds`` the model's
    input embeddings. :class:`LrpcppRequired` comes first (submodules are compiled in the order they
    were set)."""

    def __init__(self, required: nn.Module, model: nn.Module, embedding: nn.Module):
        super().__init__()
        self.lrpcpp_required = required
        self.model = model
        self.embedding = embedding

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(inputs_embeds, attention_mask)

    @torch.jit.export
    def embed(self, input_ids: Tensor) -> Tensor:
        return self.embedding(input_ids)


# ----------------------------------------------------------------------------- inputs
def _example(
    model: nn.Module,
    input_ids: Optional[Tensor],
    inputs_embeds: Optional[Tensor],
    attention_mask: Optional[Tensor],
    caller: str,
):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"{caller}: give exactly one of input_ids and inputs_embeds (the example input)")
    if inputs_embeds is None:
        embedding = _input_embeddings(model)
        if embedding is None:
            raise ValueError(f"{caller}: {type(model).__name__} has no input embeddings; pass inputs_embeds")
        with torch.no_grad():
            inputs_embeds = embedding(input_ids)
    inputs_embeds = inputs_embeds.detach()
    if inputs_embeds.dim() != 3 or not inputs_embeds.is_floating_point():
        raise ValueError(
            f"{caller}: the example embeddings must be a floating-point [batch, seq, hidden] tensor, "
            f"got {inputs_embeds.dtype} of shape {tuple(inputs_embeds.shape)}"
        )
    if attention_mask is None:
        attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
    if tuple(attention_mask.shape) != tuple(inputs_embeds.shape[:2]):
        raise ValueError(
            f"{caller}: attention_mask must be [batch, seq] = {tuple(inputs_embeds.shape[:2])}, "
            f"got {tuple(attention_mask.shape)}"
        )
    return inputs_embeds, attention_mask


def _input_embeddings(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except NotImplementedError:
        embedding = None
    return embedding if isinstance(embedding, nn.Module) else None


def _check_method(method: str, caller: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{caller}: method must be one of {METHODS}, got {method!r}")


def _info(
    model: nn.Module, embeds: Tensor, logits: Tensor, method: str, epsilon: Optional[float], form: str, level: str
):
    config = getattr(model, "config", None)
    language_model = logits.dim() == 3
    return {
        "format": form,
        "format_version": 1,
        "lrpcpp": VERSION,
        "torch": torch.__version__,
        "method": method,
        "mode": "gradient",
        "level": level,
        "epsilon": 1e-10 if epsilon is None else epsilon,
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "dtype": str(embeds.dtype).replace("torch.", ""),
        "hidden_size": int(embeds.shape[-1]),
        "example_shape": [int(embeds.shape[0]), int(embeds.shape[1])],
        "inputs": ["inputs_embeds [batch, seq, hidden]", "attention_mask [batch, seq]"],
        "output": "next-token logits [batch, seq, vocab]" if language_model else "class logits [batch, classes]",
        "relevance": "seed the explained logit with 1; relevance = inputs_embeds * inputs_embeds.grad",
    }


# ----------------------------------------------------------------------------- relevance
def attribute_deployed(
    module: Callable[..., Any],
    inputs_embeds: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    target: Target = None,
    **inputs: Tensor,
) -> Attribution:
    """Relevance of ``inputs_embeds`` through a deployed model: one forward and one backward pass.

    ``module`` maps ``(inputs_embeds, attention_mask)`` to logits: an archive loaded with
    ``torch.jit.load``, ``torch.export.load(path).module()``, or ``ExplainableModel(model)`` of a
    patched (and possibly compiled) model. ``target`` and the result are as in
    :func:`lrpcpp.attribute` (a callable target receives the logits): the explained logit is seeded
    with 1 and the relevance is ``inputs_embeds * inputs_embeds.grad``.

    A program of several inputs (:class:`ExplainableInputs`, from :func:`export_program`) takes
    them as keyword arguments, under the names of its example (``inputs_embeds``, ``pixel_values``,
    ``decoder_inputs_embeds``, ``attention_mask``, ``decoder_attention_mask``, ``input_ids``): each
    floating-point input is a relevance leaf, and ``Attribution.inputs`` holds the relevance of each
    by its name, in that order (``relevance`` is the first's). A callable target receives the
    model's output; the default target of an encoder-decoder follows ``decoder_attention_mask``.
    """
    caller = "lrpcpp.deploy.attribute_deployed"
    if inputs:
        return _attribute_inputs(module, inputs_embeds, attention_mask, target, inputs, caller)
    leaf = input_leaf(inputs_embeds, "inputs_embeds", caller)
    if attention_mask is None:
        attention_mask = torch.ones(leaf.shape[:2], dtype=torch.long, device=leaf.device)
    with torch.enable_grad():
        logits = module(leaf, attention_mask)
        explained, ids = select_target(logits, target, attention_mask, leaf.shape[0])
    k = len(target) if isinstance(target, (list, tuple)) else None
    (grad,) = relevance_backward(explained, [leaf], explicit=False, many=k is not None)
    return attribution_of(relevance_of(leaf, grad, False, k), explained, ids, "inputs_embeds")


# the inputs of a program of several inputs, in the order of Attribution.inputs; the others are masks and ids
_LEAVES = ("inputs_embeds", "pixel_values", "decoder_inputs_embeds")


def _attribute_inputs(module, inputs_embeds, attention_mask, target, inputs, caller) -> Attribution:
    unknown = sorted(set(inputs) - set(_LEAVES) - {"decoder_attention_mask", "input_ids"})
    if unknown:
        raise TypeError(
            f"{caller}: unexpected input(s) {unknown}; a program of several inputs takes {', '.join(_LEAVES)}, "
            "attention_mask, decoder_attention_mask and input_ids"
        )
    given = dict(inputs, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
    leaves = {n: input_leaf(given[n], n, caller) for n in _LEAVES if given.get(n) is not None}
    if not leaves:
        raise ValueError(f"{caller}: no input to explain; give one or more of {', '.join(_LEAVES)}")
    others = {n: v for n, v in given.items() if n not in leaves and v is not None}
    many = isinstance(target, (list, tuple))
    decoder = leaves.get("decoder_inputs_embeds")
    target_mask = attention_mask if decoder is None else others.get("decoder_attention_mask")
    batches = {t.shape[0] for t in leaves.values()}
    with torch.enable_grad():
        out = module(dict(leaves, **others))
        explained, ids = select_target(out, target, target_mask, batches.pop() if len(batches) == 1 else None)
    k = len(target) if many else None
    grads = relevance_backward(explained, list(leaves.values()), explicit=False, many=many)
    relevances = {n: relevance_of(t, g, False, k).detach() for (n, t), g in zip(leaves.items(), grads)}
    first = next(iter(relevances))
    result = attribution_of(relevances[first], explained, ids, first)
    result.inputs = relevances
    return result


def _check(
    deployed,
    model: nn.Module,
    embeds: Tensor,
    mask: Tensor,
    method: str,
    epsilon: Optional[float],
    what: str,
    level: str = "auto",
    strict: bool = False,
    target: Target = None,
) -> None:
    """The deployed model must give lrpcpp.attribute's relevance on the example; on a shorter
    sequence it should too (a trace that fixed the length only warns)."""
    cases = [(embeds, mask, True)]
    if embeds.shape[1] > 1:
        cases.append((embeds[:, :-1], mask[:, :-1], False))
    for x, m, required in cases:
        expected = attribute(
            model,
            inputs_embeds=x,
            attention_mask=m,
            target=target,
            method=method,
            epsilon=epsilon,
            level=level,
            strict=strict,
        )
        try:
            explained = expected.target if target is None else target
            got = attribute_deployed(deployed, x, m, target=explained).relevance
            scale = float(expected.relevance.abs().max()) or 1.0
            error = float((got - expected.relevance).abs().max()) / scale
        except Exception:  # noqa: BLE001 - a failure on the shorter input is reported as a warning below
            if required:
                raise
            error = float("inf")
        tol = _CHECK_RTOL.get(x.dtype, 1e-2)
        if error <= tol:
            continue
        if required:
            raise RuntimeError(
                f"lrpcpp.deploy: the {what} does not reproduce lrpcpp.attribute on the example "
                f"input (relative error {error:.2e} > {tol:.0e}); the model's forward may contain "
                "code that tracing cannot record"
            )
        warnings.warn(
            f"lrpcpp.deploy: the {what} does not reproduce lrpcpp.attribute on a shorter sequence "
            f"({x.shape[1]} instead of {embeds.shape[1]} tokens): it may be specialised to the example "
            "length; give it inputs of that length",
            stacklevel=3,
        )


def _traced_example(handle, embeds: Tensor) -> Tensor:
    """The example embeddings as the trace sees them. At the operation level the rules are chosen
    by which tensors carry relevance (require grad), so the traced example must carry it too; the
    registry level's patch does not depend on it."""
    if handle.level == "operations":
        return embeds.detach().clone().requires_grad_()
    return embeds


@contextlib.contextmanager
def _masks_without_vmap():
    """Transformers 4.x builds a decoder's 4D attention mask (``masking_utils.sdpa_mask_recent_torch``,
    also under its eager mask) with ``torch.vmap`` over the mask's index functions and an indexing
    transform that ``torch.jit.trace`` cannot record and ``torch.export`` cannot save. For a trace
    the same index functions are applied by broadcasting instead, as transformers 5 does: the same
    boolean mask, built from operations that both record. Nothing changes where transformers is not
    imported or does not build its masks that way."""
    mu = sys.modules.get("transformers.masking_utils")
    vmapped = getattr(mu, "sdpa_mask_recent_torch", None)
    if vmapped is None:
        yield
        return

    def broadcast_mask(
        batch_size, cache_position, kv_length, kv_offset=0, mask_function=None, attention_mask=None, **kwargs
    ):
        # sdpa_mask_recent_torch, with the index functions broadcast over [batch, head, query, key]
        mask_function = mu.causal_mask_function if mask_function is None else mask_function
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
        q_length = cache_position.shape[0]
        local_size = kwargs.get("local_size")
        if kwargs.get("allow_is_causal_skip", True) and mu._ignore_causal_mask_sdpa(
            padding, q_length, kv_length, kv_offset, local_size
        ):
            return None
        if padding is not None:
            mask_function = mu.and_masks(mask_function, mu.padding_mask_function(padding))
        device = cache_position.device
        kv = torch.arange(kv_length, device=device) + kv_offset
        indices = (
            torch.arange(batch_size, device=device)[:, None, None, None],
            torch.arange(1, device=device)[None, :, None, None],
            cache_position[None, None, :, None],
            kv[None, None, None, :],
        )
        return mask_function(*indices).expand(batch_size, -1, q_length, kv_length)

    mapping = mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    saved = (mu.sdpa_mask, mapping.get("sdpa"))
    if mu.sdpa_mask is vmapped:
        mu.sdpa_mask = broadcast_mask
    if mapping.get("sdpa") is vmapped:
        mapping["sdpa"] = broadcast_mask
    try:
        yield
    finally:
        mu.sdpa_mask, mapping["sdpa"] = saved


# ----------------------------------------------------------------------------- TorchScript
def export_archive(
    model: nn.Module,
    path: Union[str, os.PathLike],
    input_ids: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    inputs_embeds: Optional[Tensor] = None,
    *,
    method: str = "attnlrp",
    epsilon: Optional[float] = None,
    check: bool = True,
    level: str = "auto",
    strict: bool = False,
    pixel_values: Optional[Tensor] = None,
    decoder_input_ids: Optional[Tensor] = None,
    decoder_inputs_embeds: Optional[Tensor] = None,
) -> Dict[str, Any]:
    """Saves ``model`` as an explainable TorchScript archive at ``path``; returns what it records.

    The model is patched (``method="attnlrp"`` or ``"cp-lrp"``, gradient-times-input mode), wrapped
    in :class:`ExplainableModel` and traced with the example input, then saved with its parameters
    frozen (``requires_grad=False``). Give the example as ``input_ids`` (looked up in the model's
    input embeddings) or ``inputs_embeds``, with an optional ``attention_mask``; any sequence length
    will do, and padding in the example is fine.

    The archive's ``forward(inputs_embeds, attention_mask)`` returns the logits; its backward from
    one logit, seeded with 1, gives the relevance ``inputs_embeds * inputs_embeds.grad`` (see
    :func:`attribute_deployed`). Its method ``embed(input_ids)`` looks token ids up in the model's
    input embeddings. It calls ``lrpcpp::`` operators: load it after ``import lrpcpp``, or
    from C++ linked with ``liblrpcpp``. The model is left as it was (unpatched, same training mode,
    same ``requires_grad`` flags).

    ``check=True`` loads the saved archive and compares its relevance with :func:`lrpcpp.attribute`
    on the example (an error if they differ) and on the example shortened by one token (a warning:
    the trace may have fixed the length). The returned dict (also stored in the archive, see
    :func:`archive_info`) names the method, the model, the dtype, the example shape and the output.

    ``level`` and ``strict`` are those of :func:`lrpcpp.attribute`. At the operation level the trace
    records the operations the rules chose for the example: the archive holds them as fixed
    operators, as it holds the registry level's.

    An archive takes one input: ``pixel_values`` or a decoder input (several inputs) is a
    ``ValueError`` that points to :func:`export_program`, which exports them.
    """
    caller = "lrpcpp.deploy.export_archive"
    _check_method(method, caller)
    several = dict(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids)
    several.update(decoder_inputs_embeds=decoder_inputs_embeds)
    if any(v is not None for v in several.values()):
        names = [
            n for n, v in dict(input_ids=input_ids, inputs_embeds=inputs_embeds, **several).items() if v is not None
        ]
        raise ValueError(
            f"{caller}: an archive takes one input, (inputs_embeds, attention_mask); got {', '.join(names)}. "
            "Export a model of several inputs with lrpcpp.deploy.export_program, whose program takes them all"
        )
    embeds, mask = _example(model, input_ids, inputs_embeds, attention_mask, caller)
    path = os.fspath(path)
    with explaining(model, method=method, mode="gradient", epsilon=epsilon, level=level, strict=strict) as handle:
        wrapper = ExplainableModel(model)
        with torch.no_grad():
            logits = wrapper(embeds, mask)
        with warnings.catch_warnings():
            # tracing reads every attribute of every module, deprecated properties included
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)
            with torch.enable_grad(), _masks_without_vmap():
                traced = torch.jit.trace(wrapper, (_traced_example(handle, embeds), mask), check_trace=False)
            embedding = _input_embeddings(model)
            if embedding is None:
                embedding = torch.jit.script(_NoEmbedding())
            else:
                ids = (
                    input_ids
                    if input_ids is not None
                    else torch.zeros(embeds.shape[:2], dtype=torch.long, device=embeds.device)
                )
                embedding = torch.jit.trace(embedding, (ids,), check_trace=False)
        archive = torch.jit.script(ExplainableArchive(torch.jit.script(LrpcppRequired()), traced, embedding))
        info = _info(model, embeds, logits, method, epsilon, "lrpcpp TorchScript archive", handle.level)
        info["embed"] = "embed(input_ids) -> inputs_embeds" if _input_embeddings(model) is not None else None
        torch.jit.save(archive, path, _extra_files={ARCHIVE_INFO_FILE: json.dumps(info, indent=1)})
    if check:
        archive = torch.jit.load(path, map_location=embeds.device)
        _check(archive, model, embeds, mask, method, epsilon, "archive", level, strict)
    return info


def archive_info(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """What :func:`export_archive` recorded in the archive at ``path`` (read without loading it)."""
    with zipfile.ZipFile(os.fspath(path)) as archive:
        names = [n for n in archive.namelist() if n.endswith("/extra/" + ARCHIVE_INFO_FILE)]
        if not names:
            raise ValueError(
                f"lrpcpp.deploy.archive_info: {os.fspath(path)} holds no {ARCHIVE_INFO_FILE}; "
                "it was not written by lrpcpp.deploy.export_archive"
            )
        return json.loads(archive.read(names[0]))


# ----------------------------------------------------------------------------- torch.export
def export_program(
    model: nn.Module,
    path: Optional[Union[str, os.PathLike]] = None,
    input_ids: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    inputs_embeds: Optional[Tensor] = None,
    *,
    method: str = "attnlrp",
    epsilon: Optional[float] = None,
    dynamic: bool = True,
    check: bool = True,
    level: str = "auto",
    strict: bool = False,
    pixel_values: Optional[Tensor] = None,
    decoder_input_ids: Optional[Tensor] = None,
    decoder_inputs_embeds: Optional[Tensor] = None,
    decoder_attention_mask: Optional[Tensor] = None,
    target: Target = None,
) -> "torch.export.ExportedProgram":
    """Exports the patched ``model`` with ``torch.export``; saves the program as ``.pt2`` at ``path``.

    The exported module is :class:`ExplainableModel` (``(inputs_embeds, attention_mask) -> logits``)
    of the model patched with ``method`` in gradient-times-input mode; its graph holds the
    ``lrpcpp::`` operators, whose backward computes relevance. ``dynamic=True`` leaves the batch
    size and the sequence length free (``torch.export.Dim.AUTO``; an example of one item, or of one
    token, is exported as two copies of it, since ``torch.export`` fixes sizes of 1). Load it with
    ``torch.export.load(path).module()`` after ``import lrpcpp`` and explain with
    :func:`attribute_deployed`. ``check=True`` compares that with :func:`lrpcpp.attribute` on the
    example (using the saved file when ``path`` is given). The model is left as it was. ``level``
    and ``strict`` are those of :func:`lrpcpp.attribute`, as in :func:`export_archive`; at the
    operation level one eager forward of the example, before the export, gives the warning that
    names the calls without a rule (or, with ``strict``, the error), which the export's trace does
    not count.

    Several inputs of a model that takes them together (CLIP's ``input_ids`` and ``pixel_values``,
    T5's ``input_ids`` and ``decoder_input_ids`` or ``decoder_inputs_embeds``, with an optional
    ``decoder_attention_mask``) export :class:`ExplainableInputs` instead: the program takes a dict
    of the example's inputs, ids given as their embeddings (``input_ids`` as ``inputs_embeds``,
    ``decoder_input_ids`` as ``decoder_inputs_embeds``; a model whose forward takes no
    ``inputs_embeds`` gets ``input_ids`` as well), every size free where ``dynamic`` (one of 1
    stays fixed). :func:`attribute_deployed` explains it with the same inputs as keywords, and
    ``Attribution.inputs`` holds the relevance of each. ``check`` compares each with
    :func:`lrpcpp.attribute` on the example. ``target`` is the explained value of the check, as in
    :func:`lrpcpp.attribute` (a model that returns no logits, such as CLIP, needs a callable).
    """
    caller = "lrpcpp.deploy.export_program"
    _check_method(method, caller)
    several = dict(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids)
    several.update(decoder_inputs_embeds=decoder_inputs_embeds, decoder_attention_mask=decoder_attention_mask)
    if any(v is not None for v in several.values()):
        given = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **several)
        return _export_inputs(model, path, given, method, epsilon, dynamic, check, level, strict, target)
    embeds, mask = _example(model, input_ids, inputs_embeds, attention_mask, caller)
    shapes, traced = None, (embeds, mask)
    if dynamic:
        free = {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
        shapes = {"inputs_embeds": free, "attention_mask": free}
        # torch.export takes a size of 1 in the example for a constant: two copies of the item (the
        # token) keep the batch size (the sequence length) free
        batch, seq = (2 if n == 1 else n for n in embeds.shape[:2])
        traced = (embeds.expand(batch, seq, -1), mask.expand(batch, seq))
    with explaining(model, method=method, mode="gradient", epsilon=epsilon, level=level, strict=strict) as handle:
        if handle.level == "operations":
            # torch.export's trace counts nothing, as a compiled forward: one eager forward gives the
            # warning that names the calls without a rule (or, with strict, the error)
            with torch.enable_grad():
                ExplainableModel(model)(_traced_example(handle, embeds), mask)
        traced = (_traced_example(handle, traced[0]), traced[1])
        containers = [
            (m, {k: v for k, v in m.__dict__.items() if isinstance(v, (list, tuple, dict))}) for m in model.modules()
        ]
        try:
            with torch.enable_grad(), _masks_without_vmap():
                program = torch.export.export(ExplainableModel(model), traced, dynamic_shapes=shapes)
        finally:
            # torch.export sets every list, tuple and dict attribute of every module to a copy of
            # itself: the originals go back, so that the model holds the objects it held before
            for m, saved in containers:
                m.__dict__.update(saved)
        if path is not None:
            torch.export.save(program, os.fspath(path))
    if check:
        deployed = torch.export.load(os.fspath(path)) if path is not None else program
        _check(deployed.module(), model, embeds, mask, method, epsilon, "exported program", level, strict, target)
    return program


def _export_inputs(model, path, given, method, epsilon, dynamic, check, level, strict, target):
    """export_program of several inputs: :class:`ExplainableInputs`, checked input by input."""
    masks = {n: given.pop(n) for n in ("attention_mask", "decoder_attention_mask")}
    masks = {n: m for n, m in masks.items() if m is not None}
    leaves, calls, hooked = input_leaves(
        model, **given, attention_mask=masks.get("attention_mask"), embedding=None, model_inputs=dict(masks)
    )
    example = {keyword: t.detach() for keyword, t in leaves.values()}
    if hooked is not None:
        example["input_ids"] = calls["input_ids"]
    example.update(masks)
    shapes = None
    if dynamic:
        shapes = ({n: {d: torch.export.Dim.AUTO for d in range(t.dim())} for n, t in example.items()},)
    wrapper = ExplainableInputs(model, hooked)  # made before the patch replaces the forward it inspects
    with explaining(model, method=method, mode="gradient", epsilon=epsilon, level=level, strict=strict) as handle:
        traced = {n: _traced_example(handle, t) if t.is_floating_point() else t for n, t in example.items()}
        if handle.level == "operations":  # the coverage warning (or strict's error) of an eager forward
            with torch.enable_grad():
                wrapper(traced)
        containers = [
            (m, {k: v for k, v in m.__dict__.items() if isinstance(v, (list, tuple, dict))}) for m in model.modules()
        ]
        try:
            with torch.enable_grad(), _masks_without_vmap():
                program = torch.export.export(wrapper, (traced,), dynamic_shapes=shapes)
        finally:
            for m, saved in containers:  # as in export_program
                m.__dict__.update(saved)
        if path is not None:
            torch.export.save(program, os.fspath(path))
    if check:
        deployed = (torch.export.load(os.fspath(path)) if path is not None else program).module()
        named = {n: v for n, v in given.items() if v is not None}
        expected = attribute(
            model, **named, **masks, target=target, method=method, epsilon=epsilon, level=level, strict=strict
        )
        got = attribute_deployed(deployed, **example, target=expected.target if target is None else target)
        for (name, want), have in zip(expected.inputs.items(), got.inputs.values()):
            scale = float(want.abs().max()) or 1.0
            error = float((have - want).abs().max()) / scale
            tol = _CHECK_RTOL.get(want.dtype, 1e-2)
            if not error <= tol:
                raise RuntimeError(
                    f"lrpcpp.deploy: the exported program does not reproduce lrpcpp.attribute's relevance of {name} "
                    f"on the example input (relative error {error:.2e} > {tol:.0e}); the model's forward may contain "
                    "code that tracing cannot record"
                )
    return program


# ----------------------------------------------------------------------------- torch.compile
class CompiledAttribute:
    """:func:`lrpcpp.attribute` through the patched model compiled with ``torch.compile(fullgraph=True)``.

    Made by :func:`compile_attribute`. The model stays patched, in eval mode and with its parameters
    frozen (``requires_grad=False``) until :meth:`remove` or the end of a ``with`` block, which put
    back every submodule's training flag and every parameter's ``requires_grad``; each call
    runs the compiled forward, picks the explained values as :func:`lrpcpp.attribute` does, and runs
    the compiled backward. Graphs are
    compiled on the first call and reused by later calls with the same shapes (a new shape compiles
    once more, with dynamic shapes unless ``dynamic=False``).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "attnlrp",
        epsilon: Optional[float] = None,
        all_logits: bool = False,
        level: str = "auto",
        strict: bool = False,
        **compile_kwargs,
    ):
        _check_method(method, "lrpcpp.deploy.compile_attribute")
        self.model, self.method = model, method
        try:
            takes = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover
            takes = MappingProxyType({})
        # a language model that can compute the logits of chosen positions only (Hugging Face's
        # logits_to_keep): the explained position's are all that the relevance depends on
        self._only_explained = not all_logits and "logits_to_keep" in takes
        self._causal = is_causal_decoder(model)
        # AOTAutograd compiles one backward for every input that requires grad: with the parameters
        # frozen it computes the relevance only, not weight gradients as well
        self._removed, self._warm = False, False
        self._forward = model.forward  # the model's own, before the patch replaces it
        self._embeds: Optional[Tensor] = None  # the input_ids leaf of the call, for a substituted embedding
        self._hooked: set = set()
        compile_kwargs.setdefault("fullgraph", True)
        with contextlib.ExitStack() as undo:  # on an error, everything done so far is undone
            self.handle = undo.enter_context(
                explaining(model, method=method, mode="gradient", epsilon=epsilon, level=level, strict=strict)
            )
            had = set(model.__dict__)
            try:
                self.compiled = torch.compile(model, **compile_kwargs)
            except Exception as error:
                raise RuntimeError(
                    f"lrpcpp.deploy.compile_attribute: torch.compile rejected the options {compile_kwargs}: {error}"
                ) from error
            finally:
                # torch.compile marks the module it wraps with attributes of its own (_is_torch_compile)
                added = set(model.__dict__) - had
                undo.callback(lambda: [model.__dict__.pop(k, None) for k in added])
            self._undo = undo.pop_all()  # success: the model stays patched until remove()

    def __call__(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        pixel_values: Optional[Tensor] = None,
        target: Target = None,
        decoder_input_ids: Optional[Tensor] = None,
        decoder_inputs_embeds: Optional[Tensor] = None,
        **model_kwargs,
    ) -> Attribution:
        """The arguments and the result of :func:`lrpcpp.attribute` (no ``latent``, ``method`` or ``mode``):
        one input, or several inputs of a model that takes them together, whose relevance
        ``Attribution.inputs`` holds by name."""
        if self._removed:
            raise RuntimeError("lrpcpp.deploy.CompiledAttribute: the patch was removed; make a new one")
        if isinstance(target, (list, tuple)):
            # one forward and backward per target: a compiled backward cannot be batched with vmap
            # (is_grads_batched) nor, with inductor's donated buffers, run twice on one graph
            if not target or not all(isinstance(t, int) for t in target):
                raise TypeError("lrpcpp.deploy.CompiledAttribute: a list target must hold ints")
            each = [
                self(
                    input_ids,
                    attention_mask,
                    inputs_embeds,
                    pixel_values,
                    t,
                    decoder_input_ids=decoder_input_ids,
                    decoder_inputs_embeds=decoder_inputs_embeds,
                    **model_kwargs,
                )
                for t in target
            ]
            result = Attribution(
                relevance=torch.stack([a.relevance for a in each]),
                token_relevance=torch.stack([a.token_relevance for a in each]),
                output=torch.stack([a.output for a in each], dim=-1),
                target=torch.stack([a.target for a in each if a.target is not None], dim=-1),  # int targets: all set
            )
            maps = [a.inputs for a in each if a.inputs is not None]  # one call: always set
            result.inputs = {n: torch.stack([m[n] for m in maps]) for n in maps[0]}
            return result
        caller = "lrpcpp.deploy.CompiledAttribute"
        leaves, calls, hooked = input_leaves(
            self.model,
            input_ids,
            inputs_embeds,
            pixel_values,
            decoder_input_ids,
            decoder_inputs_embeds,
            attention_mask,
            None,
            model_kwargs,
            self._forward,
        )
        first = next(iter(leaves))
        key, leaf = leaves[first]
        text = leaves.get("input_ids", leaves.get("inputs_embeds", (key, leaf)))
        model_kwargs = model_kwargs_of(self.model, *text, attention_mask, self._causal, model_kwargs, caller)
        decoder_leaf = next((t for n, (_, t) in leaves.items() if n.startswith("decoder_")), None)
        # an encoder-decoder's next token follows the last decoder position of the decoder's mask
        target_mask = attention_mask if decoder_leaf is None else decoder_mask(model_kwargs, decoder_leaf)
        batch, seq = leaf.shape[:2] if key == "inputs_embeds" else (0, 0)
        # the positions of all items for every item, batch x batch logits (fewer than batch x seq);
        # a per-item index ([batch, 1]) would fix the sequence length of the compiled graph
        only_explained = (
            self._only_explained
            and len(leaves) == 1
            and key == "inputs_embeds"
            and not callable(target)
            and "logits_to_keep" not in model_kwargs
            and batch <= seq
        )
        if only_explained:
            positions = last_positions(attention_mask, batch, seq, leaf.device) % seq  # -1: a row all padding
            model_kwargs["logits_to_keep"] = positions
        if hooked is not None:
            self._substitute(hooked)
            self._embeds = leaves["input_ids"][1]
        try:
            if not self._warm:
                # The patch builds its constant gradient-scale tensors on first use. Built in a plain
                # forward, they exist before the first compilation, whose guards then hold from the
                # second call on (built inside it, they would make the second call compile again). The
                # operation level builds them only with grad, where an input carries relevance: its plain
                # forward runs with grad, and gives the coverage warning (or strict's error) of an eager
                # forward, which the compiled forward does not count.
                with torch.set_grad_enabled(self.handle.level == "operations"), bodies_run() as ran:
                    with embedded(hooked, input_ids, self._embeds, caller):
                        self.model(**calls, **model_kwargs)
                if ran:
                    raise RuntimeError(_uncompilable(ran))
                self._warm = True
            with torch.enable_grad():
                out = self.compiled(**calls, **model_kwargs)
                if only_explained:  # [batch, batch, vocab]: item i's next-token logits are at [i, i]
                    rows = torch.arange(batch, device=leaf.device)
                    explained, ids = select_target(logits_of(out)[rows, rows], target, None)
                else:
                    batches = {t.shape[0] for _, t in leaves.values()}
                    explained, ids = select_target(
                        out, target, target_mask, batches.pop() if len(batches) == 1 else None
                    )
        finally:
            self._embeds = None
        grads = relevance_backward(explained, [t for _, t in leaves.values()], explicit=False, many=False)
        relevances = {name: relevance_of(t, g, False).detach() for (name, (_, t)), g in zip(leaves.items(), grads)}
        result = attribution_of(relevances[first], explained, ids, key)
        result.inputs = relevances
        return result

    def _substitute(self, module: nn.Module) -> None:
        """A forward hook, kept while the model stays patched, that makes ``module`` (the one that
        embeds ``input_ids`` in a forward without ``inputs_embeds``) return the embeddings whose
        relevance is computed. It is part of the compiled forward: a hook added and removed per call
        would change what the compiled graph's guards check, and compile again every time."""
        if module in self._hooked:
            return

        def substitute(m, args, out):
            return self._embeds  # None (outside a call) leaves the output as it is

        self._hooked.add(module)
        self._undo.callback(module.register_forward_hook(substitute).remove)

    def remove(self) -> None:
        """Unpatches the model and restores every submodule's training flag and every parameter's
        ``requires_grad`` (idempotent)."""
        if not self._removed:
            self._undo.close()
            self._removed = True

    def __enter__(self) -> "CompiledAttribute":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"CompiledAttribute({type(self.model).__name__}, method={self.method!r})"


def _uncompilable(ran: set) -> str:
    """What compile_attribute says of the rules that its eager forward gave and a compiled forward
    cannot: the calls in the bodies of torch functions written in Python, and custom
    autograd.Functions (by name) ruled in place of their own backward (:func:`bodies_run`)."""
    bodies = sorted(op_name(f) for f in ran if not isinstance(f, str))
    functions = sorted(f for f in ran if isinstance(f, str))
    what = []
    if bodies:
        what.append(
            f"gives rules to the calls inside {', '.join(bodies)}, which torch.compile records as one call that "
            "then runs without the rules"
        )
    if functions:
        what.append(f"rules {', '.join(functions)} in place of its own backward, which torch.compile keeps")
    return (
        f"lrpcpp.deploy.compile_attribute: the operation level {'; and it '.join(what)}: the compiled relevance "
        "would be wrong. Explain this model with lrpcpp.attribute"
    )


def compile_attribute(
    model: nn.Module,
    method: str = "attnlrp",
    *,
    epsilon: Optional[float] = None,
    all_logits: bool = False,
    level: str = "auto",
    strict: bool = False,
    **compile_kwargs,
) -> CompiledAttribute:
    """:func:`lrpcpp.attribute` with the model compiled: patches ``model`` and compiles it with
    ``torch.compile(model, fullgraph=True, **compile_kwargs)`` (``backend``, ``dynamic``, ``mode``,
    ``options``: as ``torch.compile``; the default backend is inductor).

    A language model that takes ``logits_to_keep`` (Hugging Face's causal LMs) computes only the
    logits at the explained position, which are all the relevance depends on: the projection onto
    the vocabulary, often the largest matrix product of the model, then runs for one position per
    item in the forward and the backward. ``all_logits=True`` computes them all, as
    :func:`lrpcpp.attribute` does; the relevance is the same either way.

    .. code-block:: python

       with lrpcpp.deploy.compile_attribute(model) as explain:
           attr = explain(input_ids=ids, attention_mask=mask)   # compiles (once per shape)
           attr = explain(input_ids=other_ids, attention_mask=other_mask)

    ``level`` and ``strict`` are those of :func:`lrpcpp.attribute`. At the operation level the rule
    mode (:class:`~lrpcpp.models.operations.GradientRules`) is traced into the compiled graph with
    the model's forward; the first call runs one eager forward as well, which gives the warning that
    names the calls without a rule (or, with ``strict``, the error), since the compiled forward
    counts nothing (:attr:`Attribution.coverage <lrpcpp.Attribution.coverage>` stays ``None``). A
    torch function written in Python whose body the rules run call by call
    (``F.multi_head_attention_forward``) is recorded by dynamo as one call without the rules: that
    first call then raises ``RuntimeError`` naming it.

    Several inputs of a model that takes them together (CLIP's ``input_ids`` and ``pixel_values``,
    T5's ``input_ids`` and ``decoder_input_ids``) are explained as :func:`lrpcpp.attribute` explains
    them: ``Attribution.inputs`` holds the relevance of each by name. A model whose forward takes no
    ``inputs_embeds`` (CLIP) keeps a forward hook on its token embedding, which returns the
    embeddings whose relevance is computed, until :meth:`~CompiledAttribute.remove`.

    Gradient-times-input mode only. ``torch.autograd.grad`` cannot run inside a ``fullgraph``
    region, so the forward (with its ``lrpcpp`` operators) and, through AOTAutograd, the backward
    are compiled, while the choice of the explained logit and the call of the backward stay in
    Python.
    """
    return CompiledAttribute(
        model, method=method, epsilon=epsilon, all_logits=all_logits, level=level, strict=strict, **compile_kwargs
    )

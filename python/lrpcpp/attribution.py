"""One-call attribution of a whole model, ``lrpcpp.attribute(model, input_ids=ids)``, and the steps
it is made of, which :mod:`lrpcpp.deploy` (the compiled and the deployed attribution) shares: the
input chosen and checked, the model's keyword arguments, the model patched and frozen for the call,
the explained value selected, the backward pass and the relevance read from it."""

import contextlib
import difflib
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeGuard, Union

import torch
from torch import Tensor, nn

from ._signatures import parameters
from .distributed import unsharded
from .models.families import UnsupportedModelError, family_of
from .models.patching import PatchHandle, patch_walked
from .models.presets import Preset, get_preset, preset_options
from .models.state import ModelState
from .models.tree import named_modules

__all__ = [
    "attribute",
    "Attribution",
    "Target",
    "choose_input",
    "input_leaves",
    "decoder_mask",
    "embedded",
    "input_leaf",
    "input_embeddings",
    "embedding_module",
    "model_kwargs",
    "position_ids",
    "is_causal_decoder",
    "explaining",
    "logits_of",
    "last_positions",
    "select_target",
    "relevance_backward",
    "batched_backward",
    "relevance_of",
    "attribution_of",
]

Target = Union[None, int, Tensor, Sequence[int], Callable[[object], Tensor]]


@dataclass
class Attribution:
    """The result of :func:`attribute`.

    * ``relevance``: relevance of the input embeddings (``[batch, seq, hidden]``) or pixels
      (``[batch, channels, height, width]``); with a list of K targets, a leading ``[K]`` dim.
    * ``token_relevance``: ``relevance`` summed over the hidden (or channel) dim, one value per
      token or pixel.
    * ``output``: the explained value of each batch item (``[batch]``, or ``[batch, K]``).
    * ``target``: the explained class or token id of each item (``None`` for a callable target).
    * ``latent``: with ``latent=True``, the relevance of every layer's output, by module name.
    * ``coverage``: at the operation level (``level=``), the calls the rules saw
      (:class:`lrpcpp.models.operations.Coverage`); ``None`` at the registry level.
    * ``inputs``: the relevance of every given input by the name it was given under
      (``{"input_ids": ..., "pixel_values": ...}``), each shaped as ``relevance``; from
      :func:`attribute` and :func:`lrpcpp.deploy.compile_attribute` always filled (one entry for one
      input, its value is ``relevance``); from :func:`lrpcpp.deploy.attribute_deployed` filled for a
      program of several inputs, ``None`` for one.
    * ``tokens``: the tokens of each batch item, for the views (``_repr_html_``, :meth:`show`);
      ``None`` until set (``attr.tokens = [tokenizer.convert_ids_to_tokens(row) for row in ids]``).

    In a notebook an ``Attribution`` shows itself as a heatmap (:meth:`_repr_html_`): the tokens on
    the colour of their relevance, or the pixel relevance as an image; :meth:`show` prints the
    terminal view elsewhere.
    """

    relevance: Tensor
    token_relevance: Tensor
    output: Tensor
    target: Optional[Tensor]
    latent: Optional[Dict[str, Tensor]] = None
    coverage: Optional[Any] = None
    inputs: Optional[Dict[str, Tensor]] = None
    tokens: Optional[List[List[str]]] = None

    def _views(self, tokens=None, tokenizer=None, input_ids=None) -> List[Tuple[str, Tensor, Optional[List[str]]]]:
        """(label, relevance, tokens) of every map: one per batch item (and target, with K targets);
        tokens ``None`` for pixel maps."""
        if tokenizer is not None:
            if input_ids is None:
                raise TypeError("lrpcpp.Attribution: tokenizer= needs input_ids=, the ids that were explained")
            ids = torch.as_tensor(input_ids)
            tokens = [tokenizer.convert_ids_to_tokens(row) for row in ids.reshape(-1, ids.shape[-1]).tolist()]
        elif tokens is None:
            tokens = self.tokens
        values = self.token_relevance.detach().float().cpu()
        image = self._pixels()
        per_item = 2 if image else 1
        if tokens is not None and tokens and isinstance(tokens[0], str):
            tokens = [list(tokens)]  # one batch item
        maps = values.reshape(-1, *values.shape[values.dim() - per_item :])
        batch = values.shape[-per_item - 1]
        views: List[Tuple[str, Tensor, Optional[List[str]]]] = []
        for j, m in enumerate(maps):
            k, b = divmod(j, batch)
            label = (f"target {k}, " if values.dim() > per_item + 1 else "") + f"item {b}"
            if image:
                views.append((label, m, None))
                continue
            if tokens is None:
                row = [str(i) for i in range(m.shape[0])]  # positions, where no tokens are known
            elif len(tokens) != batch:
                raise ValueError(f"lrpcpp.Attribution: tokens for {len(tokens)} items, the batch has {batch}")
            else:
                row = list(tokens[b])
            views.append((label, m, row))
        return views

    def _pixels(self) -> bool:
        """Whether the maps are of pixels (``relevance`` ``[..., C, H, W]`` summed over the channels)
        rather than of tokens (``[..., seq, hidden]`` summed over the hidden dim): from the input's
        name where :attr:`inputs` holds it, else from which sum ``token_relevance`` is."""
        if self.inputs is not None:
            return "pixel_values" in self.inputs and not {"input_ids", "inputs_embeds"} & set(self.inputs)
        r, t = self.relevance.detach(), self.token_relevance.detach()
        if r.dim() < 4 or r.shape[:-3] + r.shape[-2:] != t.shape:
            return False
        if r.shape[:-1] != t.shape:
            return True
        # [..., C, H, W] with C == H == W: both sums have the shape of token_relevance
        return torch.allclose(r.sum(-3).to(t.dtype), t) and not torch.allclose(r.sum(-1).to(t.dtype), t)

    def _repr_html_(self) -> str:
        """The heatmap as HTML (Jupyter): the tokens coloured by their relevance, each value shown
        on hover, with a colour scale; pixel relevance as an inline PNG (red-white-blue)."""
        return _html(self._views())

    def show(self, tokens=None, tokenizer=None, input_ids=None) -> None:
        """Shows the heatmap: as HTML in a Jupyter notebook, else as the command line's terminal view
        on stdout (coloured on a terminal unless ``NO_COLOR`` is set). The tokens: ``tokens`` (a list
        of strings, or one list per batch item), or a ``tokenizer`` with the ``input_ids`` that were
        explained, else :attr:`tokens`; without any, token positions."""
        import os
        import sys

        from . import viz

        views = self._views(tokens, tokenizer, input_ids)
        shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
        if shell is not None and type(shell).__name__ == "ZMQInteractiveShell":  # a notebook kernel
            from IPython.display import HTML, display

            display(HTML(_html(views)))
            return
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        out = []
        for label, m, row in views:
            if len(views) > 1:
                out.append(f"--- {label}\n")
            if row is None:
                out.append(viz.image_terminal(m, color=color))
            else:
                out.append(viz.text_terminal(row, m, color=color))
        sys.stdout.write("".join(out))


def _html(views) -> str:
    import base64
    import math

    from . import viz

    parts = []
    for label, m, row in views:
        if row is None:
            f = max(1, math.ceil(224 / min(m.shape)))  # enlarged (nearest) to at least 224 pixels a side
            png = base64.b64encode(viz.png_bytes(viz.heatmap(m, size=(m.shape[0] * f, m.shape[1] * f))))
            body = f'<img alt="relevance heatmap" src="data:image/png;base64,{png.decode("ascii")}">'
            body += viz.html_legend(viz.scale_of(m))
        else:
            body = viz.text_html(row, m)
        parts.append(f'<div style="margin: 0.5em 0"><div style="color: #555">{label}</div>{body}</div>')
    return '<div class="lrpcpp-attribution">' + "".join(parts) + "</div>"


def _layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The blocks of every ``nn.ModuleList`` of repeated layers (decoder/encoder layers)."""
    found: Dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if any(p is not None for p in module[0].parameters()):
                for i, layer in enumerate(module):
                    found[f"{name}.{i}" if name else str(i)] = layer
    return found


def _call(model: nn.Module, inputs: Dict[str, Tensor], model_kwargs: dict):
    """model(pixel_values=..., ...) for Hugging Face models; a torch.nn or torchvision model whose
    forward has no ``pixel_values`` (or ``input_ids``) parameter gets its one input (the pixels or
    ids) as its first positional argument."""
    if len(inputs) == 1:
        ((key, leaf),) = inputs.items()
        if key in ("pixel_values", "input_ids"):
            params = parameters(type(model).forward)
            if key not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                return model(leaf, **model_kwargs)
    return model(**inputs, **model_kwargs)


def logits_of(out) -> Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        if isinstance(out, Tensor):
            return out
        raise ValueError(
            "lrpcpp.attribute: the model returns no logits (a base model?); pass target=callable that maps "
            "the model output to one value per batch item"
        )
    return logits


def last_positions(attention_mask: Optional[Tensor], batch: int, seq: int, device) -> Tensor:
    if attention_mask is None:
        return torch.full((batch,), seq - 1, dtype=torch.long, device=device)
    positions = torch.arange(seq, device=attention_mask.device).expand(batch, seq)
    last = torch.where(attention_mask.bool(), positions, -1).amax(dim=1)
    empty = (last < 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"lrpcpp: attention_mask row(s) {empty} are all zeros: such a row has no token whose "
            "next-token logit could be explained; leave it out of the batch"
        )
    return last.to(device)


_TARGETS = (
    "None (the top class or next token), an int id, an integer tensor of one id per batch item, "
    "a list of int ids (one relevance map each) or a callable f(model output) -> tensor"
)


def _is_id(t: object) -> TypeGuard[numbers.Integral]:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def _target_ids(target: Target, logits: Tensor) -> Tensor:
    """The ids to explain, [batch] or [batch, K], checked against the logits' [batch, classes]."""
    batch, classes = logits.shape
    if target is None:
        ids = logits.detach().argmax(dim=-1)
    elif _is_id(target):
        ids = torch.full((batch,), int(target), dtype=torch.long, device=logits.device)
    elif isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(
                f"lrpcpp.attribute: target must hold integer class or token ids, got a {target.dtype} "
                f"tensor; target may be {_TARGETS}"
            )
        if target.dim() > 1 or target.numel() not in (1, batch):
            raise ValueError(
                f"lrpcpp.attribute: a target tensor holds one id, or one id per batch item (shape "
                f"[{batch}]), got shape {tuple(target.shape)}"
            )
        ids = target.to(device=logits.device, dtype=torch.long).reshape(-1).expand(batch)
    elif isinstance(target, (list, tuple)):
        if not target or not all(_is_id(t) for t in target):
            raise TypeError(f"lrpcpp.attribute: a list target must be a non-empty list of int ids, got {target!r}")
        ids = torch.tensor([int(t) for t in target], dtype=torch.long, device=logits.device).expand(batch, len(target))
    else:
        raise TypeError(f"lrpcpp.attribute: target must be {_TARGETS}, got {type(target).__name__}")
    bad = sorted({int(i) for i in ids[(ids < 0) | (ids >= classes)].tolist()})
    if bad:
        raise ValueError(
            f"lrpcpp.attribute: target ids must lie in [0, {classes}) (the number of classes or the "
            f"vocabulary size), got {bad}"
        )
    return ids


def select_target(out, target: Target, attention_mask: Optional[Tensor], batch: Optional[int] = None):
    """(explained values [batch] or [batch, K], target ids or None). ``batch``: the number of
    inputs, which a callable target's value is checked against."""
    if callable(target) and not isinstance(target, Tensor):
        value = target(out)
        if not isinstance(value, Tensor):
            raise TypeError(f"lrpcpp.attribute: a callable target must return a tensor, got {type(value).__name__}")
        if value.dim() > 1 or (value.dim() == 1 and batch is not None and value.shape[0] != batch):
            raise ValueError(
                f"lrpcpp.attribute: a callable target must return one value per batch item (shape "
                f"[{'batch' if batch is None else batch}]) or one value for the whole batch (0-D), got "
                f"shape {tuple(value.shape)}"
            )
        if not value.requires_grad:
            raise ValueError(
                "lrpcpp.attribute: the callable target returned a tensor that does not depend on the "
                "model output (detached, or computed under torch.no_grad()); compute it from the output "
                "with differentiable torch operations"
            )
        return value.reshape(-1), None
    logits = logits_of(out)
    if logits.dim() == 3:  # a language model: explain the next token after the last real position
        rows = torch.arange(logits.shape[0], device=logits.device)
        logits = logits[rows, last_positions(attention_mask, logits.shape[0], logits.shape[1], logits.device)]
    elif logits.dim() != 2:
        raise ValueError(
            f"lrpcpp.attribute: expected logits of shape [batch, classes] or [batch, seq, vocab], "
            f"got {tuple(logits.shape)}"
        )
    ids = _target_ids(target, logits)
    picked = logits.gather(-1, ids if ids.dim() == 2 else ids[:, None])
    return (picked if ids.dim() == 2 else picked[:, 0]), ids


def _forward_takes(model: nn.Module, name: str) -> bool:
    """Whether ``model``'s forward takes the keyword argument ``name`` (by name or as ``**kwargs``)."""
    try:
        params = parameters(model.forward)
    except (TypeError, ValueError):  # pragma: no cover - a builtin forward
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "decoder_input_ids", "decoder_inputs_embeds")


def _takes_input(model: nn.Module, name: str, forward: Optional[Callable] = None) -> bool:
    """Whether ``model``'s forward takes the input ``name`` (``inputs_embeds``, ...): by name, or as
    ``**kwargs`` of a forward that names none of the inputs (a wrapper that hands them on). A forward
    that names some of them but not ``name`` does not take it (CLIP's names ``input_ids`` and
    ``pixel_values`` and hands ``**kwargs`` on to both of its encoders)."""
    try:
        params = parameters(model.forward if forward is None else forward)
    except (TypeError, ValueError):  # pragma: no cover - a builtin forward
        return True
    return name in params or (not any(n in params for n in _INPUTS) and _forward_takes(model, name))


def _check_model_inputs(model: nn.Module, model_inputs: dict) -> None:
    """Preset options go in ``preset=lrpcpp.preset(name, ...)``, never to the model: a model input
    named (or almost named) like one, which the model's forward does not name, is refused."""
    options = preset_options()
    try:
        named = set(parameters(model.forward))
    except (TypeError, ValueError):  # pragma: no cover
        named = set()
    for key in model_inputs:
        if key in named:
            continue
        close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.85)
        if close:
            option = close[0]
            like = "is" if key == option else f"looks like {option}=, which is"
            raise TypeError(
                f"lrpcpp.attribute: {key}= {like} an option of the preset(s) {', '.join(options[option])}, "
                f"not an input of the model; the keyword arguments of lrpcpp.attribute go to the model only. Give "
                f"preset options as preset=lrpcpp.preset(name, {option}=...), e.g. "
                f"lrpcpp.preset({options[option][0]!r}, {option}=...)"
            )


def _inner_model_hint(model: nn.Module) -> str:
    """Where an error about a model without input embeddings points: its first submodule that has them."""
    inner = [n for n, m in model.named_modules() if n and callable(getattr(m, "get_input_embeddings", None))]
    return f" (here: model.{inner[0]})" if inner else ""


def input_embeddings(model: nn.Module, caller: str = "lrpcpp.attribute") -> Callable[[Tensor], Tensor]:
    """The model's input embeddings (``model.get_input_embeddings()``), which embed ``input_ids``."""
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        hint = _inner_model_hint(model)
        raise TypeError(
            f"{caller}: input_ids needs model.get_input_embeddings() to embed the tokens, and this "
            f"{type(model).__name__} has no get_input_embeddings; pass inputs_embeds= (the token embeddings, "
            f"e.g. inner.get_input_embeddings()(input_ids)) to a forward that takes them, or pass the inner "
            f"Hugging Face model itself{hint}"
        )
    return get()


class _Found(Exception):
    """Stops the forward pass that looks for the embedding of ``input_ids``: it has been found."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def _ids_offset(args: tuple, input_ids: Tensor) -> Optional[int]:
    """Where ``input_ids`` lie along the sequence (last) dimension of the first argument of a call: 0
    for the tensor itself or equal ids (in any integer dtype: CPM-Ant casts them to int32); the offset
    of the one window equal to them in ids with more positions and the same other dimensions (ids that
    the forward extended, as CPM-Ant prepends prompt ids); ``None`` otherwise."""
    x = args[0] if args else None
    if x is input_ids:
        return 0
    if (
        not isinstance(x, Tensor)
        or x.dtype.is_floating_point
        or x.dtype.is_complex
        or x.dtype == torch.bool
        or x.dim() != input_ids.dim()
        or x.dim() == 0
        or x.shape[:-1] != input_ids.shape[:-1]
        or x.shape[-1] < input_ids.shape[-1]
        or x.device != input_ids.device
    ):
        return None
    n = input_ids.shape[-1]
    found = [o for o in range(x.shape[-1] - n + 1) if torch.equal(x[..., o : o + n].long(), input_ids.long())]
    return found[0] if len(found) == 1 else None


def embedding_module(
    model: nn.Module,
    input_ids: Tensor,
    embedding: Union[None, str, nn.Module],
    model_inputs: Dict[str, Any],
    caller: str = "lrpcpp.attribute",
) -> nn.Module:
    """The module that embeds ``input_ids``: ``embedding`` (a module of ``model`` or its qualified
    name, as in ``model.named_modules()``); else ``model.get_input_embeddings()`` when it returns a
    module; else the first ``nn.Embedding`` called with ``input_ids`` in ``model``'s forward, found by
    calling ``model`` (without grad, in eval mode) with a forward pre-hook on every ``nn.Embedding``
    that stops the call at the first one that gets ``input_ids``."""
    if isinstance(embedding, str):
        modules = dict(model.named_modules())
        found = modules.get(embedding)
        if found is None:
            close = difflib.get_close_matches(embedding, [n for n in modules if n], n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"{caller}: embedding={embedding!r} names no module of this {type(model).__name__} (the names are "
                f"those of model.named_modules()){hint}"
            )
        return found
    if isinstance(embedding, nn.Module):
        if not any(m is embedding for m in model.modules()):
            raise ValueError(
                f"{caller}: embedding= must be a module of the model (one of model.modules()), got a "
                f"{type(embedding).__name__} that is not part of this {type(model).__name__}"
            )
        return embedding
    if embedding is not None:
        raise TypeError(
            f"{caller}: embedding= must be the nn.Module that embeds input_ids or its name in "
            f"model.named_modules(), got {type(embedding).__name__}"
        )
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            found = get()
        except NotImplementedError:
            found = None
        if isinstance(found, nn.Module):
            return found

    def look(module, args):
        if _ids_offset(args, input_ids) is not None:
            raise _Found(module)

    failed = ""
    try:
        named = set(parameters(model.forward))
    except (TypeError, ValueError):  # pragma: no cover - a builtin forward
        named = set()
    if "inputs_embeds" in named and not _forward_takes(model, "input_ids"):
        failed = " (its forward takes inputs_embeds, not input_ids)"
    else:
        hooks = [m.register_forward_pre_hook(look) for m in model.modules() if isinstance(m, nn.Embedding)]
        try:
            with ModelState(model), torch.no_grad():
                _call(model, {"input_ids": input_ids}, model_inputs)
        except _Found as found:
            return found.module
        except Exception as e:  # the forward cannot run on input_ids: no embedding to find
            failed = f" (calling it with input_ids raised {type(e).__name__}: {e})"
        finally:
            for h in hooks:
                h.remove()
    hint = _inner_model_hint(model)
    raise TypeError(
        f"{caller}: input_ids needs model.get_input_embeddings() (or an nn.Embedding that the forward calls with "
        f"input_ids, or embedding=) to embed the tokens; its forward calls no nn.Embedding with input_ids{failed}, "
        f"and this {type(model).__name__} has no get_input_embeddings; pass inputs_embeds= (the token embeddings, e.g. "
        f"inner.get_input_embeddings()(input_ids)) to a forward that takes them, embedding= (the module that embeds "
        f"input_ids, or its name in model.named_modules()), or the inner Hugging Face model itself{hint}"
    )


@contextlib.contextmanager
def embedded(
    module: Optional[nn.Module],
    input_ids: Optional[Tensor],
    leaf: Optional[Tensor],
    caller: str,
    modules: Sequence[nn.Module] = (),
) -> Iterator[None]:
    """For the block, ``module`` called with ``input_ids`` returns ``leaf`` (the embeddings whose
    relevance is computed); an error if the block never calls it so. ``module=None`` (or no
    ``input_ids`` or ``leaf``): nothing. So do the embedding modules among ``modules`` (the model's)
    tied to ``module`` (the same weight parameter) where they embed the ids as ``module`` does (their
    output equals ``leaf``): T5's encoder embeds with its own ``embed_tokens``, which shares the
    weight of ``get_input_embeddings()``."""
    if module is None or input_ids is None or leaf is None:
        yield
        return
    weight, tied = getattr(module, "weight", None), [module]
    if isinstance(weight, nn.Parameter):
        tied += [m for m in modules if m is not module and isinstance(m, nn.Embedding) and m.weight is weight]
    calls = []

    def replace(m, args, out):
        offset = _ids_offset(args, input_ids)
        embeddings = _embeddings_in(out)
        if offset is None or not isinstance(embeddings, Tensor):
            return None
        dim, n = input_ids.dim() - 1, input_ids.shape[-1]
        if m is not module and not torch.equal(embeddings.narrow(dim, offset, n), leaf):
            return None  # a tied module that embeds otherwise (scaled, say): replaced, it would change the forward
        calls.append(m)
        copy = for_the_forward(leaf)
        if embeddings.shape[dim] != n:
            # ids that the forward extended (prompt ids before them): the extra positions keep the module's
            # own embeddings, which carry no relevance
            held = embeddings.detach()
            before, after = held.narrow(dim, 0, offset), held.narrow(dim, offset + n, held.shape[dim] - offset - n)
            copy = torch.cat([before, copy, after], dim)
        return copy if embeddings is out else (copy,) + out[1:]

    hooks = [m.register_forward_hook(replace) for m in tied]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
    if not calls:
        raise EmbeddingNotCalledError(
            f"{caller}: the embedding module ({type(module).__name__}) was not called with input_ids in the "
            "model's forward, so its relevance cannot be read; pass embedding= the module that embeds input_ids"
        )


class EmbeddingNotCalledError(ValueError):
    """The embedding module of :func:`embedded` was not called with the ids in the model's forward."""


def is_causal_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is a causal decoder, whose positions :func:`position_ids` counts over the
    mask: as its family entry says (``causal`` of :class:`~lrpcpp.models.families.Family`); a
    Hugging Face model without one (or a module holding one) by its config and classes: not an
    encoder-decoder, and a decoder by ``config.is_decoder``, or by its attention modules'
    ``is_causal`` (all causal), or, where they have none, by being a generating model
    (``GenerationMixin``, the ``...ForCausalLM`` classes)."""
    try:
        family = family_of(model)
    except UnsupportedModelError:
        family = None
    if family is not None:
        return family.causal
    hf = next((m for m in model.modules() if getattr(m, "config", None) is not None), None)
    if hf is None or getattr(hf.config, "is_encoder_decoder", False):
        return False
    if getattr(hf.config, "is_decoder", False):
        return True
    flags = [
        m.is_causal
        for m in hf.modules()
        if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "is_causal", None), bool)
    ]
    if flags:
        return all(flags)
    return any(c.__name__ == "GenerationMixin" for c in type(hf).__mro__)


def position_ids(model: nn.Module, causal: bool, attention_mask: Tensor) -> Optional[Tensor]:
    """Positions counted over the unmasked tokens (``cumsum - 1``, 0 on left padding), as
    Hugging Face's ``generate`` gives them, for a causal decoder whose forward takes ``position_ids``:
    a left-padded row then has the positions it has alone."""
    if not causal or not _forward_takes(model, "position_ids"):
        return None
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def _check_pooled_padding(model: nn.Module, logits: Tensor, attention_mask: Tensor) -> None:
    """A causal decoder's sequence classifier (``LlamaForSequenceClassification``, ...) given
    ``inputs_embeds`` cannot find the padding and pools the last position: right padding would
    explain a pad's logits. (A wrapper module pools as it likes.)"""
    if logits.dim() != 2 or getattr(model, "config", None) is None:
        return
    rows = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
    if rows:
        raise ValueError(
            f"lrpcpp.attribute: this {type(model).__name__} classifies from the last position, and attention_mask "
            f"row(s) {rows} end in padding (the model cannot find it in inputs_embeds); pad the batch on the left "
            "(tokenizer.padding_side = 'left')"
        )


def attribute(
    model: nn.Module,
    input_ids: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    inputs_embeds: Optional[Tensor] = None,
    pixel_values: Optional[Tensor] = None,
    target: Target = None,
    method: Optional[str] = None,
    mode: str = "gradient",
    latent: bool = False,
    epsilon: Optional[float] = None,
    preset=None,
    rules=None,
    embedding: Union[None, str, nn.Module] = None,
    level: str = "auto",
    strict: bool = False,
    decoder_input_ids: Optional[Tensor] = None,
    decoder_inputs_embeds: Optional[Tensor] = None,
    **model_inputs,
) -> Attribution:
    """Explains ``model``'s output with AttnLRP (or CP-LRP) in one forward and one backward pass.

    Give one of ``input_ids`` (embedded with the model's own input embeddings),
    ``inputs_embeds`` or ``pixel_values``, or several inputs of a model that takes them together:
    text (``input_ids`` or ``inputs_embeds``), ``pixel_values`` and an encoder-decoder's
    ``decoder_input_ids`` (embedded with ``model.get_decoder().get_input_embeddings()``, else the
    shared ``model.get_input_embeddings()``, and given as ``decoder_inputs_embeds``, which the
    forward must take) or ``decoder_inputs_embeds``. Each is a relevance leaf: ``inputs`` of the
    result holds the relevance of every given input by name; ``relevance`` is that of the first in
    this order. Ids with the embeddings of the same side are an error. ``embedding``: the module
    that embeds ``input_ids`` (a module of ``model`` or its name in ``model.named_modules()``); by default
    ``model.get_input_embeddings()``, or for a model without it the first ``nn.Embedding`` that gets
    ``input_ids`` in the forward (found by calling the model, stopped at that module by a forward
    pre-hook; see :func:`~lrpcpp.attribution.embedding_module`). The ids are embedded with it (the
    first item of a tuple it returns, as I-BERT's does with a scale), and the model is called with the
    ids while a forward hook makes the embedding module return those embeddings, whose relevance is
    computed: the model runs as it does on the ids, also where it reads
    them besides embedding them (a layer norm applied to embedded ids only, routing by token id). A
    forward that takes ``inputs_embeds`` and not ``input_ids``, one that takes both but never calls the
    embedding module with the ids as given (then called a second time), and an encoder-decoder given a
    decoder input get the embeddings as ``inputs_embeds``.
    ``target``: ``None`` (the top class, or the top next-token logit after the last unmasked position;
    of the decoder, masked by ``decoder_attention_mask``, when a decoder input is given),
    an int, an integer tensor of one id per item, a list of K ids (K relevance maps from one backward
    pass), or a callable ``f(model_output) -> tensor`` of one
    value per item or one 0-D value for the whole batch (for example a similarity of two
    embeddings), computed from the output with differentiable operations. The model runs in eval
    mode and is patched for the duration of the call only; in gradient mode its parameters are also
    frozen for the call, since no weight gradient is computed. Afterwards every submodule's own
    ``training`` flag and every parameter's ``requires_grad`` are as they were, also when the call
    raises. It works under ``torch.no_grad()`` (gradients are enabled for the call) and is refused
    under ``torch.inference_mode()``.

    ``preset``: a registered preset name (``"vit"``, ``"epsilon_gamma_box"``, ...; see
    :mod:`lrpcpp.models.presets`) or an :class:`lrpcpp.Preset`, such as ``lrpcpp.preset("vit",
    gamma_linear=0.05)`` for a preset with options, putting a rule on every linear and convolution
    layer. ``rules``: per-layer overrides, ``{module name or type: rule}``. ``method=None`` is the
    preset's method, else ``"attnlrp"``. The other keyword arguments (``model_inputs``) go to the
    model; one named like a preset option is an error.

    With ``attention_mask``, a causal decoder (:func:`~lrpcpp.attribution.is_causal_decoder`) gets
    ``position_ids`` counted over the unmasked tokens, unless given: each row of a left- or
    right-padded batch then has the relevance it has alone.

    ``level``: ``"auto"`` (default) explains a model the family registry describes with its entry and
    any other model operation by operation (:mod:`lrpcpp.models.operations`, gradient mode);
    ``"registry"`` or ``"operations"`` forces one. At the operation level ``strict=True`` makes a
    call without a known rule an error (else it is named in a warning), and ``coverage`` of the
    result counts the calls seen.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"lrpcpp.attribute: model must be a torch.nn.Module (a Hugging Face or torch model), got "
            f"{type(model).__name__}; to explain a function, call it in the forward of an nn.Module"
        )
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "lrpcpp.attribute: cannot run under torch.inference_mode(), which records no graph "
            "for the backward pass; call it outside the inference_mode block (torch.no_grad() is "
            "fine)"
        )
    if preset is not None:
        preset = get_preset(preset, rules)
    elif rules is not None:
        raise ValueError("lrpcpp.attribute: rules= overrides the layer rules of a preset; give preset= as well")
    _check_model_inputs(model, model_inputs)
    leaves, calls, hooked = input_leaves(
        model,
        input_ids,
        inputs_embeds,
        pixel_values,
        decoder_input_ids,
        decoder_inputs_embeds,
        attention_mask,
        embedding,
        model_inputs,
        # (not with a decoder input: an encoder-decoder's encoder may embed with a module of its own that
        # shares the weights of get_input_embeddings(), T5's embed_tokens)
        ids_to_the_model=decoder_input_ids is None and decoder_inputs_embeds is None,
    )
    first = next(iter(leaves))
    key, leaf = leaves[first]
    explicit = mode == "explicit"
    many = isinstance(target, (list, tuple))
    causal = is_causal_decoder(model)
    text = leaves.get("input_ids", leaves.get("inputs_embeds", (key, leaf)))
    model_inputs = model_kwargs(model, *text, attention_mask, causal, model_inputs)
    decoder = next((t for n, (k, t) in leaves.items() if n.startswith("decoder_")), None)
    # an encoder-decoder's next token follows the last decoder position of the decoder's mask
    target_mask = attention_mask if decoder is None else decoder_mask(model_inputs, decoder)
    batches = {t.shape[0] for _, t in leaves.values()}

    captured: Dict[str, Tensor] = {}
    hooks = []
    try:
        with explaining(model, method, mode, epsilon, preset, level, strict) as handle:
            if latent:
                for name, layer in _layers(model).items():
                    hooks.append(
                        layer.register_forward_hook(
                            (
                                lambda n: (
                                    lambda m, a, out: captured.__setitem__(n, out[0] if isinstance(out, tuple) else out)
                                )
                            )(name)
                        )
                    )
            with torch.enable_grad(), handle.rules.context():
                try:
                    with embedded(
                        hooked,
                        input_ids,
                        leaves["input_ids"][1] if hooked is not None else leaf,
                        "lrpcpp.attribute",
                        handle.modules,
                    ):
                        out = _call(model, calls, model_inputs)
                except EmbeddingNotCalledError:
                    if hooked is None or not _takes_input(model, "inputs_embeds"):
                        raise
                    # a forward that reads the ids before it embeds them (XLNet transposes them) and takes
                    # embeddings too: called with those instead (the ids' call carried no relevance)
                    del calls["input_ids"]
                    calls["inputs_embeds"] = for_the_forward(leaves["input_ids"][1])
                    out = _call(model, calls, model_inputs)
                calls.clear()  # the copies of the leaves the forward got: kept by the graph where it needs them
                if causal and attention_mask is not None and key == "inputs_embeds" and not callable(target):
                    _check_pooled_padding(model, logits_of(out), attention_mask)
                explained, ids = select_target(out, target, target_mask, batches.pop() if len(batches) == 1 else None)
                del out  # the whole output (a language model's [batch, seq, vocab] logits) is not needed any more
                check_finite(explained)
            for h in hooks:
                h.remove()
            hooks = []
            inputs: List[Tensor] = [t for _, t in leaves.values()] + list(captured.values())
            # (at the operation level in the rules' mode: a block that the forward checkpoints with
            # torch.utils.checkpoint is recomputed as the forward computed it)
            with handle.backward():
                grads = relevance_backward(explained, inputs, explicit, many)
            coverage = handle.coverage
    finally:
        for h in hooks:
            h.remove()

    k = len(target) if isinstance(target, (list, tuple)) else None
    latent_map = None
    if latent:
        latent_map = {
            name: relevance_of(t, g, explicit, k).detach()
            for (name, t), g in zip(captured.items(), grads[len(leaves) :])
        }
    relevances = {name: relevance_of(t, g, explicit, k).detach() for (name, (_, t)), g in zip(leaves.items(), grads)}
    result = attribution_of(relevances[first], explained, ids, key, latent_map)
    warn_not_finite(relevances, k is not None, sums={first: result.token_relevance})
    result.coverage = coverage
    result.inputs = relevances
    return result


def input_leaves(
    model: nn.Module,
    input_ids: Optional[Tensor],
    inputs_embeds: Optional[Tensor],
    pixel_values: Optional[Tensor],
    decoder_input_ids: Optional[Tensor],
    decoder_inputs_embeds: Optional[Tensor],
    attention_mask: Optional[Tensor],
    embedding: Union[None, str, nn.Module],
    model_inputs: Dict[str, Any],
    forward: Optional[Callable] = None,
    ids_to_the_model: bool = False,
) -> Tuple[Dict[str, Tuple[str, Tensor]], Dict[str, Tensor], Optional[nn.Module]]:
    """The given inputs as relevance leaves: ``(leaves, calls, hooked)``. ``leaves``: by the name each
    was given under, in the order of :func:`attribute`'s parameters, ``(the model's keyword for it,
    the leaf)``; ids are embedded (with :func:`embedding_module`) and the embeddings are the leaf.
    ``calls``: what the model is called with. ``hooked``: for a forward that takes no
    ``inputs_embeds``, the module that embeds ``input_ids``, which must return the ``input_ids``
    leaf while the model is called with the ids themselves (``None`` otherwise); with
    ``ids_to_the_model`` that is so for every forward that takes ``input_ids``: the model then runs on
    the ids as it would without lrpcpp, also where it reads them besides embedding them. ``forward``:
    the model's own forward, whose parameters say which inputs it takes (by default ``model.forward``;
    a patched model's is the patch's)."""
    given = _given_inputs(input_ids, inputs_embeds, pixel_values, decoder_input_ids, decoder_inputs_embeds)
    if embedding is not None and input_ids is None:
        raise ValueError("lrpcpp.attribute: embedding= is the module that embeds input_ids; give it with input_ids")
    embedder = None
    if input_ids is not None:  # a search for it calls the model with all of its inputs
        search = {**model_inputs, **{n: v for n, v in given.items() if n != "input_ids"}}
        if attention_mask is not None:
            search["attention_mask"] = attention_mask
        embedder = embedding_module(model, input_ids, embedding, search)
    # name given -> (the model's keyword for it, the leaf); ids are embedded, the embeddings are the leaf
    leaves: Dict[str, Tuple[str, Tensor]] = {}
    for name in given:
        if name in ("input_ids", "inputs_embeds", "pixel_values"):
            leaves[name] = choose_input(
                model,
                input_ids if name == "input_ids" else None,
                inputs_embeds if name == "inputs_embeds" else None,
                pixel_values if name == "pixel_values" else None,
                embedding=embedder,
            )
        else:
            leaves[name] = _decoder_input(model, decoder_input_ids, decoder_inputs_embeds, forward)
    # a forward without inputs_embeds gets input_ids, and the embedding module's output is the leaf
    hooked = embedder is not None and (
        not _takes_input(model, "inputs_embeds", forward)
        or (ids_to_the_model and _takes_input(model, "input_ids", forward))
    )
    calls: Dict[str, Tensor] = {}  # what the model is called with
    for keyword, t in leaves.values():
        if hooked and keyword == "inputs_embeds" and input_ids is not None:
            calls["input_ids"] = input_ids  # the hooked embedding module returns the leaf t
        else:
            calls[keyword] = for_the_forward(t)
    return leaves, calls, embedder if hooked else None


def for_the_forward(leaf: Tensor) -> Tensor:
    """What the model's forward gets for a relevance leaf: a copy, which the forward may write into in
    place (CTRL scales its embeddings with ``*=``, which autograd refuses on a leaf that requires grad).
    The gradient reaches the leaf through it, and a caller's tensor, whose storage the leaf shares, is
    never written. (Copied with gradients enabled: ``attribute`` may be called under ``torch.no_grad()``.)"""
    with torch.enable_grad():
        return leaf.clone()


def _given_inputs(
    input_ids: Optional[Tensor],
    inputs_embeds: Optional[Tensor],
    pixel_values: Optional[Tensor],
    decoder_input_ids: Optional[Tensor],
    decoder_inputs_embeds: Optional[Tensor],
) -> Dict[str, Tensor]:
    """The inputs given to :func:`attribute`, by name, in the order of its parameters: at least one,
    and never both the ids and the embeddings of one side."""
    for ids, embeds, names in (
        (input_ids, inputs_embeds, "input_ids and inputs_embeds"),
        (decoder_input_ids, decoder_inputs_embeds, "decoder_input_ids and decoder_inputs_embeds"),
    ):
        if ids is not None and embeds is not None:
            raise ValueError(
                f"lrpcpp.attribute: give exactly one of {names}: they are the same input (the ids are embedded "
                "with the model's embedding into the embeddings whose relevance is computed)"
            )
    candidates = {
        "input_ids": input_ids,
        "inputs_embeds": inputs_embeds,
        "pixel_values": pixel_values,
        "decoder_input_ids": decoder_input_ids,
        "decoder_inputs_embeds": decoder_inputs_embeds,
    }
    given = {n: v for n, v in candidates.items() if v is not None}
    if not given:
        raise ValueError(
            "lrpcpp.attribute: no input to explain; give exactly one of input_ids, inputs_embeds, pixel_values, or "
            "several inputs of a model that takes them (text and pixels; an encoder-decoder's decoder_input_ids or "
            "decoder_inputs_embeds)"
        )
    return given


def _decoder_input(
    model: nn.Module,
    decoder_input_ids: Optional[Tensor],
    decoder_inputs_embeds: Optional[Tensor],
    forward: Optional[Callable] = None,
) -> Tuple[str, Tensor]:
    """``("decoder_inputs_embeds", the leaf)``: the decoder's input embeddings, or the ids embedded
    with the decoder's embedding (``model.get_decoder().get_input_embeddings()``, else the shared
    ``model.get_input_embeddings()`` of an encoder-decoder), for a forward that takes them."""
    caller = "lrpcpp.attribute"
    if not _takes_input(model, "decoder_inputs_embeds", forward):
        raise TypeError(
            f"{caller}: the forward of this {type(model).__name__} takes no decoder_inputs_embeds, so the relevance "
            "of the decoder input cannot be read; give decoder_input_ids to an encoder-decoder whose forward takes "
            "decoder_inputs_embeds (a Hugging Face ...ForConditionalGeneration), or pass them as a model input "
            "through a wrapper module"
        )
    if decoder_inputs_embeds is not None:
        return "decoder_inputs_embeds", input_leaf(decoder_inputs_embeds, "decoder_inputs_embeds", caller)
    found = None
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    for owner in (decoder, model):
        get = getattr(owner, "get_input_embeddings", None)
        found = get() if callable(get) else None
        if isinstance(found, nn.Module):
            break
    if not isinstance(found, nn.Module):
        raise TypeError(
            f"{caller}: decoder_input_ids need the decoder's input embeddings (model.get_decoder()."
            f"get_input_embeddings(), or model.get_input_embeddings()), and this {type(model).__name__} has none; "
            "pass decoder_inputs_embeds="
        )
    with torch.no_grad(), unsharded(model, found):
        return "decoder_inputs_embeds", input_leaf(found(decoder_input_ids), "decoder_input_ids", caller)


def decoder_mask(model_inputs: Dict[str, Any], decoder: Tensor) -> Optional[Tensor]:
    """The ``decoder_attention_mask`` among the model's inputs, checked against the decoder's
    ``[batch, seq]``; ``None`` when not given (the last decoder position is explained)."""
    mask = model_inputs.get("decoder_attention_mask")
    if mask is not None and tuple(mask.shape) != tuple(decoder.shape[:2]):
        raise ValueError(
            f"lrpcpp.attribute: decoder_attention_mask must have the shape [batch, seq] = {list(decoder.shape[:2])} "
            f"of the decoder input, got {list(mask.shape)}"
        )
    return mask


# ----------------------------------------------------------------------------- the shared steps
def choose_input(
    model: Optional[nn.Module],
    input_ids: Optional[Tensor],
    inputs_embeds: Optional[Tensor],
    pixel_values: Optional[Tensor],
    caller: str = "lrpcpp.attribute",
    embedding: Optional[nn.Module] = None,
) -> Tuple[str, Tensor]:
    """``(the model's keyword for it, the leaf)``: exactly one of the inputs must be given;
    ``input_ids`` are embedded with ``embedding``, by default the model's input embeddings (without
    grad). The leaf is a floating-point tensor detached from its history that requires grad
    (:func:`input_leaf`)."""
    given = [
        n
        for n, v in (("input_ids", input_ids), ("inputs_embeds", inputs_embeds), ("pixel_values", pixel_values))
        if v is not None
    ]
    if len(given) != 1:
        raise ValueError(f"{caller}: give exactly one of input_ids, inputs_embeds, pixel_values (got {given})")
    if pixel_values is not None:
        return "pixel_values", input_leaf(pixel_values, "pixel_values", caller)
    if input_ids is not None:
        if model is None:
            raise ValueError(f"{caller}: input_ids need the model's input embeddings; pass inputs_embeds")
        embeddings = input_embeddings(model, caller) if embedding is None else embedding
        with torch.no_grad(), unsharded(model, embeddings):  # gathered, outside the forward of an FSDP2 model
            embedded = _embeddings_in(embeddings(input_ids))
        name = type(embeddings).__name__
        if not isinstance(embedded, Tensor):
            raise TypeError(
                f"{caller}: the module that embeds input_ids ({name}) returned a {type(embedded).__name__}, not a "
                "tensor of embeddings (or a tuple that begins with one); pass embedding= (a module that returns "
                "them) or inputs_embeds="
            )
        return "inputs_embeds", input_leaf(embedded, f"the embeddings of input_ids ({name}'s output)", caller)
    return "inputs_embeds", input_leaf(inputs_embeds, "inputs_embeds", caller)


def _embeddings_in(out: Any) -> Any:
    """The embeddings in an embedding module's output: the output, or the first item of a tuple
    that begins with a tensor (I-BERT's ``QuantEmbedding`` returns the embeddings with their
    quantisation scale)."""
    return out[0] if type(out) is tuple and out and isinstance(out[0], Tensor) else out


def input_leaf(x: object, name: str, caller: str = "lrpcpp.attribute") -> Tensor:
    """``x`` checked (a floating-point tensor) as the leaf whose relevance is computed: detached,
    requiring grad; an inference tensor (made under ``torch.inference_mode()``), which cannot require
    grad, is copied first."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{caller}: {name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{caller}: {name} must be floating point (embeddings or pixels), got {x.dtype}")
    return (x.clone() if x.is_inference() else x).detach().requires_grad_()


def model_kwargs(
    model: nn.Module,
    key: str,
    leaf: Tensor,
    attention_mask: Optional[Tensor],
    causal: bool,
    model_inputs: Dict[str, Any],
    caller: str = "lrpcpp.attribute",
) -> Dict[str, Any]:
    """The keyword arguments of the model besides its input: ``model_inputs`` with the
    ``attention_mask`` (checked against the tokens' ``[batch, seq]``) and, for a causal decoder given
    embeddings, the :func:`position_ids` of the mask unless given."""
    out = dict(model_inputs)
    if attention_mask is None:
        return out
    if key == "inputs_embeds" and tuple(attention_mask.shape) != tuple(leaf.shape[:2]):
        raise ValueError(
            f"{caller}: attention_mask must have the shape [batch, seq] = "
            f"{list(leaf.shape[:2])} of the tokens, got {list(attention_mask.shape)}"
        )
    out["attention_mask"] = attention_mask
    if key == "inputs_embeds" and "position_ids" not in out:
        positions = position_ids(model, causal, attention_mask)
        if positions is not None:
            out["position_ids"] = positions
    return out


@contextlib.contextmanager
def explaining(
    model: nn.Module,
    method: Optional[str] = None,
    mode: str = "gradient",
    epsilon: Optional[float] = None,
    preset: Union[str, Preset, None] = None,
    level: str = "auto",
    strict: bool = False,
) -> Iterator[PatchHandle]:
    """``model`` in eval mode and patched for the block (:func:`lrpcpp.patch`); in gradient mode its
    parameters are frozen as well. Gradient mode asks autograd for the inputs' gradient only: with
    the parameters frozen, it keeps no layer inputs alive for weight gradients. (Explicit mode's
    rules tell a parameter from a constant by ``requires_grad``, so there they stay as they are.)
    Everything is put back on leaving the block, also by an exception."""
    named = named_modules(model)  # the module tree, walked once for both
    with (
        ModelState(model, freeze=mode != "explicit", modules=[m for _, m in named]),
        patch_walked(model, named, method, mode, epsilon, preset, level, strict) as handle,
    ):
        yield handle


def all_finite(t: Tensor) -> bool:
    """Whether every element of ``t`` is finite: its sum is (a NaN or an infinity makes the sum NaN or
    infinite), a reduction several times cheaper than the element-wise test, which runs only where the
    sum is not finite (there a sum of large finite values may have overflowed). Half-precision tensors
    are summed in float32."""
    if t.numel() == 0:
        return True
    total = t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum()
    return math.isfinite(float(total)) or bool(torch.isfinite(t).all())


def check_finite(explained: Tensor, caller: str = "lrpcpp.attribute") -> None:
    """Refuses an explained value that is NaN or infinite: its relevance would be NaN or infinite
    too. The model's own forward computed it (rules change no forward value)."""
    if all_finite(explained.detach()):
        return
    bad = ~torch.isfinite(explained.detach())  # (not all finite: some element is bad)
    items = sorted({int(i) for i in bad.nonzero()[:, 0]})
    raise ValueError(
        f"{caller}: the explained output of batch item(s) {items} is not finite "
        f"({explained.detach()[bad].flatten()[:4].tolist()}): the model's own forward gives it (for example "
        "a row whose attention mask leaves a position nothing to attend to, or an overflow in float16), "
        "and its relevance would be NaN or infinite"
    )


def warn_not_finite(
    relevances: Dict[str, Tensor],
    many: bool,
    caller: str = "lrpcpp.attribute",
    sums: Optional[Dict[str, Tensor]] = None,
) -> None:
    """Warns once, naming the inputs and the batch items, where a finite explained output still gives
    NaN or infinite relevance: the backward met a non-finite value of the model's forward (such as a
    padded position that attends to nothing, whose NaN reaches the others as 0 x NaN). ``sums``: an
    input's relevance summed over a dim (its per-token values), by name, where the caller has them:
    finite only where the relevance is (a NaN or an infinity stays one in the sum), so their few
    values are tested first, the relevance itself only where a sum is not finite."""
    found = []
    for name, relevance in relevances.items():
        total = sums.get(name) if sums else None
        if (total is not None and all_finite(total)) or all_finite(relevance):
            continue
        bad = ~torch.isfinite(relevance)  # (not all finite: some element is bad)
        found.append(f"{name} (batch item(s) {sorted({int(i) for i in bad.nonzero()[:, 1 if many else 0]})})")
    if found:
        warnings.warn(
            f"{caller}: the relevance of {', '.join(found)} is not finite, although the explained output is: the "
            "model's forward computes a NaN or infinite value on the way (for example at a padded position that its "
            "attention mask leaves nothing to attend to), and the backward carries it",
            RuntimeWarning,
            stacklevel=3,
        )


def relevance_backward(
    explained: Tensor, inputs: List[Tensor], explicit: bool, many: bool
) -> Tuple[Optional[Tensor], ...]:
    """The gradients of ``inputs`` from ``explained`` seeded as the semantics asks: with 1 (gradient
    mode) or with the explained value itself (explicit mode); ``many``: one map per target
    (:func:`batched_backward`). Where ``explained`` does not require grad, no path from the inputs
    carries relevance to it (the rules hold every path constant, such as a divisor, or it does not
    depend on the inputs): a warning says so, and every input gets no gradient (zero relevance)."""
    if not explained.requires_grad:
        warnings.warn(
            "lrpcpp: the explained value carries no relevance from the inputs: every path from them to it is held "
            "constant by the rules (a divisor or a normaliser, a step function such as sign or round), or it does not "
            "depend on them; their relevance is zero",
            UserWarning,
            stacklevel=3,
        )
        return (None,) * len(inputs)
    try:
        if many:
            return batched_backward(explained, inputs, explicit)
        seed = explained.detach() if explicit else torch.ones_like(explained)
        return torch.autograd.grad(explained, inputs, seed, allow_unused=True)
    except torch.utils.checkpoint.CheckpointError as e:
        raise RuntimeError(
            "lrpcpp: the backward pass failed: a block of the model that torch.utils.checkpoint checkpoints runs its "
            "forward again in the backward pass outside the rules, and computes other tensors than the forward with "
            "the rules did; run a backward pass of your own through a model patched with lrpcpp.patch in "
            "`with handle.backward():` (lrpcpp.attribute does), or explain the model without that checkpointing. "
            "torch: "
            f"{' '.join(str(e).split())[:300]}"
        ) from e
    except RuntimeError as e:
        if "modified by an inplace operation" not in str(e) and "has been modified inplace" not in str(e):
            raise
        raise RuntimeError(
            "lrpcpp: the backward pass failed: the model's forward wrote in place into a tensor that the backward "
            "needs, which breaks its plain gradient as well; where that tensor is a cache the forward updates (RWKV's "
            f"recurrent state), pass use_cache=False. torch: {e}"
        ) from e


def relevance_of(x: Tensor, grad: Optional[Tensor], explicit: bool, k: Optional[int] = None) -> Tensor:
    """The relevance of ``x`` from its gradient: the gradient itself (explicit mode) or gradient
    times input; zeros (with a leading ``[k]`` dim for ``k`` targets) where ``x`` got no gradient."""
    if grad is None:
        return torch.zeros(((k,) if k is not None else ()) + tuple(x.shape), dtype=x.dtype, device=x.device)
    return grad if explicit else grad * x.detach()


def attribution_of(
    relevance: Tensor,
    explained: Tensor,
    ids: Optional[Tensor],
    key: str,
    latent: Optional[Dict[str, Tensor]] = None,
) -> Attribution:
    """The :class:`Attribution` of the input's relevance: summed over the hidden dim of embeddings or
    the channel dim of pixels (``key``) for the per-token or per-pixel values."""
    relevance = relevance.detach()
    return Attribution(
        relevance=relevance,
        token_relevance=relevance.sum(dim=-3 if key == "pixel_values" else -1),
        output=explained.detach(),
        target=ids,
        latent=latent,
    )


def batched_backward(explained: Tensor, inputs: List[Tensor], explicit: bool):
    """K relevance maps. Gradient mode: one backward pass over a [K]-batched seed
    (``is_grads_batched``; the lrpcpp backward ops have batching rules). Explicit mode, whose
    Python-level rules have none: K backward passes through the same graph."""
    k = explained.shape[-1]
    if not explicit:
        eye = torch.eye(k, dtype=explained.dtype, device=explained.device)
        seeds = eye[:, None, :].expand(k, explained.shape[0], k).contiguous()
        return torch.autograd.grad(explained, inputs, seeds, allow_unused=True, is_grads_batched=True)
    per_target = []
    for i in range(k):
        seed = torch.zeros_like(explained)
        seed[:, i] = explained.detach()[:, i]
        per_target.append(torch.autograd.grad(explained, inputs, seed, allow_unused=True, retain_graph=i < k - 1))
    return tuple(
        None
        if all(g[j] is None for g in per_target)
        else torch.stack([g[j] if g[j] is not None else torch.zeros_like(inputs[j]) for g in per_target])
        for j in range(len(inputs))
    )

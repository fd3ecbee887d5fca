"""One-call attribution of a whole model: ``lrpcpp.attribute(model, input_ids=ids)``."""

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .patching import ModelState, patch

__all__ = ["attribute", "Attribution"]

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
    """

    relevance: Tensor
    token_relevance: Tensor
    output: Tensor
    target: Optional[Tensor]
    latent: Optional[Dict[str, Tensor]] = None


def _layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The blocks of every ``nn.ModuleList`` of repeated layers (decoder/encoder layers)."""
    found: Dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if any(p is not None for p in module[0].parameters()):
                for i, layer in enumerate(module):
                    found[f"{name}.{i}" if name else str(i)] = layer
    return found


def _call(model: nn.Module, key: str, leaf: Tensor, model_kwargs: dict):
    """model(pixel_values=...) for Hugging Face models; a torch.nn or torchvision model whose forward
    has no ``pixel_values`` parameter gets the pixels as its first positional argument."""
    if key == "pixel_values":
        params = inspect.signature(type(model).forward).parameters
        if "pixel_values" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return model(leaf, **model_kwargs)
    return model(**{key: leaf}, **model_kwargs)


def _logits(out) -> Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        if isinstance(out, Tensor):
            return out
        raise ValueError(
            "lrpcpp.attribute: the model returns no logits (a base model?); pass target=callable that maps "
            "the model output to one value per batch item"
        )
    return logits


def _last_positions(attention_mask: Optional[Tensor], batch: int, seq: int, device) -> Tensor:
    if attention_mask is None:
        return torch.full((batch,), seq - 1, dtype=torch.long, device=device)
    positions = torch.arange(seq, device=attention_mask.device).expand(batch, seq)
    return torch.where(attention_mask.bool(), positions, -1).amax(dim=1).to(device)


def _select(out, target: Target, attention_mask: Optional[Tensor]):
    """(explained values [batch] or [batch, K], target ids or None)."""
    if callable(target) and not isinstance(target, Tensor):
        value = target(out)
        if not isinstance(value, Tensor) or value.dim() > 1:
            raise ValueError("lrpcpp.attribute: a callable target must return a 0-D or 1-D tensor")
        return value.reshape(-1), None
    logits = _logits(out)
    if logits.dim() == 3:  # a language model: explain the next token after the last real position
        rows = torch.arange(logits.shape[0], device=logits.device)
        logits = logits[rows, _last_positions(attention_mask, logits.shape[0], logits.shape[1], logits.device)]
    elif logits.dim() != 2:
        raise ValueError(f"lrpcpp.attribute: expected logits of shape [batch, classes] or [batch, seq, vocab], "
                         f"got {tuple(logits.shape)}")
    batch, classes = logits.shape
    if target is None:
        ids = logits.detach().argmax(dim=-1)
    elif isinstance(target, int):
        ids = torch.full((batch,), target, dtype=torch.long, device=logits.device)
    elif isinstance(target, Tensor):
        ids = target.to(device=logits.device, dtype=torch.long).reshape(-1)
        if ids.numel() == 1:
            ids = ids.expand(batch)
        if ids.shape != (batch,):
            raise ValueError(f"lrpcpp.attribute: target tensor must hold one id per batch item ({batch}), "
                             f"got shape {tuple(target.shape)}")
    elif isinstance(target, (list, tuple)) and target and all(isinstance(t, int) for t in target):
        ids = torch.tensor(list(target), dtype=torch.long, device=logits.device).expand(batch, len(target))
    else:
        raise TypeError("lrpcpp.attribute: target must be None, an int, a tensor of ids, a list of ints or a callable")
    if int(ids.min()) < 0 or int(ids.max()) >= classes:
        raise ValueError(f"lrpcpp.attribute: target ids must lie in [0, {classes}), got {ids.tolist()}")
    picked = logits.gather(-1, ids if ids.dim() == 2 else ids[:, None])
    return (picked if ids.dim() == 2 else picked[:, 0]), ids


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
    **model_kwargs,
) -> Attribution:
    """Explains ``model``'s output with AttnLRP (or CP-LRP) in one forward and one backward pass.

    Give exactly one of ``input_ids`` (embedded with the model's own input embeddings),
    ``inputs_embeds`` or ``pixel_values``. ``target``: ``None`` (the top class, or the top next-token
    logit after the last unmasked position), an int, a tensor of one id per item, a list of K ids
    (K relevance maps from one backward pass), or a callable ``f(model_output) -> tensor`` (for example
    a similarity of two embeddings). The model runs in eval mode and is patched for the duration
    of the call only; in gradient mode its parameters are also frozen for the call, since no weight
    gradient is computed. Afterwards every submodule's own ``training`` flag and every parameter's
    ``requires_grad`` are as they were, also when the call raises.

    ``preset``: a registered preset name (``"vit"``, ``"epsilon_gamma_box"``, ...; see
    :mod:`lrpcpp.presets`) or an :class:`lrpcpp.Preset`, putting a rule on every linear and
    convolution layer; the keyword arguments that preset takes (``gamma_linear=0.05``, ``low=...``)
    go to it, the others to the model. ``rules``: per-layer overrides, ``{module name or type: rule}``.
    ``method=None`` is the preset's method, else ``"attnlrp"``.
    """
    if preset is not None:
        from . import presets as _presets

        if isinstance(preset, str):
            names = _presets.preset_arguments(preset)
            preset_args = {k: model_kwargs.pop(k) for k in list(model_kwargs) if k in names}
            preset = _presets.get_preset(preset, rules, **preset_args)
        else:
            preset = _presets.get_preset(preset, rules)
    elif rules is not None:
        raise ValueError("lrpcpp.attribute: rules= overrides the layer rules of a preset; give preset= as well")
    given = [n for n, v in (("input_ids", input_ids), ("inputs_embeds", inputs_embeds),
                            ("pixel_values", pixel_values)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"lrpcpp.attribute: give exactly one of input_ids, inputs_embeds, pixel_values (got {given})")
    if pixel_values is not None:
        key, leaf = "pixel_values", pixel_values
    else:
        key = "inputs_embeds"
        if input_ids is not None:
            with torch.no_grad():
                leaf = model.get_input_embeddings()(input_ids)
        else:
            leaf = inputs_embeds
    if not leaf.is_floating_point():
        raise TypeError(f"lrpcpp.attribute: {given[0]} must be floating point (embeddings or pixels), got {leaf.dtype}")
    leaf = leaf.detach().requires_grad_()
    explicit = mode == "explicit"
    many = isinstance(target, (list, tuple))
    if attention_mask is not None:
        model_kwargs["attention_mask"] = attention_mask

    # Gradient mode asks autograd for the inputs' gradient only: with the parameters frozen for the
    # call, it keeps no layer inputs alive for weight gradients. (Explicit mode's rules tell a
    # parameter from a constant by requires_grad, so there they stay as they are.)
    captured: Dict[str, Tensor] = {}
    hooks = []
    try:
        with ModelState(model, freeze=not explicit), \
                patch(model, method=method, mode=mode, epsilon=epsilon, preset=preset) as handle:
            if latent:
                for name, layer in _layers(model).items():
                    hooks.append(layer.register_forward_hook(
                        (lambda n: lambda m, a, out: captured.__setitem__(n, out[0] if isinstance(out, tuple) else out))(name)))
            with torch.enable_grad(), handle.rules.context():
                out = _call(model, key, leaf, model_kwargs)
                explained, ids = _select(out, target, attention_mask)
                del out  # the whole output (a language model's [batch, seq, vocab] logits) is not needed any more
            for h in hooks:
                h.remove()
            hooks = []
            inputs: List[Tensor] = [leaf] + list(captured.values())
            if many:
                grads = _batched_backward(explained, inputs, explicit)
            else:
                seed = explained.detach() if explicit else torch.ones_like(explained)
                grads = torch.autograd.grad(explained, inputs, seed, allow_unused=True)
    finally:
        for h in hooks:
            h.remove()

    def relevance_of(x: Tensor, g: Optional[Tensor]) -> Tensor:
        if g is None:
            return torch.zeros(((len(target),) if many else ()) + tuple(x.shape), dtype=x.dtype, device=x.device)
        return g if explicit else g * x.detach()

    relevance = relevance_of(leaf, grads[0])
    token_dim = -3 if key == "pixel_values" else -1
    latent_map = None
    if latent:
        latent_map = {name: relevance_of(t, g) for (name, t), g in zip(captured.items(), grads[1:])}
    return Attribution(
        relevance=relevance.detach(),
        token_relevance=relevance.detach().sum(dim=token_dim),
        output=explained.detach(),
        target=ids,
        latent=latent_map,
    )


def _batched_backward(explained: Tensor, inputs: List[Tensor], explicit: bool):
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
    return tuple(None if all(g[j] is None for g in per_target) else torch.stack(
        [g[j] if g[j] is not None else torch.zeros_like(inputs[j]) for g in per_target]) for j in range(len(inputs)))

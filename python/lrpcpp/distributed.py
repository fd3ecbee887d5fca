"""lrpcpp on sharded models: FSDP2 (``fully_shard``) and tensor parallelism (DTensor).

* The DTensor sharding rules of the lrpcpp ops that explain a model in gradient mode (at the
  registry and at the operation level), and of the element-wise explicit ops, so that they run on
  the local shards without gathering: :func:`register` (called by :func:`lrpcpp.patch` and
  :func:`lrpcpp.attribute` as soon as ``torch.distributed.tensor`` has been imported; nothing is
  imported otherwise). Each rule lists the placements the op accepts; DTensor redistributes an
  input that has another one (for example it gathers a tensor sharded along a normalised dim).
* :func:`unsharded`: the parameters of a module of an FSDP2 model, gathered for a call outside the
  model's forward (the embedding of ``input_ids`` that :func:`lrpcpp.attribute` computes).

The rules, per op (Replicate is always accepted; ``Shard(d)`` along the dims listed, the op's other
tensors placed to match):

* element-wise, sharded along any dim (``x`` and ``y`` alike): ``gi_identity``,
  ``gi_identity_factor``, ``silu_identity``, ``gelu_identity``, ``tanh_identity``,
  ``relu_identity``, ``sigmoid_identity``, ``stop_relevance``, ``identity_relevance``;
* a scale broadcast to the tensor, sharded along any dim (the scale or factor along the same dim
  where it is not broadcast, else replicated): ``gi_grad_scale``, ``gi_scale_backward``;
* norms, sharded along the dims before the normalised ones (weight and bias replicated; a tensor
  sharded along a normalised dim is gathered): ``gi_layer_norm``, ``gi_layer_norm_backward``,
  ``rms_norm_identity``, ``layer_norm_identity``; ``normalize_identity`` along any dim but ``dim``.

* the epsilon rule of a linear layer, ``linear_epsilon``: along the output features (the weight's
  rows and the bias sharded: column-wise parallel), along the input features (``x``'s last dim and
  the weight's columns, without a bias: row-wise parallel, the output a partial sum) or along a
  leading dim of ``x``; ``linear_epsilon_relevance`` likewise, its result a partial sum when the
  output features are sharded (the relevance of ``x`` sums over them).

``gi_scale_backward`` and ``identity_relevance`` are linear in their gradient: a partial sum
(``Partial()``) stays one. The other lrpcpp ops (the explicit rules of products, softmax, other
layers) have no rule: on a DTensor they raise DTensor's ``NotImplementedError``.
"""

import contextlib
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import torch
from torch import Tensor, nn

__all__ = ["RULES", "register", "register_if_loaded", "unsharded", "placed_like"]

_registered = False


def _dim(spec: Any) -> int:
    return len(spec.shape)


def _elementwise(tensors: int):
    """A rule for an op whose first ``tensors`` arguments are tensors of one shape (the rest are not
    tensors): shard-preserving along every dim."""

    def rule(x, *args, **kwargs):
        from torch.distributed.tensor import Replicate, Shard

        rest = [None] * (len(args) + 1 - tensors)
        out = [([Replicate()], [Replicate()] * tensors + rest)]
        out += [([Shard(d)], [Shard(d)] * tensors + rest) for d in range(_dim(x))]
        return out

    return rule


def _scaled(grad, factor, *args, linear: bool = False):
    """``grad`` times a ``factor`` broadcast to it: the factor is sharded along the dim of ``grad``
    it spans, or replicated where it is broadcast; ``linear``: a partial sum of ``grad`` stays one."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    n, m = _dim(grad), _dim(factor)
    rest: List[Any] = [None] * len(args)
    out: List[Tuple[List[Any], List[Any]]] = [([Replicate()], [Replicate(), Replicate()] + rest)]
    for d in range(n):
        f = d - (n - m)  # the factor's dim that lines up with d (right-aligned broadcast)
        spans = f >= 0 and factor.shape[f] == grad.shape[d] and grad.shape[d] != 1
        out.append(([Shard(d)], [Shard(d), Shard(f) if spans else Replicate()] + rest))
    if linear:
        out.append(([Partial()], [Partial(), Replicate()] + rest))
    return out


def _normalised(x, normalized: Sequence[int], optional: List[Optional[Any]], rest: int):
    """The rule of a norm over the last ``len(normalized)`` dims of ``x`` (its arguments: ``x``,
    the normalised shape, the ``optional`` tensors, ``rest`` others): sharded along the dims before
    the normalised ones, the weight and bias replicated (``None`` where not given)."""
    from torch.distributed.tensor import Replicate, Shard

    params: List[Any] = [Replicate() if t is not None else None for t in optional]
    tail: List[Any] = [None] * rest
    out: List[Tuple[List[Any], List[Any]]] = [([Replicate()], [Replicate(), None] + params + tail)]
    for d in range(_dim(x) - len(normalized)):
        out.append(([Shard(d)], [Shard(d), None] + params + tail))
    return out


def _relevance(grad, dtype):
    """``identity_relevance``: element-wise, and linear in ``grad``."""
    from torch.distributed.tensor import Partial

    return _elementwise(1)(grad, dtype) + [([Partial()], [Partial(), None])]


def _norm(x, normalized_shape, weight=None, bias=None, eps=None):
    return _normalised(x, normalized_shape, [weight, bias], 1)


def _norm_backward(grad, rstd, normalized_shape, weight):
    # the placements of (grad, rstd, normalized_shape, weight): rstd has one value per row of grad
    from torch.distributed.tensor import Replicate, Shard

    w = Replicate() if weight is not None else None
    out = [([Replicate()], [Replicate(), Replicate(), None, w])]
    for d in range(_dim(grad) - len(normalized_shape)):
        out.append(([Shard(d)], [Shard(d), Shard(d), None, w]))
    return out


def _rms_norm(x, normalized_shape, weight=None, eps=None):
    return _normalised(x, normalized_shape, [weight], 1)


def _normalize(x, p=2.0, dim=1, eps=1e-12):
    from torch.distributed.tensor import Replicate, Shard

    dim = dim % _dim(x)
    out = [([Replicate()], [Replicate(), None, None, None])]
    out += [([Shard(d)], [Shard(d), None, None, None]) for d in range(_dim(x)) if d != dim]
    return out


def _linear(x, weight, bias=None, epsilon=None):
    """``linear_epsilon``: along the output features (the weight's rows, column-wise parallel), along
    the input features (its columns, row-wise parallel: a partial sum, without a bias only), or
    along a leading dim of ``x`` (the weight replicated)."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    n, b = _dim(x), bias is not None
    out = [([Replicate()], [Replicate(), Replicate(), Replicate() if b else None, None])]
    out.append(([Shard(n - 1)], [Replicate(), Shard(0), Shard(0) if b else None, None]))
    if not b:
        out.append(([Partial()], [Shard(n - 1), Shard(1), None, None]))
    out += [([Shard(d)], [Shard(d), Replicate(), Replicate() if b else None, None]) for d in range(n - 1)]
    return out


def _linear_relevance(grad, x, weight, output, epsilon):
    """``linear_epsilon_relevance`` (``x * ((grad / stab(output)) @ weight)``, linear in ``grad``
    for a given output): along the output features, a partial sum; along the input features (the
    whole output), sharded like ``x``; along a leading dim, sharded."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    n = _dim(x)
    out = [([Replicate()], [Replicate()] * 4 + [None])]
    out.append(([Partial()], [Shard(n - 1), Replicate(), Shard(0), Shard(n - 1), None]))
    out.append(([Shard(n - 1)], [Replicate(), Shard(n - 1), Shard(1), Replicate(), None]))
    out += [([Shard(d)], [Shard(d), Shard(d), Replicate(), Shard(d), None]) for d in range(n - 1)]
    return out


# op name -> its rule: a function of the op's arguments (a tensor's stand-in has ``.shape``) listing
# the acceptable (output placements, input placements), as ``register_sharding`` takes them
RULES: Dict[str, Callable[..., Any]] = {
    "gi_identity": _elementwise(2),
    "gi_identity_factor": _elementwise(2),
    "gi_grad_scale": _scaled,
    "gi_scale_backward": lambda grad, factor, dtype: _scaled(grad, factor, dtype, linear=True),
    "gi_layer_norm": _norm,
    "gi_layer_norm_backward": _norm_backward,
    "rms_norm_identity": _rms_norm,
    "layer_norm_identity": _norm,
    "normalize_identity": _normalize,
    "identity_relevance": _relevance,
    "stop_relevance": _elementwise(1),
    "linear_epsilon": _linear,
    "linear_epsilon_relevance": _linear_relevance,
    **{f"{name}_identity": _elementwise(1) for name in ("silu", "gelu", "tanh", "relu", "sigmoid")},
}


def register() -> None:
    """Registers the DTensor sharding rules of the lrpcpp ops (``RULES``, the list above);
    once per process. Needs ``torch.distributed`` (a torch built with it)."""
    global _registered
    if _registered:
        return
    if not torch.distributed.is_available():
        raise RuntimeError(
            "lrpcpp.distributed.register: this torch is built without torch.distributed, which DTensor needs"
        )
    from torch.distributed.tensor.experimental import register_sharding

    for name, rule in RULES.items():
        register_sharding(getattr(torch.ops.lrpcpp, name).default)(rule)
    _registered = True


def register_if_loaded() -> None:
    """:func:`register`, when ``torch.distributed.tensor`` has been imported (a DTensor can exist);
    else nothing (no import)."""
    if not _registered and "torch.distributed.tensor" in sys.modules:
        register()


def _dtensor_type() -> Optional[type]:
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def placed_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (a plain tensor that ``like`` broadcasts with, such as a gradient scale) as a replicated
    DTensor on ``like``'s mesh when ``like`` is a DTensor; else ``t`` itself."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(like, dtensor) or isinstance(t, dtensor):
        return t
    from torch.distributed.tensor import Replicate

    mesh = cast(Any, like).device_mesh
    return cast(Any, dtensor).from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _fsdp_owner(model: nn.Module, module: object) -> Optional[nn.Module]:
    """The FSDP2 module of ``model`` that holds ``module``'s parameters (its nearest ancestor made
    by ``fully_shard``, itself included), or ``None``."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    owner_type = getattr(fsdp, "FSDPModule", None) if fsdp is not None else None
    if owner_type is None:
        return None
    path: Tuple[nn.Module, ...] = ()
    for name, m in model.named_modules():
        if m is module:
            parts = name.split(".") if name else []
            path = (model,) + tuple(model.get_submodule(".".join(parts[: i + 1])) for i in range(len(parts)))
            break
    return next((m for m in reversed(path) if isinstance(m, owner_type)), None)


@contextlib.contextmanager
def unsharded(model: nn.Module, module: object) -> Iterator[None]:
    """For the block, ``module`` (a module of ``model``) with its own parameters: when ``model`` is
    sharded with FSDP2, the parameters that its forward would gather are gathered (``unshard``) and
    sharded again afterwards; otherwise nothing."""
    owner = _fsdp_owner(model, module)
    if owner is None:
        yield
        return
    owner.unshard()  # type: ignore[operator]
    try:
        yield
    finally:
        owner.reshard()  # type: ignore[operator]

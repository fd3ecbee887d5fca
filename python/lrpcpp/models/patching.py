"""Scoped, reversible patching of a model instance for relevance propagation.

``lrpcpp.patch(model)`` changes one model instance so that its own forward pass computes
relevance in the backward pass, without editing the model's source:

* ``mode="gradient"`` (default; RULES.md section 2): autograd carries ``R / x``. Seed the explained
  value with 1 (``logit.backward()``) and read relevance as ``x * x.grad``. Linear layers, additions,
  masking and the attention kernel (eager, SDPA or flash) keep their own gradient; element-wise
  activations and RMSNorms get :func:`lrpcpp.functional.gi_identity` (an RMSNorm written as
  transformers' ``LlamaRMSNorm``: its own forward with the rsqrt factor held constant), LayerNorms
  :func:`lrpcpp.functional.gi_layer_norm` (standard deviation held constant), and the products of
  two relevance-carrying tensors get their gradient scaled by :func:`lrpcpp.functional.gi_grad_scale`.
* ``mode="explicit"`` (RULES.md section 1): the backward pass carries relevance itself, through
  the explicit lrpcpp ops; the model's forward runs inside :class:`lrpcpp.ExplicitRules`. Seed with the
  explained value; relevance is ``x.grad``.

``method`` picks the treatment of the products: ``"attnlrp"`` splits them uniformly (query and key
take a quarter of the attention relevance each, value half; gate and up projection of a gated MLP
half each), ``"cp-lrp"`` holds the attention weights and the gate constant (value and up projection
take everything).

Everything the patch changes is a hook or an instance-level ``forward`` of a module of *this*
model; :meth:`PatchHandle.remove` (or leaving the ``with`` block) restores exactly that. Classes,
functions and registries shared with other models are never touched.
"""

import contextlib
import functools
import inspect
import sys
import textwrap
import types
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union, cast

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .. import distributed as _distributed
from .. import functional as lf
from . import explicit
from . import families as _families
from .layers import apply_preset
from .operations import GradientRules, warn_unruled
from .presets import Preset, get_preset
from .state import claim, release
from .tracking import carries, is_rule_mode, requires_grad, share_scale, tensor_args, without
from .tree import named_modules

__all__ = ["patch", "PatchHandle", "METHODS", "MODES", "LEVELS"]

METHODS = ("attnlrp", "cp-lrp")
MODES = ("gradient", "explicit")
LEVELS = ("auto", "registry", "operations")

# element-wise activation modules of torch.nn (the identity rule applies to each of them)
_TORCH_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Mish,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.LeakyReLU,
    nn.Softplus,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Tanhshrink,
    nn.Identity,
)


# activations whose own gradient is the identity rule's gradient form exactly: relu(x) = relu'(x) x, so
# g_x = g_y relu'(x) gives x g_x = y g_y (0 where x <= 0), where g_y y / stab(x) would be g_y x / (x + eps)
# on the positive side (LeakyReLU's gradient at x = 0 is its slope, not 0: it keeps the factor)
_GRADIENT_IS_IDENTITY = (nn.ReLU,)


# the ends of the class names of activations that models define for themselves (BLOOM's BloomGelu)
_ACTIVATION_NAMES = ("gelu", "silu", "swish", "relu", "mish", "tanh", "sigmoid", "softplus")


def is_activation(module: nn.Module) -> bool:
    """An element-wise activation module: torch.nn's, any of Hugging Face's ``transformers.activations``,
    or a model's own (BLOOM's ``BloomGelu``): a module with no parameters, buffers or submodules whose
    class name ends in an activation's name (``...Gelu``, ``...SiLU``, ``...Swish``, ...)."""
    if isinstance(module, _TORCH_ACTIVATIONS) or type(module).__module__ == "transformers.activations":
        return True
    return type(module).__name__.lower().endswith(_ACTIVATION_NAMES) and not (
        module._parameters or module._buffers or module._modules
    )


def _out_of_place(module: nn.Module, forward: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``forward(x)`` with ``x`` left unchanged. torch.nn's in-place activations (``nn.ReLU(inplace=True)``)
    run with their flag off for the call: the same values in a new tensor, with no copy of ``x`` made first
    (the flag is restored after, also when the call fails); any other in-place module runs on a copy."""
    if not _attribute(module, "inplace"):
        return forward(x)
    if not type(module).__module__.startswith("torch.nn."):
        return forward(x.clone())
    flagged = cast(Any, module)  # a bool attribute, which nn.Module's __setattr__ stub does not type
    flagged.inplace = False
    try:
        return forward(x)
    finally:
        flagged.inplace = True


_COMPUTES_LLAMA_RMS_NORM: "weakref.WeakKeyDictionary[type, bool]" = weakref.WeakKeyDictionary()


def _forward_source(cls: type) -> Optional[str]:
    try:
        return textwrap.dedent(inspect.getsource(cls.forward))  # type: ignore[attr-defined]
    except (AttributeError, OSError, TypeError):
        return None


@functools.lru_cache(maxsize=None)
def _llama_rms_norm_source() -> Optional[str]:
    """The source of transformers' ``LlamaRMSNorm.forward``, read once (``None`` without transformers)."""
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:
        return None
    return _forward_source(LlamaRMSNorm)


def computes_llama_rms_norm(module: nn.Module) -> bool:
    """Whether ``module``'s class has, line for line, the forward of transformers' ``LlamaRMSNorm``
    (``weight * (x.float() * rsqrt(mean(x.float()**2) + variance_epsilon)).to(x.dtype)``), as about 140
    model families' RMSNorm classes do; asked once per class."""
    cls = type(module)
    known = _COMPUTES_LLAMA_RMS_NORM.get(cls)
    if known is None:
        reference = _llama_rms_norm_source()
        known = reference is not None and _forward_source(cls) == reference
        _COMPUTES_LLAMA_RMS_NORM[cls] = known
    return known and isinstance(_attribute(module, "weight"), Tensor)


# the dtypes that LlamaRMSNorm's float32 arithmetic holds exactly: a float64 input is rounded to float32
# there, and so would be the gradient through its casts (it keeps the identity rule's factor instead)
_WITHIN_FLOAT32 = (torch.float32, torch.bfloat16, torch.float16)


def _llama_rms_norm_rstd_constant(module: nn.Module, x: Tensor) -> Tensor:
    """LlamaRMSNorm's forward, op for op (so the same value, bitwise), with the rsqrt factor held
    constant (RULES.md section 2): its gradient is ``g * weight * rsqrt(...)``, for which autograd keeps
    one factor per row and the weight, where the identity rule's ``y / x`` is a tensor of x's size."""
    norm = cast(Any, module)  # (its attributes, which nn.Module's __getattr__ stub types as modules)
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.detach().pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * h.to(input_dtype)


def is_elementwise_norm(module: nn.Module, family: Optional[_families.Family]) -> bool:
    name = type(module).__name__
    return name.endswith("RMSNorm") or (family is not None and name in family.norms)


_T = TypeVar("_T")


def _per_class(test: Callable[[nn.Module], _T]) -> Callable[[nn.Module], _T]:
    """``test``, which depends on a module's class only, asked once per class (for one patch: a model
    has many modules of few classes)."""
    answers: Dict[type, _T] = {}

    def cached(module: nn.Module) -> _T:
        cls = type(module)
        if cls not in answers:
            answers[cls] = test(module)
        return answers[cls]

    return cached


def _family_role(module: nn.Module, family: _families.Family) -> Optional[str]:
    """The part a module of this class plays in the family's description: ``"attention"``,
    ``"gated_mlp"``, ``"moe"`` or ``None``."""
    for role in ("attention", "gated_mlp", "moe"):
        if _families.is_a(module, getattr(family, role)):
            return role
    return None


def _is_identity_unit(module: nn.Module, family: Optional[_families.Family]) -> bool:
    """An activation or an element-wise norm module (not ``nn.Identity``): one identity-rule unit."""
    return (is_elementwise_norm(module, family) or is_activation(module)) and not isinstance(module, nn.Identity)


def _type_role(module: nn.Module, family: Optional[_families.Family]) -> Optional[str]:
    """How the registry level treats a module of this class whatever the family: ``"mha"``
    (``nn.MultiheadAttention``), ``"layer_norm"``, ``"elementwise"`` (an activation or an element-wise
    norm, an identity-rule unit) or ``None``."""
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if isinstance(module, nn.LayerNorm):
        return "layer_norm"
    if _is_identity_unit(module, family):
        return "elementwise"
    return None


def is_selective_scan(module: nn.Module) -> bool:
    """A selective state-space mixer (Mamba), by its layout: a linear ``x_proj`` that computes the
    input-dependent step size and ``B``, ``C`` from the scanned sequence, a linear ``dt_proj`` for the
    step size, and the parameters ``A_log`` (the state matrix) and ``D`` (the skip connection), as in
    transformers' ``MambaMixer`` and the ``Mamba`` module of the reference implementation."""
    if "A_log" not in module._parameters:  # (most modules: one dict lookup)
        return False
    return (  # (the parameters first: a dict lookup, where a missing attribute raises inside nn.Module)
        all(isinstance(module._parameters.get(p), nn.Parameter) for p in ("A_log", "D"))
        and isinstance(getattr(module, "x_proj", None), nn.Linear)
        and isinstance(getattr(module, "dt_proj", None), nn.Linear)
    )


def is_chunked_scan(module: nn.Module) -> bool:
    """A selective state-space mixer of Mamba2's layout: one linear ``in_proj`` that computes the gate,
    the scanned sequence, ``B``, ``C`` and the step size together, a depthwise ``conv1d`` over the
    sequence and ``B``, ``C``, a linear ``out_proj``, and the parameters ``A_log`` and ``D`` (one per
    head) and ``dt_bias``, as in transformers' ``Mamba2Mixer``."""
    if "A_log" not in module._parameters or not all(
        isinstance(module._parameters.get(p), nn.Parameter) for p in ("A_log", "D", "dt_bias")
    ):
        return False  # (checked first, as above)
    conv = getattr(module, "conv1d", None)
    return (
        isinstance(getattr(module, "in_proj", None), nn.Linear)
        and isinstance(getattr(module, "out_proj", None), nn.Linear)
        and isinstance(conv, nn.Conv1d)
        and conv.groups == conv.in_channels
    )


# ----------------------------------------------------------------------------- the two semantics
Segments = Sequence[Tuple[int, float]]  # (size along the last dim, gradient share)


class _Rules:
    """What a patched module does, per semantics. ``share`` is the fraction of the relevance of a
    product that flows into one operand (0 holds the operand constant)."""

    def __init__(self, epsilon: float):
        self.epsilon = epsilon
        self._scales: Dict[Tuple[Any, torch.device, torch.dtype], Tensor] = {}  # (share(s), device, dtype) -> scale
        # gradient mode: the identity rule keeps x and y rather than its factor (gi_identity's
        # keep_inputs), where the layers around an element-wise unit keep them anyway: a preset's rules
        self.keep_inputs = False

    def elementwise(self, module: nn.Module, x: Tensor, forward: Callable[[Tensor], Tensor]) -> Tensor:
        raise NotImplementedError

    def _not_elementwise(self, module: nn.Module, x: Tensor, forward: Callable[[Tensor], Tensor]) -> Tensor:
        """A unit (an activation or an RMSNorm by its class name) whose output is not one value per
        input element: the identity rule does not apply to it."""
        raise RuntimeError(
            f"lrpcpp.patch: {type(module).__name__} is patched as an element-wise unit (an activation or an "
            f"RMSNorm, by its class name), but its output is not of its input's shape {list(x.shape)}, so the "
            "identity rule cannot take its relevance; explain the model in gradient mode with level='operations', "
            "whose rules take each call of its forward"
        )

    def layer_norm(self, module: nn.LayerNorm, x: Tensor) -> Tensor:
        raise NotImplementedError

    def share(self, t: Tensor, share: float) -> Tensor:
        if share == 0.0:
            return t.detach()
        return self._scale(t, ((t.shape[-1], share),)) if share != 1.0 else t

    def share_segments(self, t: Tensor, segments: Segments) -> Tensor:
        """Different shares for consecutive slices of the last dim (a fused q/k/v projection)."""
        if len({s for _, s in segments}) == 1:
            return self.share(t, segments[0][1])
        return self._scale(t, tuple(segments))

    def _scale(self, t: Tensor, segments: Tuple[Tuple[int, float], ...]) -> Tensor:
        raise NotImplementedError

    def context(self):
        return contextlib.nullcontext()

    def modes(self) -> contextlib.AbstractContextManager:
        """The torch function modes the patched model's forward runs in (none at the registry level
        of gradient mode)."""
        return contextlib.nullcontext()

    def recomputed(self, function: Callable) -> Callable:
        """``function`` (a checkpointed layer's forward), run in :meth:`modes` unless a rule mode is
        active already: the checkpoint's first call runs in the patched forward, the recomputation in
        the backward pass outside of it."""

        def run(*args, **kwargs):
            if any(
                is_rule_mode(torch._C._get_function_stack_at(i)) for i in range(torch._C._len_torch_function_stack())
            ):
                return function(*args, **kwargs)
            with self.modes():
                return function(*args, **kwargs)

        return run


class _GradientRules(_Rules):
    """Gradient-times-input (RULES.md section 2)."""

    def elementwise(self, module, x, forward):
        out = self._own_rule(module, x, forward)
        if out is None:
            out = self._identity_rule(module, x, forward)
        return self._not_elementwise(module, x, forward) if out is None else out

    @staticmethod
    def _own_rule(module, x, forward):
        """The unit's output where its relevance is its own gradient (ReLU's), or a LLaMA RMSNorm's rule
        that holds its rsqrt constant in its own ops; ``None`` where it takes ``gi_identity``."""
        if type(module) in _GRADIENT_IS_IDENTITY:
            with without(is_rule_mode):  # the unit's own calls, not ones for the operation level's rules
                return _out_of_place(module, forward, x)
        if x.dtype in _WITHIN_FLOAT32 and computes_llama_rms_norm(module):
            with without(is_rule_mode):
                return _llama_rms_norm_rstd_constant(module, x)
        return None

    def _identity_rule(self, module, x, forward):
        """``gi_identity`` of the unit, or ``None`` where its output is not of its input's shape (such
        as a norm that returns the normalising factor alone)."""
        with torch.no_grad():
            y = _out_of_place(module, forward, x)
        if not (isinstance(y, Tensor) and y.shape == x.shape):
            return None
        # (detached too, for torch.jit.trace: see _held_constant)
        return torch.ops.lrpcpp.gi_identity(x, y.detach(), self.epsilon, self.keep_inputs)

    def layer_norm(self, module, x):
        return torch.ops.lrpcpp.gi_layer_norm(x, list(module.normalized_shape), module.weight, module.bias, module.eps)

    def _scale(self, t, segments):
        # one share for all of the last dim: a 0-dim scale (share_scale)
        scale = share_scale(self._scales, segments[0][1] if len(segments) == 1 else segments, t)
        return torch.ops.lrpcpp.gi_grad_scale(t, _distributed.placed_like(scale, t))


class _OperationRules(_GradientRules):
    """Gradient mode at the operation level: the model's forward runs in :class:`GradientRules`;
    activation modules (whose outputs are gates for CP-LRP) and RMSNorms stay module-level units."""

    def __init__(self, epsilon: float, method: str, strict: bool):
        super().__init__(epsilon)
        self.mode = GradientRules(method, epsilon, strict)

    def elementwise(self, module, x, forward):
        mode, out, unit = self.mode, None, True
        if mode.alone():
            # the unit's calls are its rule: made with the mode off the stack (where the mode would leave
            # its input as it is), its gi_identity counted here, as the mode would count it
            with mode.suspended():
                if mode.plain_carrier(x):
                    out = self._own_rule(module, x, forward)
                    if out is None:
                        out = self._identity_rule(module, x, forward)
                        unit = out is not None
                        if unit:
                            mode.count_ruled(torch.ops.lrpcpp.gi_identity)
        if out is None:  # (a module found not element-wise above is not asked again)
            out = super().elementwise(module, x, forward) if unit else self._not_elementwise(module, x, forward)
        if not mode.uniform and is_activation(module):
            mode.mark_gate(out)  # (CP-LRP's gates)
        return out

    def _not_elementwise(self, module, x, forward):
        # its forward's calls, each with its rule (a norm's factor alone: a normaliser, held constant)
        return forward(x)

    @contextlib.contextmanager
    def modes(self):
        with self.mode.uncounted(), self.mode:
            yield


class _ExplicitRules(_Rules):
    """Explicit relevance (RULES.md section 1): the products split relevance in their own ops, so a
    share only matters when it is 0 (CP-LRP's constant operands)."""

    def __init__(self, epsilon: float):
        super().__init__(epsilon)
        self._explicit = explicit
        self._held = _HeldColumns()

    def elementwise(self, module, x, forward):
        def plain(t: Tensor) -> Tensor:
            with self._explicit.ExplicitRules.suspended():
                y = _out_of_place(module, forward, t)
            return y if isinstance(y, Tensor) and y.shape == t.shape else self._not_elementwise(module, t, forward)

        return self._explicit.identity_rule(plain, x)

    def layer_norm(self, module, x):
        return lf.layer_norm(x, list(module.normalized_shape), module.weight, module.bias, module.eps, self.epsilon)

    def _scale(self, t, segments):
        parts, spans, start = [], [], 0
        for n, s in segments:
            part = t[..., start : start + n]
            if s == 0.0:
                part = part.detach()
                if spans and spans[-1][1] == start:
                    spans[-1] = (spans[-1][0], start + n)
                else:
                    spans.append((start, start + n))
            parts.append(part)
            start += n
        out = torch.cat(parts, dim=-1)
        if spans:
            self._held.held[out] = spans
        return out

    def context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(self._explicit.ExplicitRules(epsilon=self.epsilon))
        stack.enter_context(self._held)
        return stack

    def modes(self):
        return self.context()


class _HeldColumns(TorchFunctionMode):
    """Constant columns of a fused projection's output, in explicit semantics.

    With CP-LRP the query and key are constants. A fused projection (GPT-2's ``c_attn``, Phi-3's
    ``qkv_proj``) returns them in one tensor with the value, which requires grad as a whole, so the
    model's own slicing would hand the explicit attention rules a query and key that seem to carry
    relevance. Slices that lie within the held columns are returned detached instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> [(start, stop)) of the last dim

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        base = args[0] if args and isinstance(args[0], Tensor) else None
        if base is None or base.dim() < 2 or base not in self.held:
            return out
        spans = self.held[base]

        def constant_if_held(t):
            if not isinstance(t, Tensor) or t.dim() == 0 or t.stride(-1) != base.stride(-1):
                return t
            if t.untyped_storage().data_ptr() != base.untyped_storage().data_ptr():
                return t
            start = (t.storage_offset() - base.storage_offset()) % base.stride(-2)
            stop = start + t.shape[-1]
            return t.detach() if any(a <= start and stop <= b for a, b in spans) else t

        if isinstance(out, (tuple, list)):
            return type(out)(constant_if_held(t) for t in out)
        return constant_if_held(out)


class _HeldScanParameters(TorchFunctionMode):
    """The step size and ``B``, ``C`` of a Mamba2 mixer, held constant where its forward splits them
    off: the last of the sections ``[..., conv_dim, num_heads]`` of ``in_proj``'s output (the step
    size), and the last two of ``[inner, groups * state, groups * state]`` of the convolution's output
    (``B``, ``C``). The depthwise convolution keeps each channel to itself, so what is held is
    computed from held columns of ``in_proj`` alone; the pieces are detached, their values unchanged."""

    def __init__(self, inner: int, conv_dim: int, heads: int) -> None:
        super().__init__()
        self.inner_size, self.conv_dim, self.heads, self.state = inner, conv_dim, heads, (conv_dim - inner) // 2

    def held(self, sections: Any) -> int:
        """How many of the last pieces of a split into ``sections`` (along the last dim) are held."""
        sizes = tuple(sections) if isinstance(sections, (list, tuple)) else ()
        if sizes[-2:] == (self.conv_dim, self.heads):
            return 1
        return 2 if sizes == (self.inner_size, self.state, self.state) else 0

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in (torch.split, Tensor.split) or len(args) < 2 or not isinstance(out, (tuple, list)):
            return out
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        held = self.held(args[1]) if dim in (-1, args[0].dim() - 1) else 0
        return type(out)(t.detach() if i >= len(out) - held else t for i, t in enumerate(out))


# ----------------------------------------------------------------------------- the patch
class PatchHandle:
    """The changes made to one model; :meth:`remove` undoes them. Also a context manager."""

    kind = "patched"

    def __init__(self, model: nn.Module, method: str, mode: str, rules: _Rules, modules: Sequence[nn.Module] = ()):
        self.model, self.method, self.mode, self.rules = model, method, mode, rules
        self.modules = tuple(modules)  # the model's modules, as walked when it was patched
        self.level = "operations" if isinstance(rules, _OperationRules) else "registry"
        self._undo: List[Callable[[], None]] = []
        self._reports: List[Tuple[str, str, bool]] = []  # (module name, what was done to it, unless named)
        self.layer_rules: Dict[str, object] = {}  # layer name -> its lrpcpp.rules rule (with a preset)
        self.merged_batch_norms: Dict[str, str] = {}  # convolution name -> the batch norm merged into it

    # --- bookkeeping
    def _set_forward(self, name: str, module: nn.Module, forward: Callable, what: str) -> None:
        self._replace(module, _forward_slot(module), forward)
        self._report(name, what)

    def _replace(self, module: nn.Module, key: str, value: Any) -> None:
        """Sets ``module``'s instance attribute ``key`` until :meth:`remove` takes it out again or puts
        the one it replaced back. As nn.Module's ``__setattr__`` sets a plain value (no parameter,
        buffer or submodule is named like the forward and the other slots that a patch replaces),
        without its checks: a patch sets one for most modules."""
        state = module.__dict__
        previous = state.get(key, _ABSENT)
        state[key] = value
        self._undo.append(lambda: state.pop(key, None) if previous is _ABSENT else state.__setitem__(key, previous))

    @property
    def coverage(self):
        """At the operation level, the :class:`lrpcpp.models.operations.Coverage` of the calls seen so
        far; ``None`` at the registry level."""
        return self.rules.mode.coverage() if isinstance(self.rules, _OperationRules) else None

    def backward(self) -> contextlib.AbstractContextManager:
        """The context of a backward pass of your own through the patched model (``loss.backward()``,
        ``torch.autograd.grad``), inside the patch's ``with`` block: at the operation level, the rules'
        mode, uncounted, so that a block which the forward checkpoints with ``torch.utils.checkpoint``
        is recomputed as the ruled forward computed it (outside it, torch recomputes the block with its
        plain calls: the non-reentrant checkpoint then fails, finding other tensors saved); the
        backward's other calls run without grad, which the mode passes as they are. At the registry
        level the patched modules recompute themselves, and this context does nothing.
        :func:`lrpcpp.attribute` runs its backward pass in it."""
        return self.rules.modes() if self.level == "operations" else contextlib.nullcontext()

    def _hook(self, name: str, handle, what: str) -> None:
        self._undo.append(handle.remove)
        self._report(name, what)

    def _report(self, name: str, what: str, unless_named: bool = False) -> None:
        """Records what was done to a module (each change, where several were; ``unless_named``: only
        where nothing else was)."""
        self._reports.append((name, what, unless_named))

    @property
    def patched(self) -> Dict[str, str]:
        """What was done to each module, by module name (several changes joined by ``"; "``)."""
        patched: Dict[str, str] = {}
        for name, what, unless_named in self._reports:
            if name not in patched:
                patched[name] = what
            elif not unless_named:
                patched[name] = f"{patched[name]}; {what}"
        return patched

    def remove(self) -> None:
        """Restores every module exactly as it was (idempotent)."""
        while self._undo:
            self._undo.pop()()
        release(self)

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"PatchHandle({type(self.model).__name__}, method={self.method!r}, mode={self.mode!r}, "
            f"level={self.level!r}, "
            f"{len(self.patched)} modules)"
        )


_ABSENT = object()  # (no instance attribute of that name)


def _forward_slot(module: nn.Module) -> str:
    """The attribute that holds what a call of ``module`` computes: ``forward``, or, for a module that
    accelerate has hooked (``dispatch_model``, ``cpu_offload``, ``disk_offload``: its ``forward`` loads
    the weights, moves the inputs and calls ``_old_forward``), ``_old_forward``, so that the rules run
    inside accelerate's hook and the hook stays in place."""
    return "_old_forward" if "_old_forward" in module.__dict__ and hasattr(module, "_hf_hook") else "forward"


def _attribute(module: nn.Module, name: str) -> Any:
    """``getattr(module, name, None)`` without the exception that nn.Module's ``__getattr__`` raises (and
    ``getattr`` catches) for a missing name: most modules lack most names the patch looks up."""
    if name in module.__dict__ or hasattr(type(module), name):
        return getattr(module, name, None)
    for table in (module._parameters, module._buffers, module._modules):
        if name in table:
            return table[name]
    return None


def _original_forward(module: nn.Module) -> Callable:
    """What :meth:`PatchHandle._set_forward` replaces: the forward in :func:`_forward_slot`, or the class's."""
    return module.__dict__.get(_forward_slot(module)) or types.MethodType(type(module).forward, module)


def _checkpointing_in_rules(handle: "PatchHandle", modules: Sequence[Tuple[str, nn.Module]]) -> None:
    """A Hugging Face layer with activation checkpointing (``model.activation_checkpointing_enable()``,
    ``gradient_checkpointing_enable()`` in transformers 4.x)
    runs its forward through its ``_gradient_checkpointing_func``, and again, in the backward pass,
    to recompute what it did not keep. The recomputation runs outside the patched forward, so it
    runs in the rules' modes here (:meth:`_Rules.recomputed`) and computes what the forward did. It is
    torch's non-reentrant checkpoint, whatever ``use_reentrant`` the model was given: the reentrant
    one cannot compute the gradient of chosen inputs (``torch.autograd.grad``), which relevance is."""
    for name, module in modules:
        checkpoint = module.__dict__.get("_gradient_checkpointing_func")
        if not callable(checkpoint):
            continue

        def in_rules(function, *args, _checkpoint=checkpoint, **kwargs):
            return _checkpoint(handle.rules.recomputed(function), *args, **dict(kwargs, use_reentrant=False))

        handle._replace(module, "_gradient_checkpointing_func", in_rules)
        handle._report(name, "activation checkpointing in the rules", unless_named=True)


def _first_tensor_arg(args: tuple, kwargs: dict, transform: Callable[[Tensor], Tensor], names: Sequence[str]):
    if args:
        return (transform(args[0]),) + tuple(args[1:]), kwargs
    for key in names:
        if key in kwargs:
            kwargs = dict(kwargs)
            kwargs[key] = transform(kwargs[key])
            return args, kwargs
    return args, kwargs


def patch(
    model: nn.Module,
    method: Optional[str] = None,
    mode: str = "gradient",
    epsilon: Optional[float] = None,
    preset: Union[str, Preset, None] = None,
    level: str = "auto",
    strict: bool = False,
) -> PatchHandle:
    """Patches ``model`` (this instance only) for relevance; returns a handle with ``.remove()``.

    ``epsilon`` is the stabiliser of the rules (default 1e-10 in gradient mode, where it only guards
    divisions by the input of an activation, and 1e-6 in explicit mode). Raises
    :class:`lrpcpp.UnsupportedModelError` for a Hugging Face architecture without a family entry,
    and ``RuntimeError`` if the model, one of its submodules or a model it is part of is already
    patched (or registered with a :class:`lrpcpp.Composite`).

    ``preset`` (a name registered with :func:`lrpcpp.register_preset`, or an :class:`lrpcpp.Preset`)
    also puts a rule on each linear and convolution layer (:mod:`lrpcpp.models.presets`), recorded in
    ``handle.layer_rules``; ``method`` then defaults to the preset's. ``method=None`` is ``"attnlrp"``.

    ``level`` (gradient mode): ``"registry"`` patches the modules a family entry describes (as
    above); ``"operations"`` rules each torch call of the forward instead
    (:mod:`lrpcpp.models.operations`), for any architecture; ``"auto"`` (default) takes the registry
    when a family entry describes the model (or ``preset`` needs its layer rules) and the operation
    level otherwise (a plain torch model, whose functional calls the registry's module patches would
    leave with their plain gradient; a Hugging Face architecture without a family entry; a layout the
    registry cannot patch: transformers 4.x's mixture-of-experts blocks; a family entry that does not
    match the model, such as the module names of another version, which a warning names). At the operation level,
    ``strict=True`` makes a call without a known rule an error, and ``handle.coverage`` reports the
    calls seen.
    """
    return patch_walked(model, named_modules(model), method, mode, epsilon, preset, level, strict)


def patch_walked(
    model: nn.Module,
    modules: Sequence[Tuple[str, nn.Module]],
    method: Optional[str],
    mode: str,
    epsilon: Optional[float],
    preset: Union[str, Preset, None],
    level: str,
    strict: bool,
) -> PatchHandle:
    """:func:`patch`, given ``modules``: ``model.named_modules()``, walked by the caller (once for every
    step of the patch, and for :class:`~lrpcpp.models.state.ModelState` in
    :func:`lrpcpp.attribution.explaining`). None of the steps adds or removes a module."""
    if preset is not None:
        preset = get_preset(preset)
        if method is None:
            method = preset.method
    if method is None:
        method = "attnlrp"
    if method not in METHODS:
        raise ValueError(f"lrpcpp.patch: method must be one of {METHODS}, got {method!r}")
    if mode not in MODES:
        raise ValueError(f"lrpcpp.patch: mode must be one of {MODES}, got {mode!r}")
    if epsilon is None:
        epsilon = 1e-10 if mode == "gradient" else 1e-6
    if epsilon < 0:
        raise ValueError(f"lrpcpp.patch: epsilon must be >= 0, got {epsilon}")
    if level not in LEVELS:
        raise ValueError(f"lrpcpp.patch: level must be one of {LEVELS}, got {level!r}")
    if level == "operations" and mode != "gradient":
        raise ValueError(
            "lrpcpp.patch: level='operations' is for mode='gradient' (explicit mode has lrpcpp.ExplicitRules)"
        )
    _distributed.register_if_loaded()  # the sharding rules of the lrpcpp ops, for a model of DTensors
    family = None
    operations = level == "operations"
    if not operations:
        try:
            family = _families.family_of(model)
        except _families.UnsupportedModelError:
            if level == "registry" or mode != "gradient":
                raise
            operations = True
        if level == "auto" and mode == "gradient" and family is None and preset is None:
            # a model no family entry describes (a plain torch model): the registry's module patches would
            # leave its functional calls (torch.tanh, a product of two relevance carriers, an attention
            # written in its own ops) with their plain gradient, unnoticed; the operation level rules each
            operations = True
        refusal = _unpatchable(modules, family) if family is not None else None
        if refusal is not None:
            if level == "registry" or mode != "gradient":
                raise _families.UnsupportedModelError(refusal)
            operations = True
    if operations and preset is not None:
        raise _families.UnsupportedModelError(
            "lrpcpp.patch: the layer rules of a preset need the registry level (a family entry, or a model whose "
            "attention modules the registry knows); this model is explained at the operation level"
        )
    rules: _Rules
    if operations:
        rules = _OperationRules(epsilon, method, strict)
    else:
        rules = _GradientRules(epsilon) if mode == "gradient" else _ExplicitRules(epsilon)
    handle = PatchHandle(model, method, mode, rules, [m for _, m in modules])
    claim(model, handle, "lrpcpp.patch", modules=modules)
    try:
        if preset is not None:
            apply_preset(handle, preset)
            # the layer rules keep their inputs and outputs (x and z), so an activation between two of
            # them keeps its x and y rather than a factor of its own (gi_identity's keep_inputs)
            rules.keep_inputs = bool(handle.layer_rules)
        if operations:
            _apply_operations(handle, modules)
        else:
            _apply(handle, family, modules)
        _checkpointing_in_rules(handle, modules)
    except _families.UnsupportedModelError as e:
        handle.remove()
        if level != "auto" or mode != "gradient" or preset is not None or operations:
            raise
        # the family entry does not match this model (the module names of another version, an attention
        # module it does not describe): an entry is an override, never a gate, so the operation level
        # explains the model instead, and says why
        warnings.warn(
            f"{e}. level='auto' explains the model at the operation level instead (level='operations' does so "
            "without this warning)",
            UserWarning,
            stacklevel=3,
        )
        return patch_walked(model, modules, method, mode, epsilon, preset, "operations", strict)
    except BaseException:
        handle.remove()
        raise
    return handle


def _apply(
    handle: PatchHandle, family: Optional[_families.Family], named_modules: Sequence[Tuple[str, nn.Module]]
) -> None:
    model, rules = handle.model, handle.rules
    uniform = handle.method == "attnlrp"
    q_share, v_share = (0.25, 0.5) if uniform else (0.0, 1.0)
    modules = dict(named_modules)
    names = {id(m): n for n, m in modules.items()}
    held_constant: set = set()  # activations whose input is held constant (CP-LRP gates)
    matched_attention: set = set()

    def child(module: nn.Module, attr: Union[str, Tuple[str, ...]], what: str) -> nn.Module:
        """The child named ``attr``, or the first of the alternative names ``attr`` that ``module`` has."""
        alternatives = (attr,) if isinstance(attr, str) else attr
        sub = next((s for s in (_attribute(module, a) for a in alternatives) if isinstance(s, nn.Module)), None)
        if sub is None:
            raise _families.UnsupportedModelError(
                f"lrpcpp.patch: {type(module).__name__} ({names[id(module)]}) has no child module "
                f"{' or '.join(repr(a) for a in alternatives)} "
                f"({what}); the family entry '{family.name if family else '?'}' does not match this model version"
            )
        return sub

    def output_share(name: str, module: nn.Module, segments: Segments) -> None:
        # the module's forward (its class's, a preset's layer rule, accelerate's inner one) with the share
        # applied to its output: no forward hook, whose path every call of the module would take
        forward = _original_forward(module)

        def shared(*args, **kwargs):
            return rules.share_segments(forward(*args, **kwargs), segments)

        handle._set_forward(name, module, shared, f"output share {list(segments)}")

    def input_share(name: str, module: nn.Module, share: float) -> None:
        if share == 1.0:
            return

        def pre(m, args, kwargs):
            return _first_tensor_arg(args, kwargs, lambda t: rules.share(t, share), ("hidden_states", "x", "input"))

        handle._hook(name, module.register_forward_pre_hook(pre, with_kwargs=True), f"input share {share}")

    # 1. products of two relevance-carrying tensors, from the family's description
    if family is not None:
        family_role = _per_class(lambda m: _family_role(m, family))
        found_attention = False
        for name, module in modules.items():
            role = family_role(module)
            if role == "attention":
                found_attention = True
                if any(family_role(sub) == "attention" for sub in module.modules() if sub is not module):
                    continue  # a wrapper of the attention module (transformers 4.x's ViTAttention)
                matched_attention.add(id(module))
                if family.qkv is not None and family.qkv_split is not None:  # (a Family checks they come together)
                    q, k, v = family.qkv_split(module)
                    proj = child(module, family.qkv, "fused query/key/value projection")
                    output_share(names[id(proj)], proj, ((q, q_share), (k, q_share), (v, v_share)))
                else:
                    for attr, share in ((family.q, q_share), (family.k, q_share), (family.v, v_share)):
                        proj = child(module, attr, "attention projection")
                        width: Any = proj.out_features  # an int (torch's stub types module attributes as tensors)
                        output_share(names[id(proj)], proj, ((width, share),))
            elif role == "gated_mlp":
                input_share(name, module, 0.5 if uniform else 1.0)
                if not uniform:
                    held_constant.add(id(child(module, family.gate_act, "gate activation")))
            elif role == "moe":
                _patch_moe(handle, family, module, names, child, input_share, uniform, held_constant)
        if family.attention and not found_attention:
            raise _families.UnsupportedModelError(
                f"lrpcpp.patch: the '{family.name}' family expects attention modules {family.attention} but "
                f"{type(model).__name__} has none; update its entry with lrpcpp.register_family"
            )

    # 2. modules handled by type, whatever the family
    type_role = _per_class(lambda m: _type_role(m, family))
    for name, module in modules.items():
        role = type_role(module)
        if role == "mha":
            matched_attention.add(id(module))
            _patch_mha(handle, name, cast(nn.MultiheadAttention, module), q_share, v_share)
        elif role == "layer_norm":
            norm = cast(nn.LayerNorm, module)
            handle._set_forward(name, module, (lambda m: lambda x: rules.layer_norm(m, x))(norm), "layer norm")
        elif role == "elementwise":
            forward = types.MethodType(type(module).forward, module)
            if id(module) in held_constant:
                new = (lambda f: lambda x: _held_constant(f, x))(forward)
                what = "held constant (CP-LRP gate)"
            else:
                new = (lambda m, f: lambda x: rules.elementwise(m, x, f))(module, forward)
                what = "identity rule"
            handle._set_forward(name, module, new, what)

    # 3. an attention module nobody described would get a silently wrong map
    unknown = _undescribed_attention(named_modules, matched_attention)
    if unknown:
        raise _families.UnsupportedModelError(
            f"lrpcpp.patch: no rule for the attention module(s) {', '.join(unknown[:3])}; supported families: "
            f"{', '.join(sorted(_families.FAMILIES))}. Describe the architecture with lrpcpp.register_family(...)"
        )

    # 4. explicit semantics: the model's forward runs inside the explicit function mapping
    if handle.mode == "explicit":
        inner = _original_forward(model)

        def explicit_forward(*args, **kwargs):
            with rules.context():
                return inner(*args, **kwargs)

        handle._set_forward("", model, explicit_forward, "explicit rules")


def _undescribed_attention(modules: Sequence[Tuple[str, nn.Module]], matched: set) -> List[str]:
    """The modules (of a model's ``named_modules()``) named ``...Attention`` that are neither described
    (``matched`` ids) nor contain a described one, and are no ``nn.MultiheadAttention``."""
    candidates = [(n, m) for n, m in modules if type(m).__name__.endswith("Attention") and id(m) not in matched]
    if not candidates:
        return []
    matched = matched | {id(m) for _, m in modules if isinstance(m, nn.MultiheadAttention)}
    matched_names = [n for n, m in modules if id(m) in matched]
    unknown = []
    for name, module in candidates:
        if id(module) in matched:
            continue
        # (a wrapper of a described module holds it under its own name; a module reached by several
        # names is listed under its first, so the wrapper's own submodules are asked then)
        prefix = f"{name}." if name else ""
        if any(n.startswith(prefix) for n in matched_names) or any(id(sub) in matched for sub in module.modules()):
            continue
        unknown.append(f"{name or '<root>'} ({type(module).__name__})")
    return unknown


def _unpatchable(modules: Sequence[Tuple[str, nn.Module]], family: _families.Family) -> Optional[str]:
    """Why the registry cannot patch a model (its ``named_modules()``) although ``family`` describes it, or ``None``: a
    mixture-of-experts block that computes its routing weights in its own forward (the transformers
    4.x layout, whose router is a plain ``nn.Linear``) has no module output the routing rule could
    hook. ``level="auto"`` then explains the model at the operation level, which rules those calls."""
    if not family.moe:
        return None
    for name, module in modules:
        if _families.is_a(module, family.moe) and isinstance(getattr(module, family.router, None), nn.Linear):
            return (
                f"lrpcpp.patch: {type(module).__name__} ({name}) computes its routing weights in its own forward "
                f"(the transformers 4.x layout, where '{family.router}' is a plain nn.Linear), where the registry "
                "cannot apply their rule; the operation level can (level='auto' or 'operations', gradient mode)"
            )
    return None


def _apply_operations(handle: PatchHandle, modules: Sequence[Tuple[str, nn.Module]]) -> None:
    """The operation level: activation modules and RMSNorms are identity-rule units (their inner
    calls run without grad, so the mode does not rule them), selective state-space mixers hold
    their scan parameters constant (:func:`_patch_selective_scan`, :func:`_patch_chunked_scan`); the
    model's forward runs in the mode, with one warning per forward pass that names the calls without a rule.
    Modules compiled with ``torch.compile`` run eagerly (:func:`_compiled_run_eagerly`)."""
    model, rules = handle.model, handle.rules
    assert isinstance(rules, _OperationRules)
    _compiled_run_eagerly(handle, modules)
    unit = _per_class(lambda m: _is_identity_unit(m, None))
    scripted: List[str] = []  # (the TorchScript modules called from Python: not their submodules)
    for name, module in modules:
        if isinstance(module, torch.jit.ScriptModule):
            if not any(name.startswith(outer + ".") for outer in scripted):
                scripted.append(name)
                _count_scripted(handle, name, module)
        elif unit(module):
            forward = types.MethodType(type(module).forward, module)
            new = (lambda m, f: lambda x: rules.elementwise(m, x, f))(module, forward)
            handle._set_forward(name, module, new, "identity rule")
        elif is_selective_scan(module):
            _patch_selective_scan(handle, name, module)
        elif is_chunked_scan(module):
            _patch_chunked_scan(handle, name, module)
    inner = _original_forward(model)

    def operations_forward(*args, **kwargs):
        before = rules.mode.unruled_snapshot()
        with rules.mode:
            out = inner(*args, **kwargs)
        rules.mode.check_functions(out)
        warn_unruled(rules.mode.unruled_since(before), type(model).__name__)
        return out

    handle._set_forward("", model, operations_forward, "operation-level rules")


def _count_scripted(handle: PatchHandle, name: str, module: nn.Module) -> None:
    """A TorchScript module runs its calls without Python's torch function dispatch, so the rules see
    none of them: a call of it with a relevance-carrying input is counted as unruled, by its name (a
    warning; with ``strict``, an error). (A scripted function called in the forward is not seen at all.)"""
    forward, mode = module.forward, cast(_OperationRules, handle.rules).mode
    what = f"{name or type(module).__name__} (a TorchScript module: the rules do not see its calls)"

    def counted(*args, **kwargs):
        out = forward(*args, **kwargs)
        if any(carries(t) for t in tensor_args(args, kwargs)) and requires_grad((out,), {}):
            mode.count_unruled(what)
        return out

    handle._set_forward(name, module, counted, "TorchScript: its calls counted as unruled")


def _compiled_run_eagerly(handle: PatchHandle, modules: Sequence[Tuple[str, nn.Module]]) -> None:
    """At the operation level, a module compiled with ``torch.compile`` (the module it returns, or a
    module compiled in place with ``module.compile()``) runs its original forward eagerly for the
    patch, under the rules. A compiled region that is entered with the rules' mode active runs the
    calls that dynamo traced through the mode a second time (torch 2.13): every product would take
    its shares twice, a silently wrong relevance."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # (no compiled module exists before it is loaded)
    optimized = getattr(eval_frame, "OptimizedModule", None)
    for name, module in modules:
        if optimized is not None and isinstance(module, optimized):
            original = cast(Any, module)._orig_mod
            handle._set_forward(name, module, original.__call__, "compiled: its module runs eagerly")
        elif module.__dict__.get("_compiled_call_impl") is not None:
            handle._replace(module, "_compiled_call_impl", None)
            handle._report(name, "compiled in place: runs eagerly")


def _patch_selective_scan(handle: PatchHandle, name: str, module: nn.Module) -> None:
    """MambaLRP (Jafari et al., NeurIPS 2024): the step size and ``B``, ``C`` that ``x_proj`` computes
    from the scanned sequence are held constant, so that the discretised ``exp(Δ A)``, ``Δ B`` and ``C``
    are constants and relevance flows through the scan ``h_t = exp(Δ_t A) h_(t-1) + Δ_t B_t x_t``,
    ``y_t = C_t h_t + D x_t``, which is then linear in ``x`` (its own gradient is the rule). A mixer
    with a torch-only ``slow_forward`` (transformers 4.x) runs it, not the fused kernels that its
    ``forward`` picks on a GPU when ``mamba_ssm`` and ``causal_conv1d`` are installed."""
    proj_name = f"{name}.x_proj" if name else "x_proj"
    x_proj = module.get_submodule("x_proj")
    hook = x_proj.register_forward_hook(lambda m, args, out: out.detach())
    handle._hook(proj_name, hook, "output held constant (selective scan parameters)")
    slow = getattr(type(module), "slow_forward", None)
    if callable(slow):
        handle._set_forward(name, module, types.MethodType(slow, module), "torch-only slow_forward")


def _patch_chunked_scan(handle: PatchHandle, name: str, module: nn.Module) -> None:
    """MambaLRP on a Mamba2 mixer (:func:`is_chunked_scan`): its forward runs with the step size and
    ``B``, ``C`` held constant (:class:`_HeldScanParameters`), which makes the chunked scan a linear map
    of the scanned sequence, as :func:`_patch_selective_scan` does for Mamba. The gated RMSNorm gets
    the operation level's rules: the product ``y * silu(z)`` split (or the gate held, with CP-LRP), its
    normalising factor held constant. A mixer with a torch-only ``torch_forward`` (transformers 4.x)
    runs it, not the fused kernels, with the forward's arguments in the forward's order (FalconH1's
    names its first ``input_states`` where the forward's is ``hidden_states``), as many as it takes
    (Bamba's forward takes ``seq_idx`` too)."""
    conv, heads = module.get_submodule("conv1d"), module.get_parameter("A_log").numel()
    inner = module.get_submodule("out_proj").in_features
    torch_only = getattr(type(module), "torch_forward", None)
    forward = module.forward
    if callable(torch_only):
        arguments = inspect.signature(forward)
        named = [
            p.name for p in arguments.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        taken = named[: len(inspect.signature(torch_only).parameters) - 1]  # (its self)

        def scan(*args, **kwargs):
            # (the forward's other keywords go nowhere on its torch-only path either; an argument only its
            # fused kernels take, Bamba's seq_idx of packed sequences, is refused as the forward refuses it)
            bound = arguments.bind(*args, **kwargs)
            bound.apply_defaults()
            extra = [n for n in named[len(taken) :] if bound.arguments[n] is not None]
            if extra:
                raise NotImplementedError(
                    f"lrpcpp.patch: {type(module).__name__}.torch_forward, which the rules run, takes no {extra[0]}"
                )
            return torch_only(module, *(bound.arguments[n] for n in taken))

        forward = scan

    def held_forward(*args, **kwargs):
        with _HeldScanParameters(inner, conv.in_channels, heads):
            return forward(*args, **kwargs)

    handle._set_forward(name, module, held_forward, "step size and B, C held constant (selective scan parameters)")


def _held_constant(forward: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    # the input detached as well: torch.jit.trace records the ops but not the grad mode they ran in
    with torch.no_grad():
        return forward(x.detach())


def _patch_mha(handle: PatchHandle, name: str, module: nn.MultiheadAttention, q_share: float, v_share: float) -> None:
    rules = handle.rules

    def pre(m, args, kwargs):
        args, kwargs = list(args), dict(kwargs)
        for i, (key, share) in enumerate((("query", q_share), ("key", q_share), ("value", v_share))):
            if i < len(args):
                args[i] = rules.share(args[i], share)
            elif key in kwargs:
                kwargs[key] = rules.share(kwargs[key], share)
        return tuple(args), kwargs

    handle._hook(name, module.register_forward_pre_hook(pre, with_kwargs=True), "attention input shares")


def _patch_moe(handle, family, module, names, child, input_share, uniform, held_constant) -> None:
    """Each expert's output times its routing weight is a product (half to each); the gate of each
    expert's gated MLP is a product again (AttnLRP) or held constant (CP-LRP). The top-k weights are
    renormalised by their sum, which is held constant."""
    rules = handle.rules
    router = child(module, family.router, "router")
    experts = child(module, family.experts, "experts")
    input_share(names[id(experts)], experts, 0.25 if uniform else 0.5)
    if not uniform:
        held_constant.add(id(child(experts, family.expert_act, "expert activation")))
    renormalise = getattr(router, "norm_topk_prob", True)

    def routed(m, args, out):
        logits, weights, indices = out
        top = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(-1, indices)
        if renormalise:
            top = top / top.sum(dim=-1, keepdim=True).detach()
        return (logits, rules.share(top.to(weights.dtype), 0.5), indices)

    handle._hook(names[id(router)], router.register_forward_hook(routed), "routing weights share 0.5")

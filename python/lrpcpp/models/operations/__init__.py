"""Operation-level rules of gradient mode: any model explained without a family entry.

``lrpcpp.patch(model, level="operations")`` (and :func:`lrpcpp.attribute`, which chooses this
level by itself for a model the registry does not describe) runs the model's forward inside
:class:`GradientRules`, a ``torch.overrides.TorchFunctionMode``. Every torch call with a
relevance-carrying argument (a tensor that requires grad and is not computed from parameters
alone, as in :mod:`lrpcpp.models.explicit`) gets, from what it is and which arguments carry
relevance, the gradient-mode rule of RULES.md section 2 (:data:`RULES`), or keeps its ordinary
gradient where that is the rule (:data:`EXACT`); anything else is counted as unruled in the
:class:`Coverage` report, with one warning per forward pass (or an error with ``strict=True``).
"""

from typing import Callable, Mapping

from . import handlers
from .mode import Coverage, GradientRules, UnruledOperationError, UnruledOperationWarning, warn_unruled

#: The torch functions with a gradient-mode rule, ``{function: handler}``: products of relevance
#: carriers (``mul``, ``matmul``/``bmm``/``mm``, ``einsum``, ``addmm``/``baddbmm``/``addbmm``,
#: ``addcmul``, ``addmv``, ``addr``, ``mv``, ``dot``, ``inner``, ``vecdot``, ``tensordot``,
#: ``F.bilinear``, ``torch.linalg.cross``, ``outer``, ``kron``, ``multi_dot``, ``chain_matmul``,
#: ``matrix_power``, ``prod``, ``cumprod``, ``F.glu``, ``lerp`` with a carrying weight,
#: ``F.scaled_dot_product_attention``), normalisers (a carrying divisor, also ``addcdiv``'s,
#: ``rsqrt``, ``reciprocal``, norms, distances, variances, ``logsumexp`` and ``logaddexp``,
#: ``F.normalize``, ``F.cosine_similarity``, ``renorm``), step functions (held constant), ``F.layer_norm``,
#: ``F.group_norm``, ``F.instance_norm`` (each group's standard deviation held constant),
#: ``F.rms_norm``, element-wise functions of one carrier (activations, ``exp``, ``pow``, ``sqrt``,
#: ``square``, ``clamp``, ``erf``, logarithms, trigonometric and hyperbolic functions and their
#: inverses, ``lgamma``, ``digamma``, remainders of a constant divisor), and the calls whose rule
#: depends on their arguments (``scatter_reduce``, ``grid_sampler``, ``embedding_bag``: a product
#: where its table and its per-sample weights both carry relevance).
RULES: Mapping[Callable, Callable] = handlers.RULES

#: The torch functions whose ordinary gradient is the gradient-mode rule: linear maps, additions,
#: sums and means, softmax, the Fourier transforms, strided views and sliding windows, the parts of a
#: complex tensor, selections (sorting, medians, quantiles, running maxima), ``relu`` and ``abs``, and every
#: function of :data:`lrpcpp.models.explicit.PASS_THROUGH`.
EXACT = handlers.EXACT

__all__ = [
    "GradientRules",
    "Coverage",
    "RULES",
    "EXACT",
    "UnruledOperationError",
    "UnruledOperationWarning",
    "warn_unruled",
]

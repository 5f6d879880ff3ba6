"""The op taxonomy: what each aten op does, numerically. One table for the whole package.

The tracer (which ops can create a non-finite value, which pass a producer on), the precision
analysis (which ops compute, which only move or cast), the determinism check (which ops are on
PyTorch's non-deterministic list) and the diagnosis (overflow, underflow, domain errors) all ask this
table. Ops are keyed by their base name as the dispatcher prints it (``aten.exp.default`` ->
``exp``; in-place ``aten.mul_.Tensor`` -> ``mul_``, which :func:`kinds` also finds under ``mul``),
so an op missing from one torch build costs nothing. Adding an op (a fused kernel) is one
:func:`register` line.

Example:
    >>> is_("aten.exp.default", EXP_LIKE), is_("aten.view.default", VIEW)
    (True, True)
"""

from __future__ import annotations

from enum import Flag, auto

from floatscope._events import op_base, op_stem

__all__ = [
    "OpKind", "VIEW", "COPY", "CAST", "MOVE", "CREATE", "ALLOC", "FILL", "EXP_LIKE", "LOG", "DIVISION", "DOMAIN",
    "REDUCTION", "MATMUL", "SOFTMAX", "UNDERFLOW_PRODUCER", "NONDETERMINISTIC", "NOT_COMPUTE",
    "register", "kinds", "is_", "op_base", "op_stem",
]


class OpKind(Flag):
    """Numerical roles of an op; an op can have several."""

    NONE = 0
    VIEW = auto()                # aliases its input: no new values
    COPY = auto()                # copies values unchanged (clone, contiguous)
    CAST = auto()                # converts dtype: can overflow the narrower format
    MOVE = auto()                # selects or rearranges values (index, cat): the producer is the input's
    CREATE = auto()              # makes values from scalars (zeros, arange, full)
    ALLOC = auto()               # uninitialised memory: never checked
    FILL = auto()                # writes a constant in place
    EXP_LIKE = auto()            # grows exponentially: overflow
    LOG = auto()                 # logarithms: log(0) = -inf
    DIVISION = auto()            # divides: x/0
    DOMAIN = auto()              # defined on part of the real line only (sqrt, log, acos)
    REDUCTION = auto()           # sums or products over many elements
    MATMUL = auto()              # inner products (matmul, conv, attention)
    SOFTMAX = auto()             # normalised exponentials
    UNDERFLOW_PRODUCER = auto()  # can round non-zero values to exactly 0
    NONDETERMINISTIC = auto()    # on torch.use_deterministic_algorithms' list


VIEW, COPY, CAST, MOVE = OpKind.VIEW, OpKind.COPY, OpKind.CAST, OpKind.MOVE
CREATE, ALLOC, FILL = OpKind.CREATE, OpKind.ALLOC, OpKind.FILL
EXP_LIKE, LOG, DIVISION, DOMAIN = OpKind.EXP_LIKE, OpKind.LOG, OpKind.DIVISION, OpKind.DOMAIN
REDUCTION, MATMUL, SOFTMAX = OpKind.REDUCTION, OpKind.MATMUL, OpKind.SOFTMAX
UNDERFLOW_PRODUCER, NONDETERMINISTIC = OpKind.UNDERFLOW_PRODUCER, OpKind.NONDETERMINISTIC
# Ops that produce no new values: the precision analysis and the determinism check skip them.
NOT_COMPUTE = VIEW | COPY | CAST | CREATE | ALLOC | FILL

_TABLE: dict[str, OpKind] = {}


def register(kind: OpKind, *names: str) -> None:
    """Add ``kind`` to each op base name; a name registered twice for the same kind is an error."""
    for name in names:
        if not name or "." in name:
            raise ValueError(f"op names are aten base names such as 'exp' or 'mul_', not {name!r}")
        current = _TABLE.get(name, OpKind.NONE)
        if current & kind:
            raise ValueError(f"duplicate registration of {name!r} as {kind}")
        _TABLE[name] = current | kind


def kinds(op_name: str) -> OpKind:
    """Every kind of an op, given its full name or base name (in-place variants share the stem's)."""
    base = op_base(op_name)
    found = _TABLE.get(base)
    if found is not None:
        return found
    return _TABLE.get(op_stem(op_name), OpKind.NONE)


def is_(op_name: str, kind: OpKind) -> bool:
    """True when the op has any of ``kind``'s roles."""
    return bool(kinds(op_name) & kind)


register(VIEW, "detach", "alias", "view", "_unsafe_view", "t", "transpose", "permute", "expand", "reshape",
         "squeeze", "unsqueeze", "slice", "select", "as_strided", "split", "split_with_sizes", "unbind", "chunk",
         "_reshape_alias", "lift_fresh", "view_as", "expand_as", "flatten", "unflatten", "movedim", "narrow",
         "diagonal", "unfold", "_local_scalar_dense", "set_")
register(COPY, "clone", "contiguous", "copy_", "copy", "lift_fresh_copy", "detach_", "_copy_from",
         "_copy_from_and_resize")
register(CAST, "_to_copy", "to", "_to_dtype", "copy_", "copy")
register(MOVE, "index", "gather", "index_select", "take_along_dim", "masked_select", "cat", "stack", "narrow",
         "select_scatter", "slice_scatter", "flatten", "movedim", "take", "_unsafe_index", "roll", "flip",
         "repeat", "tile")
register(CREATE, "zeros", "ones", "full", "arange", "scalar_tensor", "zeros_like", "ones_like", "full_like",
         "new_zeros", "new_ones", "new_full", "linspace", "eye", "tensor")
register(ALLOC, "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided")
register(FILL, "zero_", "fill_")
register(EXP_LIKE, "exp", "exp2", "expm1", "sinh", "cosh", "softplus")
register(LOG, "log", "log2", "log10", "log1p", "xlogy", "special_xlogy")
register(DIVISION, "div", "reciprocal", "rsqrt", "true_divide", "floor_divide", "remainder", "fmod")
register(DOMAIN, "sqrt", "log", "log2", "log10", "log1p", "acos", "asin", "acosh", "atanh", "pow", "rsqrt",
         "lgamma", "digamma", "polygamma", "erfinv")
register(REDUCTION, "sum", "mean", "cumsum", "prod", "cumprod", "var", "std", "norm", "linalg_vector_norm",
         "var_mean", "std_mean", "nansum", "logsumexp")
register(MATMUL, "mm", "bmm", "addmm", "matmul", "linear", "baddbmm", "addbmm", "dot", "mv", "einsum",
         "convolution", "_convolution", "conv1d", "conv2d", "conv3d", "_scaled_dot_product_flash_attention",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_attention_math",
         "_scaled_dot_product_flash_attention_for_cpu", "scaled_dot_product_attention")
register(SOFTMAX, "_softmax", "softmax", "_log_softmax", "log_softmax", "_safe_softmax")
register(UNDERFLOW_PRODUCER, "exp", "_softmax", "softmax", "sigmoid", "prod", "mul", "pow", "cumprod",
         "_to_copy", "rsub", "exp2", "mm", "bmm", "addmm", "div", "_safe_softmax")
# The ops torch.use_deterministic_algorithms(True) makes deterministic or rejects (its documentation
# lists them; most only on CUDA).
register(NONDETERMINISTIC,
         "index_add", "index_add_", "index_put", "index_put_", "scatter_add", "scatter_add_", "scatter",
         "scatter_", "scatter_reduce", "scatter_reduce_", "index_copy", "index_copy_", "put", "put_",
         "embedding_bag", "embedding_dense_backward", "_embedding_bag_backward", "ctc_loss", "_ctc_loss_backward",
         "nll_loss2d_forward", "nll_loss2d_backward", "histc", "bincount", "kthvalue", "median", "cumsum",
         "upsample_bilinear2d_backward", "upsample_linear1d_backward", "upsample_bicubic2d_backward",
         "upsample_trilinear3d_backward", "adaptive_avg_pool2d_backward", "adaptive_avg_pool3d_backward",
         "adaptive_max_pool2d_backward", "max_pool3d_with_indices_backward", "avg_pool3d_backward",
         "replication_pad1d_backward", "replication_pad2d_backward", "replication_pad3d_backward",
         "reflection_pad1d_backward", "reflection_pad2d_backward", "reflection_pad3d_backward",
         "grid_sampler_2d_backward", "grid_sampler_3d_backward", "fractional_max_pool2d_backward",
         "fractional_max_pool3d_backward", "_unsafe_index_put")

"""Source rules: unstable numerical spellings found in the AST, without running any code.

A small value tracker follows simple assignments within a scope (``p = softmax(z)`` then ``log(p)``), import
aliases (``import torch.nn.functional as F``, ``from torch import log``), modules held in variables or in
``self`` attributes (``self.act = nn.Sigmoid()``), and the dtype a value is converted to in the same scope
(``x.half()``), which the dtype rules (``FS2xx``) need.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from floatscope._lint.results import Edit, Finding
from floatscope._lint.rules import RULES

__all__ = ["analyze_source"]

# (expression, environment at its binding); None: bound to something the tracker does not follow.
Env = dict[str, "tuple[ast.expr, Env] | None"]

_PREFIXES = (  # longest first: a qualified name is matched against these to find its op and family
    ("torch.nn.functional.", "torch"), ("torch.special.", "torch"), ("torch.linalg.", "torch"), ("torch.", "torch"),
    ("numpy.linalg.", "numpy"), ("numpy.", "numpy"), ("math.", "math"), ("scipy.special.", "scipy"),
    ("jax.numpy.", "jax"), ("jax.nn.", "jax"), ("cupy.", "numpy"),
)
_SYNONYMS = {"expit": "sigmoid", "arccos": "acos", "arcsin": "asin", "vector_norm": "norm", "clip": "clamp",
             "special_expit": "sigmoid", "true_divide": "div", "divide": "div"}
_MODULES = {"Softmax": "softmax", "Sigmoid": "sigmoid", "BCELoss": "binary_cross_entropy", "NLLLoss": "nll_loss",
            "CosineSimilarity": "cosine_similarity", "LogSoftmax": "log_softmax", "LogSigmoid": "logsigmoid"}
# Methods and functions that keep a value what it is for these rules (its kind and dtype-independent meaning).
_TRANSPARENT = {"contiguous", "clone", "detach", "cpu", "cuda", "view", "reshape", "squeeze", "unsqueeze", "permute",
                "transpose", "flatten", "view_as", "reshape_as", "expand", "expand_as", "t", "float", "double", "half",
                "bfloat16", "to", "type", "type_as", "numpy", "requires_grad_", "movedim", "item", "tolist",
                "repeat", "tile", "broadcast_to", "swapaxes", "moveaxis", "atleast_1d", "atleast_2d"}
_DTYPES = {"float16": "float16", "half": "float16", "bfloat16": "bfloat16", "float32": "float32", "float": "float32",
           "float64": "float64", "double": "float64"}
_DTYPE_METHODS = {"half": "float16", "bfloat16": "bfloat16", "float": "float32", "double": "float64"}
# fp16 limits: max, and the largest magnitude that rounds to 0 (half the smallest subnormal, 2**-25).
_LIMITS = {"float16": (65504.0, 2.0 ** -25), "bfloat16": (3.3895313892515355e38, 2.0 ** -134)}
_OPTIMIZER_EPS = {"Adam": 1e-8, "AdamW": 1e-8, "RMSprop": 1e-8, "Adamax": 1e-8, "NAdam": 1e-8, "RAdam": 1e-8,
                  "Adagrad": 1e-10, "SparseAdam": 1e-8}
# Calls that make a tensor from a shape: constant arguments, but data-dependent values (randn) or a dtype to judge.
_CREATION = {"zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange", "linspace", "logspace", "eye",
             "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "normal", "random"}
_IGNORE = re.compile(r"#\s*floatscope:\s*ignore(?:\[([A-Za-z0-9_,\s]+)\])?")
# Calls that pick entries of a tensor: applied to probabilities, they pick the target's probability (FS102).
_PICK = {"gather", "take_along_dim", "index_select", "diag", "diagonal", "take", "masked_select"}
# Calls whose result is never negative, whatever the argument.
_NONNEG_CALLS = {"abs", "norm", "relu", "relu6", "softplus", "sigmoid", "exp", "sqrt", "cdist", "pdist", "square",
                 "softmax", "var", "std", "hardsigmoid", "cosh", "matrix_norm"}
# Names that hold a distance or a square by convention (the kernel's ``exp(-d2 / s)``).
_NONNEG_NAME = re.compile(r"(?i)(d2|r2|dist\w*|\w*_dist\w*|sq\w*|\w*_sq|\w*squared\w*|\w*norm\w*)")
# In-place methods after which a name no longer holds what it was bound to (std.clamp_(min=eps)).
_IN_PLACE = {"masked_fill_", "clamp_", "clamp_min_", "clamp_max_", "add_", "sub_", "mul_", "div_", "copy_", "fill_",
             "zero_", "nan_to_num_", "index_fill_", "masked_scatter_", "index_put_", "put_", "scatter_"}
# exp stays finite (float32 overflows above 88.7) for arguments up to this.
_EXP_SAFE = 88.0
# Calls that return (values, indices): ``m, _ = x.max(dim)`` binds m to the values.
_PAIRS = {"max", "min", "sort", "topk", "kthvalue", "median", "mode", "aminmax"}


@dataclass
class _Call:
    """What a call computes, as far as the rules care."""

    op: str
    family: str  # torch, numpy, math, scipy, jax, method (x.op()), module (nn.Softmax()(x)), builtin
    operand: ast.expr | None
    node: ast.Call
    # A module call (nn.Softmax(dim=1)(x)): its constructor; a hand-written softmax: the sum it divides by.
    source: ast.Call | None = None
    # A hand-written softmax: the family of its exp (torch, numpy, ...), which says which library to suggest.
    library: str = ""


@dataclass
class _Scope:
    env: Env
    dtypes: dict[str, str] = field(default_factory=dict)
    self_attrs: dict[str, ast.expr] = field(default_factory=dict)
    # Expressions checked against 0 on the way here (``if n == 0: return``): ast.dump -> the names in it.
    guarded: dict[str, frozenset[str]] = field(default_factory=dict)
    # Names capped from above earlier in the scope (t[t > 20] = 20, t.clamp_(max=20)): name -> the cap.
    capped: dict[str, float] = field(default_factory=dict)
    # Orderings a branch shows (``if a >= b:``): (ast.dump(larger), ast.dump(smaller)) -> the names in them.
    ordered: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)


class _Analyzer:
    def __init__(self, source: str, filename: str) -> None:
        self.source = source
        self.filename = filename
        self.lines = source.splitlines()
        self.aliases: dict[str, str] = {}
        self.findings: dict[tuple[str, int, int], Finding] = {}
        self.claimed: dict[tuple[int, int], set[str]] = {}  # node position -> rules that replace a weaker one
        self.imports_torch = False
        self.imports_numpy = False
        self.comments: list[tuple[int, int]] | None = None  # (line, char column) of each comment, read on demand

    # ---- names -------------------------------------------------------------------------------------------

    def collect_imports(self, tree: ast.Module) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname:
                        self.aliases[a.asname] = a.name
                    else:
                        root = a.name.split(".")[0]
                        self.aliases[root] = root
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    if a.name != "*":
                        self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        roots = {q.split(".")[0] for q in self.aliases.values()}
        self.imports_torch = "torch" in roots
        self.imports_numpy = "numpy" in roots

    def qual(self, node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.qual(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def alias_for(self, module: str) -> str | None:
        """The local spelling of a module (``F`` for torch.nn.functional), or None when the file has none."""
        for name, q in self.aliases.items():
            if q == module:
                return name
        if module.startswith("torch.") and self.aliases.get("torch") == "torch":
            return module
        return None

    # ---- values ------------------------------------------------------------------------------------------

    def resolve(self, node: ast.expr, env: Env, depth: int = 0) -> tuple[ast.expr, Env]:
        """Follow names to the expression bound to them."""
        while depth < 20:
            if isinstance(node, ast.NamedExpr):  # (p := softmax(z)) is the softmax
                node = node.value
            elif isinstance(node, ast.Name) and env.get(node.id) is not None:
                node, env = env[node.id]  # type: ignore[misc]
            else:
                break
            depth += 1
        return node, env

    def strip(self, node: ast.expr, env: Env, scope: _Scope, depth: int = 0) -> tuple[ast.expr, Env]:
        """Resolve names and look through reshapes, copies, dtype casts and new axes (``s[:, None]``, ``x.T``)."""
        for _ in range(30):
            node, env = self.resolve(node, env)
            if isinstance(node, ast.Subscript) and _new_axes_only(node.slice):
                node = node.value
                continue
            if isinstance(node, ast.Attribute) and node.attr in ("T", "mT") and not (
                    isinstance(node.value, ast.Name) and node.value.id == "self"):
                node = node.value
                continue
            if isinstance(node, ast.Call):
                info = self.call(node, env, scope)
                if info is not None and info.op in _TRANSPARENT and info.operand is not None:
                    node = info.operand
                    continue
            break
        return node, env

    def call(self, node: ast.expr, env: Env, scope: _Scope) -> _Call | None:
        if not isinstance(node, ast.Call):
            return None
        func = node.func
        q = self.qual(func)
        first = node.args[0] if node.args and not isinstance(node.args[0], ast.Starred) else None
        if first is None:
            for kw in node.keywords:
                if kw.arg in ("input", "x", "a"):
                    first = kw.value
        if q is not None:
            for prefix, family in _PREFIXES:
                if q.startswith(prefix):
                    op = q[len(prefix):]
                    if op.startswith("nn.") or "." in op:
                        break
                    return _Call(_SYNONYMS.get(op, op), family, first, node)
            if q.endswith(".cosine_similarity"):
                return _Call("cosine_similarity", "other", first, node)
            return None
        if isinstance(func, ast.Attribute):
            if isinstance(func.value, ast.Name) and func.value.id == "self" and func.attr in scope.self_attrs:
                return self._module_call(scope.self_attrs[func.attr], {}, node, first)
            return _Call(_SYNONYMS.get(func.attr, func.attr), "method", func.value, node)
        if isinstance(func, ast.Name):
            bound = env.get(func.id)
            if bound is not None:
                return self._module_call(bound[0], bound[1], node, first)
            if func.id not in env and func.id in ("sum", "max", "min", "abs", "pow"):
                return _Call(func.id, "builtin", first, node)
        if isinstance(func, ast.Call):  # nn.Softmax(dim=-1)(x)
            return self._module_call(func, env, node, first)
        return None

    def _module_call(self, ctor: ast.expr, env: Env, node: ast.Call, first: ast.expr | None) -> _Call | None:
        ctor, env = self.resolve(ctor, env)
        if isinstance(ctor, ast.Call):
            q = self.qual(ctor.func) or ""
            name = q.rsplit(".", 1)[-1]
            if q.startswith("torch.nn.") and name in _MODULES:
                return _Call(_MODULES[name], "module", first, node, source=ctor)
        return None

    def op(self, node: ast.expr, env: Env, scope: _Scope, *ops: str, strip: bool = True) -> _Call | None:
        """The call ``node`` stands for when it is one of ``ops``."""
        if strip:
            node, env = self.strip(node, env, scope)
        info = self.call(node, env, scope)
        return info if info is not None and info.op in ops else None

    def is_constant(self, node: ast.expr, env: Env, depth: int = 0) -> bool:
        """A literal, arithmetic on literals, math.pi, or torch.tensor(literal): a value with no data in it."""
        node, env = self.resolve(node, env)
        if depth > 10:
            return False
        if isinstance(node, ast.Constant):
            return isinstance(node.value, (int, float, complex)) and not isinstance(node.value, bool)
        if isinstance(node, ast.UnaryOp):
            return self.is_constant(node.operand, env, depth + 1)
        if isinstance(node, ast.BinOp):
            return self.is_constant(node.left, env, depth + 1) and self.is_constant(node.right, env, depth + 1)
        if isinstance(node, (ast.Tuple, ast.List)):
            return all(self.is_constant(e, env, depth + 1) for e in node.elts)
        q = self.qual(node) if isinstance(node, (ast.Name, ast.Attribute)) else None
        if q in ("math.pi", "math.e", "numpy.pi", "numpy.e", "torch.pi"):
            return True
        if isinstance(node, ast.Call):
            if self.number(node, env) is not None:  # float("1e-9")
                return True
            q = self.qual(node.func) or self.builtin(node.func, env) or ""
            if q in ("torch.tensor", "torch.as_tensor", "numpy.array", "numpy.float32", "numpy.float64", "float"):
                return bool(node.args) and self.is_constant(node.args[0], env, depth + 1)
            name = q.rsplit(".", 1)[-1]
            if q.startswith(("torch.", "numpy.", "math.")) and node.args and name not in _CREATION:
                return all(self.is_constant(a, env, depth + 1) for a in node.args)
        return False

    def number(self, node: ast.expr, env: Env) -> float | None:
        """The value of a numeric literal (through names and unary minus), else None."""
        node, env = self.resolve(node, env)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = self.number(node.operand, env)
            return None if value is None else (-value if isinstance(node.op, ast.USub) else value)
        if isinstance(node, ast.Call) and (self.qual(node.func) or self.builtin(node.func, env)) in (
                "float", "numpy.float32", "numpy.float64", "numpy.float16") and len(node.args) == 1:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):  # float("-1e9")
                try:
                    return float(arg.value)
                except ValueError:
                    return None
            return self.number(arg, env)
        return None

    def builtin(self, func: ast.expr, env: Env) -> str | None:
        """``float``, ``int``, ``abs``...: a builtin called by its own name (not rebound in the file)."""
        if isinstance(func, ast.Name) and func.id not in env and func.id not in self.aliases and \
                func.id in ("float", "int", "abs", "max", "min"):
            return func.id
        return None

    def dtype(self, node: ast.expr, env: Env, scope: _Scope, depth: int = 0) -> str | None:
        """The floating dtype a value is known to have in this scope, or None."""
        if depth > 25:
            return None
        if isinstance(node, ast.Name):
            bound = env.get(node.id)
            if bound is None:
                return scope.dtypes.get(node.id)
            return self.dtype(bound[0], bound[1], scope, depth + 1)
        if isinstance(node, ast.Subscript):
            return self.dtype(node.value, env, scope, depth + 1)
        if isinstance(node, ast.BinOp):
            for side in (node.left, node.right):
                if not self.is_constant(side, env):
                    found = self.dtype(side, env, scope, depth + 1)
                    if found:
                        return found
            return None
        if isinstance(node, ast.UnaryOp):
            return self.dtype(node.operand, env, scope, depth + 1)
        if not isinstance(node, ast.Call):
            return None
        for kw in node.keywords:
            if kw.arg == "dtype":
                return self.dtype_literal(kw.value)
        func = node.func
        if isinstance(func, ast.Attribute) and self.qual(func) is None:
            if func.attr in _DTYPE_METHODS:
                return _DTYPE_METHODS[func.attr]
            if func.attr in ("to", "type"):
                for arg in node.args:
                    found = self.dtype_literal(arg)
                    if found:
                        return found
            return self.dtype(func.value, env, scope, depth + 1)
        info = self.call(node, env, scope)
        if info is not None and info.family == "torch" and info.operand is not None:
            return self.dtype(info.operand, env, scope, depth + 1)
        if isinstance(func, ast.Name) and func.id in env:  # model(x) with model = Net().half()
            return self.dtype(func, env, scope, depth + 1)
        return None

    def dtype_literal(self, node: ast.expr) -> str | None:
        q = self.qual(node) or ""
        if q.startswith("torch."):
            return _DTYPES.get(q[len("torch."):])
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return _DTYPES.get(node.value)
        return None

    # ---- pattern predicates ------------------------------------------------------------------------------

    def square_of(self, node: ast.expr, env: Env, scope: _Scope) -> ast.expr | None:
        """``x`` when ``node`` is x**2, x.pow(2), torch.square(x) or x * x."""
        node, env = self.resolve(node, env)
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Pow) and self.number(node.right, env) == 2.0:
                return node.left
            if isinstance(node.op, ast.Mult) and ast.dump(node.left) == ast.dump(node.right):
                return node.left
            return None
        info = self.call(node, env, scope)
        if info is None:
            return None
        if info.op == "square":
            return info.operand
        if info.op == "pow":
            exponent = info.node.args[0 if info.family == "method" else 1] if len(info.node.args) > (
                0 if info.family == "method" else 1) else None
            if exponent is not None and self.number(exponent, env) == 2.0:
                return info.operand
        return None

    def mean_of(self, node: ast.expr, env: Env, scope: _Scope) -> tuple[ast.expr, _Call | None, Env] | None:
        """(x, the mean call, its env) when ``node`` is x.mean(..), torch.mean(x, ..) or x.sum(..) / n."""
        node, env = self.resolve(node, env)
        info = self.call(node, env, scope)
        if info is not None and info.op == "mean" and info.operand is not None:
            return info.operand, info, env
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            total = self.op(node.left, env, scope, "sum", strip=False)
            if total is not None and total.family != "builtin" and total.operand is not None:
                return total.operand, None, env
        return None

    def shifted(self, node: ast.expr | None, env: Env, scope: _Scope) -> bool:
        """Whether an exp argument cannot overflow.

        It cannot when it subtracts the max (or the logsumexp) of the same tensor (``x - x.amax(-1, keepdim=True)``,
        ``x - m`` with ``m = x.max(-1).values``), when it is never positive (``-d2 / s`` with d2 a square or a
        distance, ``-x.abs()``, ``-softplus(x)``, a log-probability), when it is clamped from above, or when it is a
        constant. Any other subtraction (``z - b``, ``z - 1.0``) or negation (``-e``, ``-y * z``) can still be large.
        """
        if node is None:
            return True
        node, env = self.strip(node, env, scope)
        if self.is_constant(node, env):  # exp(tensor([1000.])) overflows: only literals that keep it in range
            values = self.literal_values(node, env)
            return values is not None and all(v <= _EXP_SAFE for v in values)
        if self.nonpositive(node, env, scope):
            return True
        if isinstance(node, ast.Name) and scope.capped.get(node.id, math.inf) <= _EXP_SAFE:
            return True  # t[t > 20] = 20, t.clamp_(max=20) earlier in the function
        info = self.call(node, env, scope)
        if info is None:
            return False
        if info.op in ("clamp_max", "minimum", "min"):
            return True
        if info.op == "clamp":
            bound = self.upper_bound(info, env)
            return bound is not None and bound <= _EXP_SAFE
        return False

    def upper_bound(self, clamp: _Call, env: Env) -> float | None:
        """The constant upper bound of a clamp call (``max=20`` or the second bound), or None."""
        upper = [k.value for k in clamp.node.keywords if k.arg == "max"]
        upper += clamp.node.args[(1 if clamp.family.startswith("method") else 2):][:1]
        if not upper:
            return None
        values = self.literal_values(upper[0], env)
        return max(values) if values else None

    def literal_values(self, node: ast.expr, env: Env, depth: int = 0) -> list[float] | None:
        """The numbers a constant expression holds (``tensor([1000., 1001.])`` -> [1000, 1001]), or None when they
        are not plain numbers floatscope can evaluate."""
        node, env = self.resolve(node, env)
        if depth > 10:
            return None
        value = self.number(node, env)
        if value is not None:
            return [value]
        if isinstance(node, (ast.Tuple, ast.List)):
            out: list[float] = []
            for e in node.elts:
                part = self.literal_values(e, env, depth + 1)
                if part is None:
                    return None
                out += part
            return out
        q = self.qual(node) if isinstance(node, (ast.Name, ast.Attribute)) else None
        if q in ("math.pi", "numpy.pi", "torch.pi"):
            return [math.pi]
        if q in ("math.e", "numpy.e"):
            return [math.e]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = self.literal_values(node.operand, env, depth + 1)
            return None if inner is None else [-v if isinstance(node.op, ast.USub) else v for v in inner]
        if isinstance(node, ast.BinOp):
            left, right = self.literal_values(node.left, env, depth + 1), self.literal_values(node.right, env, depth + 1)
            if left is None or right is None or not left or not right or (len(left) > 1 and len(right) > 1 and
                                                                          len(left) != len(right)):
                return None
            ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
                   ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b}
            fn = ops.get(type(node.op))
            if fn is None:
                return None
            n = max(len(left), len(right))
            try:
                out = [float(fn(left[i % len(left)], right[i % len(right)])) for i in range(n)]
            except (ArithmeticError, ValueError, TypeError):
                return None
            return out if all(isinstance(v, float) for v in out) else None
        if isinstance(node, ast.Call) and node.args:
            q = self.qual(node.func) or self.builtin(node.func, env) or ""
            if q in ("torch.tensor", "torch.as_tensor", "numpy.array", "numpy.asarray", "numpy.float32",
                     "numpy.float64", "float"):
                return self.literal_values(node.args[0], env, depth + 1)
            fn = getattr(math, q[len("math."):], None) if q.startswith("math.") and q.count(".") == 1 else None
            if fn is not None and callable(fn) and len(node.args) <= 2:
                args = [self.literal_values(a, env, depth + 1) for a in node.args]
                if any(a is None or len(a) != 1 for a in args):
                    return None
                try:
                    result = fn(*[a[0] for a in args])  # type: ignore[index]
                except (ArithmeticError, ValueError, TypeError):
                    return None
                return [float(result)] if isinstance(result, (int, float)) else None
        return None

    def nonpositive(self, node: ast.expr, env: Env, scope: _Scope, depth: int = 0) -> bool:
        """An expression that is never above 0: -|x|, -d2 / s, -0.5 * z ** 2, x - x.max(), log_softmax(z)."""
        if depth > 12:
            return False
        node, env = self.strip(node, env, scope)
        value = self.number(node, env)
        if value is not None:
            return value <= 0
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return self.nonnegative(node.operand, env, scope, depth + 1)
        if isinstance(node, ast.BinOp):
            left, right, op = node.left, node.right, node.op
            if isinstance(op, ast.Sub):
                if (ast.dump(right), ast.dump(left)) in scope.ordered:  # b - a under ``if a >= b:``
                    return True
                return self.max_shift(left, right, env, scope) or (
                    self.nonpositive(left, env, scope, depth + 1) and self.nonnegative(right, env, scope, depth + 1))
            if isinstance(op, ast.Add):
                return self.nonpositive(left, env, scope, depth + 1) and self.nonpositive(right, env, scope, depth + 1)
            if isinstance(op, ast.Mult):
                for const, other in ((left, right), (right, left)):  # -1.0 * x: only for x >= 0 by its form
                    c = self.number(const, env)
                    if c is not None:
                        return (c <= 0 and self.nonnegative(other, env, scope, depth + 1)) or (
                            c >= 0 and self.nonpositive(other, env, scope, depth + 1))
                if isinstance(left, ast.UnaryOp) and isinstance(left.op, ast.USub):  # -gamma * d2 is -(gamma * d2)
                    if self.nonnegative_product(left.operand, right, env, scope, depth + 1):
                        return True
                return (self.nonpositive(left, env, scope, depth + 1) and self.scale(right, env, scope, depth + 1)) \
                    or (self.scale(left, env, scope, depth + 1) and self.nonpositive(right, env, scope, depth + 1))
            if isinstance(op, ast.Div):
                return self.nonpositive(left, env, scope, depth + 1) and self.scale(right, env, scope, depth + 1)
            return False
        info = self.call(node, env, scope)
        return info is not None and info.op in ("log_softmax", "logsigmoid")

    def nonnegative(self, node: ast.expr, env: Env, scope: _Scope, depth: int = 0) -> bool:
        """An expression that is never below 0 by its form: a square, |x|, a norm or distance, relu, softplus."""
        if depth > 12:
            return False
        raw = node
        node, env = self.strip(node, env, scope)
        value = self.number(node, env)
        if value is not None:
            return value >= 0
        if self.square_of(node, env, scope) is not None:
            return True
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Pow):
                exponent = self.number(node.right, env)
                return exponent is not None and exponent % 2 == 0 or self.nonnegative(node.left, env, scope, depth + 1)
            if isinstance(node.op, (ast.Mult, ast.Div)):
                return self.nonnegative_product(node.left, node.right, env, scope, depth + 1)
            if isinstance(node.op, ast.Add):
                return self.nonnegative(node.left, env, scope, depth + 1) and \
                    self.nonnegative(node.right, env, scope, depth + 1)
            return False
        info = self.call(node, env, scope)
        if info is not None:
            if info.op in _NONNEG_CALLS:
                return True
            if info.op in ("sum", "mean", "cumsum") and info.family != "builtin" and info.operand is not None:
                return self.nonnegative(info.operand, env, scope, depth + 1)
            if info.op in ("clamp", "clamp_min"):
                low = [k.value for k in info.node.keywords if k.arg == "min"]
                low += info.node.args[(0 if info.family == "method" else 1):][:1]
                bound = self.number(low[0], env) if low else None
                return bound is not None and bound >= 0
            return False
        name = raw.id if isinstance(raw, ast.Name) else raw.attr if isinstance(raw, ast.Attribute) else None
        return node is raw and name is not None and bool(_NONNEG_NAME.fullmatch(name))

    def nonnegative_product(self, a: ast.expr, b: ast.expr, env: Env, scope: _Scope, depth: int) -> bool:
        """a * b (or a / b) is never negative: one factor is by its form, the other is too or is a scale. A literal
        factor is not a scale: 1.0 * x is as signed as x."""
        for const, other in ((a, b), (b, a)):
            c = self.number(const, env)
            if c is not None:
                return c >= 0 and self.nonnegative(other, env, scope, depth)
        return (self.nonnegative(a, env, scope, depth) and self.scale(b, env, scope, depth)) or \
            (self.scale(a, env, scope, depth) and self.nonnegative(b, env, scope, depth))

    def scale(self, node: ast.expr, env: Env, scope: _Scope, depth: int = 0) -> bool:
        """A factor taken to be positive: a non-negative expression, or a plain name or attribute (sigma, tau)."""
        stripped, _ = self.strip(node, env, scope)
        if isinstance(stripped, (ast.Name, ast.Attribute)):
            return True
        return self.nonnegative(node, env, scope, depth + 1)

    def max_shift(self, x: ast.expr, m: ast.expr, env: Env, scope: _Scope) -> bool:
        """Whether ``m`` is the max (or the logsumexp) of ``x``: x.max(..), x.amax(..), x.max(dim)[0], .values,
        torch.max(x, ..), torch.maximum(x, y), logsumexp(x, ..), or a name bound to one of them."""
        node, node_env = m, env
        for _ in range(10):
            node, node_env = self.strip(node, node_env, scope)
            if isinstance(node, ast.Subscript) and self.number(node.slice, node_env) == 0.0:
                node = node.value
            elif isinstance(node, ast.Attribute) and node.attr == "values":
                node = node.value
            else:
                break
        if isinstance(node, ast.Subscript) and self.same_tensor(x, env, node.value, node_env, scope) and \
                any(self.argmax_of(n, x, env, node_env, scope) for n in ast.walk(node.slice)):
            return True  # vec[0, argmax(vec)]: the max, picked by its index
        info = self.call(node, node_env, scope)
        if info is not None and info.op in ("gather", "take_along_dim") and info.operand is not None and \
                self.same_tensor(x, env, info.operand, node_env, scope) and \
                any(self.argmax_of(n, x, env, node_env, scope) for a in info.node.args for n in ast.walk(a)):
            return True  # x.gather(1, x.argmax(1, keepdim=True))
        if info is None or info.op not in ("max", "amax", "nanmax", "maximum", "logsumexp", "fmax"):
            return False
        candidates = ([info.operand] if info.operand is not None else []) + [
            a for a in info.node.args if a is not info.operand and not isinstance(a, ast.Starred)]
        return any(self.same_tensor(x, env, c, node_env, scope) for c in candidates)

    def argmax_of(self, node: ast.AST, x: ast.expr, x_env: Env, env: Env, scope: _Scope) -> bool:
        """``node`` is the index of x's max: x.argmax(..), torch.argmax(x, ..), or a helper named argmax(x)."""
        if not isinstance(node, ast.Call):
            return False
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name not in ("argmax", "nanargmax"):
            return False
        args = [a for a in node.args if not isinstance(a, ast.Starred)]
        if isinstance(func, ast.Attribute) and self.qual(func) is None:
            args.insert(0, func.value)  # x.argmax(1)
        return any(self.same_tensor(x, x_env, a, env, scope) for a in args[:1])

    def same_tensor(self, a: ast.expr, a_env: Env, b: ast.expr, b_env: Env, scope: _Scope) -> bool:
        if ast.dump(a) == ast.dump(b):
            return True
        sa, _ = self.strip(a, a_env, scope)
        sb, _ = self.strip(b, b_env, scope)
        return sa is sb or ast.dump(sa) == ast.dump(sb)

    def exp_call(self, node: ast.expr, env: Env, scope: _Scope) -> _Call | None:
        """The exp call ``node`` stands for, when it can overflow (no max subtracted)."""
        info = self.op(node, env, scope, "exp")
        return info if info is not None and not self.shifted(info.operand, env, scope) else None

    def softmax_of(self, node: ast.expr, env: Env, scope: _Scope) -> tuple[_Call | None, bool]:
        """(the softmax call, whether it was indexed or gathered on the way)."""
        indexed = False
        for _ in range(10):
            node, env = self.strip(node, env, scope)
            if isinstance(node, ast.Subscript):
                node, indexed = node.value, True
                continue
            info = self.call(node, env, scope)
            if info is not None and info.op in _PICK and info.operand is not None:
                node, indexed = info.operand, True  # p.gather(1, y), p.diag(), torch.diagonal(p): the targets' p
                continue
            if info is not None and info.op == "softmax":
                return info, indexed
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                ex = self.op(node.left, env, scope, "exp")
                total = self.op(node.right, env, scope, "sum")
                if ex is not None and total is not None and total.operand is not None and \
                        self.op(total.operand, env, scope, "exp") is not None:
                    return _Call("softmax", "manual", ex.operand, ex.node, source=total.node,
                                 library=ex.family), indexed
            break
        return None, indexed

    def is_norm_like(self, node: ast.expr, env: Env, scope: _Scope) -> str | None:
        """``norm``, ``std`` or ``sum`` when the denominator is one with nothing to keep it from 0 (or a product or
        power of one: ``a.norm() * b.norm()``, ``x.norm() ** 2``)."""
        node, env = self.strip(node, env, scope)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            return self.is_norm_like(node.left, env, scope) or self.is_norm_like(node.right, env, scope)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            exponent = self.number(node.right, env)
            return self.is_norm_like(node.left, env, scope) if exponent is not None and exponent > 0 else None
        info = self.call(node, env, scope)
        if info is not None and info.op in ("norm", "std", "sum", "nansum") and info.family not in ("builtin", "math"):
            if info.operand is None or self.is_constant(info.operand, env):
                return None
            if info.op in ("sum", "nansum") and self.positive(info.operand, env, scope):
                return None
            return "sum" if info.op == "nansum" else info.op
        root = self.op(node, env, scope, "sqrt")
        if root is not None and root.operand is not None:
            inner, inner_env = self.resolve(root.operand, env)
            total = self.op(inner, inner_env, scope, "sum", strip=False)
            if total is not None and total.family != "builtin" and total.operand is not None and \
                    self.square_of(total.operand, inner_env, scope) is not None:
                return "norm"
        return None

    def positive(self, node: ast.expr, env: Env, scope: _Scope) -> bool:
        """A summand that is never 0: exp (of anything), softmax, sigmoid, or something plus a positive literal."""
        node, env = self.strip(node, env, scope)
        if self.op(node, env, scope, "exp", "softmax", "sigmoid", "ones_like", "ones", strip=False):
            return True
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            for side in (node.left, node.right):
                value = self.number(side, env)
                if value is not None and value > 0:
                    return True
        return False

    def is_variance(self, node: ast.expr, env: Env, scope: _Scope) -> bool:
        """A variance or mean square: var(), E[(x - m)**2], E[x**2], E[x**2] - E[x]**2, or a name like ``var``."""
        raw = node
        node, env = self.strip(node, env, scope)
        if self.op(node, env, scope, "var", strip=False):
            return True
        mean = self.mean_of(node, env, scope)
        if mean is not None and self.square_of(mean[0], mean[2], scope) is not None:
            return True
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub) and self.naive_variance(node, env, scope):
            return True
        if isinstance(raw, ast.Name) and node is raw:  # not bound in this scope: judge by its name
            return bool(re.fullmatch(r"(?i)(var|variance|.*_var|var_.*|.*_variance)", raw.id))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            return bool(re.fullmatch(r"(?i)(var|variance|.*_var|var_.*)", node.attr))
        return False

    def naive_variance(self, node: ast.BinOp, env: Env, scope: _Scope) -> tuple[ast.expr, _Call | None, _Call | None] | None:
        """(x, mean-of-squares call, mean call) when ``node`` is E[x**2] - E[x]**2."""
        left = self.mean_of(node.left, env, scope)
        if left is None:
            return None
        x = self.square_of(left[0], left[2], scope)
        right_sq = self.square_of(node.right, env, scope)
        if x is None or right_sq is None:
            return None
        mean = self.mean_of(right_sq, env if not isinstance(node.right, ast.Name) else
                            self.resolve(node.right, env)[1], scope)
        if mean is None:
            return None
        if ast.dump(self.resolve(x, left[2])[0]) != ast.dump(self.resolve(mean[0], mean[2])[0]):
            return None
        return x, left[1], mean[1]

    def is_cosine(self, node: ast.expr, env: Env, scope: _Scope) -> bool:
        """A cosine: cosine_similarity, a dot product over norms, or a dot product of normalised vectors."""
        raw = node
        node, env = self.strip(node, env, scope)
        if self.op(node, env, scope, "cosine_similarity", strip=False):
            return True
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            if self.dot_of(node.left, env, scope) is not None and self.has_norm(node.right, env, scope):
                return True
        parts = self.dot_of(node, env, scope)
        if parts is not None and any(self.normalised(p, env, scope) for p in parts):
            return True
        if isinstance(raw, ast.Name) and node is raw:
            return "cos" in raw.id.lower()
        return False

    def dot_of(self, node: ast.expr, env: Env, scope: _Scope) -> tuple[ast.expr, ...] | None:
        node, env = self.resolve(node, env)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            return node.left, node.right
        info = self.call(node, env, scope)
        if info is None:
            return None
        if info.op in ("dot", "matmul", "mm", "bmm", "inner", "vdot", "mv"):
            args = [info.operand] if info.family == "method" else []
            args += list(info.node.args[0 if info.family == "method" else 1:][:1] if info.family == "method"
                         else info.node.args[1:2])
            return tuple(a for a in args if a is not None)
        if info.op == "sum" and info.operand is not None:
            prod, _ = self.resolve(info.operand, env)
            if isinstance(prod, ast.BinOp) and isinstance(prod.op, ast.Mult):
                return prod.left, prod.right
        if info.op == "einsum" and len(info.node.args) >= 3:
            return tuple(info.node.args[1:])
        return None

    def has_norm(self, node: ast.expr, env: Env, scope: _Scope) -> bool:
        node, env = self.strip(node, env, scope)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            return self.has_norm(node.left, env, scope) or self.has_norm(node.right, env, scope)
        if self.op(node, env, scope, "norm", strip=False):
            return True
        info = self.call(node, env, scope)
        if info is not None and info.op in ("clamp", "clamp_min", "max", "maximum") and info.operand is not None:
            return self.has_norm(info.operand, env, scope)
        return isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and (
            self.has_norm(node.left, env, scope) or self.has_norm(node.right, env, scope))

    def normalised(self, node: ast.expr, env: Env, scope: _Scope) -> bool:
        node, env = self.strip(node, env, scope)
        if self.op(node, env, scope, "normalize", strip=False):
            return True
        return isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and self.has_norm(node.right, env, scope)

    # ---- reporting ---------------------------------------------------------------------------------------

    def text(self, node: ast.AST) -> str:
        """The source of an expression, without the comments inside it (a multi-line call may have some)."""
        segment = ast.get_source_segment(self.source, node) or ast.unparse(node)
        return _strip_comments(segment) if "#" in segment else segment

    def comment_inside(self, node: ast.expr) -> bool:
        """Whether a comment lies inside the expression's span: a rewrite of the span would drop it."""
        if self.comments is None:
            self.comments = _comment_positions(self.source)
        start = (node.lineno, node.col_offset)
        end = (node.end_lineno or node.lineno, node.end_col_offset or 0)
        lines = self.source.splitlines()
        for line, col in self.comments:  # char columns; convert the node's byte offsets to compare
            text = lines[line - 1] if 0 < line <= len(lines) else ""
            byte = len(text[:col].encode("utf-8"))
            if start <= (line, byte) < end:
                return True
        return False

    def atom(self, node: ast.expr) -> str:
        """Source text that can take ``.method()`` or a unary minus without changing meaning."""
        text = self.text(node)
        simple = isinstance(node, (ast.Name, ast.Attribute, ast.Call, ast.Subscript)) or (
            isinstance(node, ast.Constant) and not (isinstance(node.value, (int, float)) and node.value < 0))
        return text if simple else f"({text})"

    def char_col(self, line: int, byte_col: int) -> int:
        text = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        return len(text.encode("utf-8")[:byte_col].decode("utf-8", errors="replace"))

    def report(self, rule_id: str, at: ast.expr, message: str, fix: str | None, *, replace: ast.expr | None = None,
               claims: tuple[str, ...] = ()) -> None:
        rule = RULES[rule_id]
        line, col = at.lineno, self.char_col(at.lineno, at.col_offset)
        key = (rule_id, line, col)
        if key in self.findings:
            return
        edit = None
        if replace is not None and isinstance(replace, ast.Call) and replace.keywords:
            replace = None  # torch.log(1 + x, out=y): the rewrites drop keyword arguments
        if replace is not None and self.comment_inside(replace):
            replace = None  # libcst would keep it, but it belongs to the code being replaced: leave it to the user
            message += " (not applied by --fix: the expression has a comment inside, which the rewrite would drop)"
        if replace is not None and fix is not None:
            end_line = replace.end_lineno or replace.lineno
            edit = Edit(replace.lineno, self.char_col(replace.lineno, replace.col_offset), end_line,
                        self.char_col(end_line, replace.end_col_offset or 0), fix)
        message = " ".join(message.split())  # a multi-line expression quoted in one line
        self.findings[key] = Finding(rule_id, self.filename, line, col + 1, rule.severity, message, fix,
                                     edit is not None, edit)
        for weaker in claims:
            self.claimed.setdefault((line, col), set()).add(weaker)

    def results(self) -> list[Finding]:
        out = []
        for f in self.findings.values():
            if f.rule in self.claimed.get((f.line, f.col - 1), set()):
                continue
            out.append(f)
        return sorted(out, key=lambda f: (f.line, f.col, f.rule))

    # ---- walking -----------------------------------------------------------------------------------------

    def run(self, tree: ast.Module) -> None:
        self.collect_imports(tree)
        scope = _Scope(env={})
        deferred: list[ast.stmt] = []
        self.block(tree.body, scope, deferred)
        # Functions see module-level names as bound when the module finished loading.
        for node in deferred:
            self.definition_isolated(node, scope)

    def definition(self, node: ast.stmt, outer: _Scope) -> None:
        if isinstance(node, ast.ClassDef):
            attrs: dict[str, ast.expr] = {}
            for item in ast.walk(node):
                if isinstance(item, ast.Assign) and len(item.targets) == 1:
                    target = item.targets[0]
                    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and \
                            target.value.id == "self" and target.attr not in attrs:
                        attrs[target.attr] = item.value
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    self.definition_isolated(item, _Scope(env=outer.env, dtypes=dict(outer.dtypes), self_attrs=attrs))
                else:
                    self.block([item], _Scope(env=dict(outer.env)), [])
            return
        assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        env = dict(outer.env)
        args = node.args
        for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
            if a is not None:
                env[a.arg] = None
        scope = _Scope(env=env, dtypes={}, self_attrs=outer.self_attrs)
        for default in args.defaults + [d for d in args.kw_defaults if d is not None]:
            self.expression(default, outer)
        nested: list[ast.stmt] = []
        self.block(node.body, scope, nested)
        for inner in nested:
            self.definition_isolated(inner, scope)

    def bind(self, target: ast.expr, value: ast.expr | None, scope: _Scope, env: Env) -> None:
        if isinstance(target, ast.Name):
            scope.env = dict(scope.env)
            scope.env[target.id] = None if value is None else (value, env)
            scope.dtypes.pop(target.id, None)
            scope.guarded = {k: names for k, names in scope.guarded.items() if target.id not in names}
            scope.ordered = {k: names for k, names in scope.ordered.items() if target.id not in names}
            scope.capped.pop(target.id, None)
        elif isinstance(target, (ast.Tuple, ast.List)):
            values: list[ast.expr | None] = [None] * len(target.elts)
            if isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts):
                values = list(value.elts)
            elif len(target.elts) == 2 and value is not None and self.op(value, env, scope, *_PAIRS, strip=False):
                first = ast.copy_location(ast.Subscript(value=value, slice=ast.Constant(0), ctx=ast.Load()), value)
                values[0] = first  # m, _ = x.max(dim): m is x.max(dim)[0]
            for t, v in zip(target.elts, values, strict=True):
                self.bind(t, v, scope, env)
        elif isinstance(target, ast.Starred):
            self.bind(target.value, None, scope, env)

    def block(self, body: list[ast.stmt], scope: _Scope, deferred: list[ast.stmt]) -> None:
        for stmt in body:
            try:
                self.statement(stmt, scope, deferred)
            except Exception as exc:  # a floatscope bug: lose this statement's findings, not the file's
                self.internal_error(stmt, exc)

    def internal_error(self, at: ast.AST, exc: Exception) -> None:
        """Report a failure of floatscope itself (FS002) at the statement being analysed, and carry on."""
        from floatscope._version import __version__

        line = getattr(at, "lineno", 1)
        col = getattr(at, "col_offset", 0)
        key = ("FS002", line, col)
        if key in self.findings:
            return
        self.findings[key] = Finding(
            "FS002", self.filename, line, col + 1, "error",
            f"floatscope could not analyse {self.filename}:{line}: internal error {type(exc).__name__}: {exc}, please "
            f"report it (floatscope {__version__}, with this statement); the findings of this statement are missing, "
            f"the rest of the file and the other files were checked", None, False)

    def definition_isolated(self, node: ast.stmt, outer: _Scope) -> None:
        try:
            self.definition(node, outer)
        except Exception as exc:  # a floatscope bug in a signature or class body: keep the other definitions
            self.internal_error(node, exc)

    def statement(self, stmt: ast.stmt, scope: _Scope, deferred: list[ast.stmt]) -> None:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for decorator in stmt.decorator_list:
                self.expression(decorator, scope)
            deferred.append(stmt)
            scope.env = dict(scope.env)
            scope.env[stmt.name] = None
            return
        if isinstance(stmt, ast.Assign):
            self.expression(stmt.value, scope)
            env = scope.env
            for target in stmt.targets:
                if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name) and any(
                        isinstance(n, ast.Name) and n.id == target.value.id for n in ast.walk(target.slice)):
                    self.forget(target.value.id, scope)  # std[std == 0] = 1: no longer the std it was
                    cap = self.cap_of(target, stmt.value, scope.env)
                    if cap is not None:
                        scope.capped[target.value.id] = cap  # t[t > 20] = 20: t is at most 20 from here on
                    continue
                self.bind(target, stmt.value, scope, env)
            return
        if isinstance(stmt, ast.AnnAssign):
            if stmt.value is not None:
                self.expression(stmt.value, scope)
                self.bind(stmt.target, stmt.value, scope, scope.env)
            return
        if isinstance(stmt, ast.AugAssign):
            combined = ast.BinOp(left=stmt.target, op=stmt.op, right=stmt.value)
            ast.copy_location(combined, stmt)
            combined.end_lineno, combined.end_col_offset = stmt.end_lineno, stmt.end_col_offset
            self.expression(stmt.value, scope)
            self.check_binop(combined, scope.env, scope, augmented=True)
            if isinstance(stmt.target, ast.Name):
                self.bind(stmt.target, combined, scope, scope.env)
            return
        if isinstance(stmt, ast.Expr):
            self.expression(stmt.value, scope)
            value = stmt.value  # model.half() converts a module in place
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and \
                    isinstance(value.func.value, ast.Name) and value.func.attr in _IN_PLACE:
                self.forget(value.func.value.id, scope)  # std.clamp_(min=eps), std.masked_fill_(std == 0, 1)
                info = self.call(value, scope.env, scope)
                bound = None
                if info is not None and info.op == "clamp_":
                    bound = self.upper_bound(info, scope.env)
                elif info is not None and info.op == "clamp_max_" and value.args:
                    values = self.literal_values(value.args[0], scope.env)
                    bound = max(values) if values else None
                if bound is not None:
                    scope.capped[value.func.value.id] = bound  # t.clamp_(max=20)
                return
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and \
                    isinstance(value.func.value, ast.Name):
                found = self.dtype(value, scope.env, scope)
                if found and (value.func.attr in _DTYPE_METHODS or value.func.attr == "to"):
                    scope.dtypes[value.func.value.id] = found
                    scope.env = dict(scope.env)
                    scope.env[value.func.value.id] = None
            return
        if isinstance(stmt, (ast.For, ast.AsyncFor)):
            self.expression(stmt.iter, scope)
            self.bind(stmt.target, None, scope, scope.env)
            self.block(stmt.body, scope, deferred)
            self.block(stmt.orelse, scope, deferred)
            return
        if isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                self.expression(item.context_expr, scope)
                if item.optional_vars is not None:
                    self.bind(item.optional_vars, None, scope, scope.env)
            self.block(stmt.body, scope, deferred)
            return
        if isinstance(stmt, ast.If):
            facts = self.branch_facts(stmt.test, scope)
            (when_true, order_true), (when_false, order_false) = facts
            for body, (known, order) in zip((stmt.body, stmt.orelse), facts, strict=True):
                before, before_order = dict(scope.guarded), dict(scope.ordered)
                self.guard(known, scope)
                scope.ordered = {**scope.ordered, **dict(order)}
                self.block(body, scope, deferred)
                scope.guarded = {k: v for k, v in scope.guarded.items() if k in before or k not in dict(known)}
                scope.ordered = {k: v for k, v in scope.ordered.items() if k in before_order or k not in dict(order)}
            # if n == 0: return / raise / continue: below the if, n is not 0
            if stmt.body and isinstance(stmt.body[-1], (ast.Return, ast.Raise, ast.Continue, ast.Break)):
                self.guard(when_false, scope)
                scope.ordered = {**scope.ordered, **dict(order_false)}
            if stmt.orelse and isinstance(stmt.orelse[-1], (ast.Return, ast.Raise, ast.Continue, ast.Break)):
                self.guard(when_true, scope)
                scope.ordered = {**scope.ordered, **dict(order_true)}
            return
        if isinstance(stmt, ast.While):
            self.expression(stmt.test, scope)
            self.block(stmt.body, scope, deferred)
            self.block(stmt.orelse, scope, deferred)
            return
        if isinstance(stmt, ast.Try) or type(stmt).__name__ == "TryStar":
            self.block(stmt.body, scope, deferred)  # type: ignore[attr-defined]
            for handler in stmt.handlers:  # type: ignore[attr-defined]
                if handler.name:
                    scope.env = dict(scope.env)
                    scope.env[handler.name] = None
                self.block(handler.body, scope, deferred)
            self.block(stmt.orelse, scope, deferred)  # type: ignore[attr-defined]
            self.block(stmt.finalbody, scope, deferred)  # type: ignore[attr-defined]
            return
        if type(stmt).__name__ == "Match":
            self.expression(stmt.subject, scope)  # type: ignore[attr-defined]
            for case in stmt.cases:  # type: ignore[attr-defined]
                self.block(case.body, scope, deferred)
            return
        for child in ast.iter_child_nodes(stmt):
            if isinstance(child, ast.expr):
                self.expression(child, scope)

    def cap_of(self, target: ast.Subscript, value: ast.expr, env: Env) -> float | None:
        """The cap ``t[t > c] = v`` puts on t (max(c, v)), or None when it is not that form with numbers."""
        test = target.slice
        v = self.number(value, env)
        if v is None or not isinstance(test, ast.Compare) or len(test.ops) != 1:
            return None
        left, op, right = test.left, test.ops[0], test.comparators[0]
        if not (isinstance(left, ast.Name) and isinstance(target.value, ast.Name) and left.id == target.value.id):
            return None
        c = self.number(right, env)
        return max(c, v) if c is not None and isinstance(op, (ast.Gt, ast.GtE)) else None

    def forget(self, name: str, scope: _Scope) -> None:
        """``name`` was changed in place (std[std == 0] = 1, std.clamp_(min=eps)): stop following its old value."""
        found = self.dtype(ast.Name(id=name, ctx=ast.Load()), scope.env, scope)
        scope.env = dict(scope.env)
        scope.env[name] = None
        if found:
            scope.dtypes[name] = found

    def guard(self, known: list[tuple[str, frozenset[str]]], scope: _Scope) -> None:
        for key, names in known:
            scope.guarded[key] = names

    def order_when(self, test: ast.expr) -> tuple[list[tuple[tuple[str, str], frozenset[str]]],
                                                  list[tuple[tuple[str, str], frozenset[str]]]]:
        """The orderings (larger, smaller) a test shows when it is true, and when it is false: ``a >= b`` shows
        a >= b when true and b >= a when false. Only comparisons of two expressions that are not numbers."""
        if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
            return [k for v in test.values for k in self.order_when(v)[0]], []
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            true, false = self.order_when(test.operand)
            return false, true
        if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and
                isinstance(test.ops[0], (ast.Gt, ast.GtE, ast.Lt, ast.LtE))):
            return [], []
        left, right = test.left, test.comparators[0]
        if self.number(left, {}) is not None or self.number(right, {}) is not None:
            return [], []
        names = frozenset(n.id for side in (left, right) for n in ast.walk(side) if isinstance(n, ast.Name))
        a, b = ast.dump(left), ast.dump(right)
        if isinstance(test.ops[0], (ast.Gt, ast.GtE)):
            return [((a, b), names)], [((b, a), names)]
        return [((b, a), names)], [((a, b), names)]

    def nonzero_when(self, test: ast.expr) -> tuple[list[tuple[str, frozenset[str]]], list[tuple[str, frozenset[str]]]]:
        """The expressions a test shows to be nonzero when it is true, and when it is false.

        ``n == 0``, ``n <= eps``, ``not n``, ``(n == 0).any()`` and ``torch.any(n == 0)`` are false only for a
        nonzero n; ``n > 0``, ``n != 0``, ``n`` and ``(n > 0).all()`` are true only for one.
        """
        def key(node: ast.expr) -> tuple[str, frozenset[str]]:
            while True:  # n.item() == 0, float(n) == 0, abs(n) < eps
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and not node.args and \
                        node.func.attr in ("item", "abs", "detach", "float", "cpu"):
                    node = node.func.value
                elif isinstance(node, ast.Call) and len(node.args) == 1 and (
                        self.builtin(node.func, {}) in ("float", "int", "abs") or
                        (self.qual(node.func) or "") in ("torch.abs", "numpy.abs", "math.fabs")):
                    node = node.args[0]
                else:
                    break
            return ast.dump(node), frozenset(n.id for n in ast.walk(node) if isinstance(n, ast.Name))

        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            true, false = self.nonzero_when(test.operand)
            return false, true
        if isinstance(test, ast.BoolOp):
            parts = [self.nonzero_when(v) for v in test.values]
            if isinstance(test.op, ast.And):
                return [k for t, _ in parts for k in t], []
            return [], [k for _, f in parts for k in f]
        if isinstance(test, ast.Compare) and len(test.ops) == 1:
            left, op, right = test.left, test.ops[0], test.comparators[0]
            flipped = {ast.Lt: ast.Gt, ast.LtE: ast.GtE, ast.Gt: ast.Lt, ast.GtE: ast.LtE, ast.Eq: ast.Eq,
                       ast.NotEq: ast.NotEq}
            if self.number(left, {}) is not None and type(op) in flipped:
                left, op, right = right, flipped[type(op)](), left
            bound = self.number(right, {})
            if bound is None or self.number(left, {}) is not None:
                return [], []
            if (isinstance(op, ast.Eq) and bound == 0) or (isinstance(op, (ast.Lt, ast.LtE)) and bound >= 0):
                return [], [key(left)]
            if (isinstance(op, ast.NotEq) and bound == 0) or (isinstance(op, ast.Gt) and bound >= 0) or \
                    (isinstance(op, ast.GtE) and bound > 0):
                return [key(left)], []
            return [], []
        if isinstance(test, ast.Call):
            func = test.func
            name = func.attr if isinstance(func, ast.Attribute) else ""
            inner = None
            if name in ("any", "all") and not test.args and isinstance(func, ast.Attribute):
                inner = func.value  # (n == 0).any()
            elif name in ("any", "all") and len(test.args) == 1:
                inner = test.args[0]  # torch.any(n == 0)
            if inner is not None:
                true, false = self.nonzero_when(inner)
                return (true, []) if name == "all" else ([], false)
        if isinstance(test, (ast.Name, ast.Attribute)):
            return [key(test)], []
        return [], []

    def expression(self, root: ast.expr, scope: _Scope) -> None:
        env = scope.env
        for node in _walk(root, stop=ast.IfExp):
            if isinstance(node, ast.IfExp):
                self.conditional(node, scope)
                env = scope.env
                continue
            if isinstance(node, ast.NamedExpr):  # (p := F.softmax(z, -1)): p is bound from here on
                self.bind(node.target, node.value, scope, env)
                env = scope.env
            elif isinstance(node, ast.Call):
                self.check_call(node, env, scope)
            elif isinstance(node, ast.BinOp):
                self.check_binop(node, env, scope)

    def branch_facts(self, test: ast.expr, scope: _Scope) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
        """Check ``test``, then what it shows in its true branch and in its false branch: the names
        known non-zero and the operand orderings, as ``((nonzero, order), (nonzero, order))``."""
        self.expression(test, scope)
        when_true, when_false = self.nonzero_when(test)
        order_true, order_false = self.order_when(test)
        return (when_true, order_true), (when_false, order_false)

    def conditional(self, node: ast.IfExp, scope: _Scope) -> None:
        """``a / n if n > 0 else 0``: each branch is checked knowing what the test shows."""
        for branch, (known, order) in zip((node.body, node.orelse), self.branch_facts(node.test, scope), strict=True):
            before, before_order = dict(scope.guarded), dict(scope.ordered)
            self.guard(known, scope)
            scope.ordered = {**scope.ordered, **dict(order)}
            self.expression(branch, scope)
            scope.guarded, scope.ordered = before, before_order

    # ---- the rules ---------------------------------------------------------------------------------------

    def check_call(self, node: ast.Call, env: Env, scope: _Scope) -> None:
        self.check_optimizer(node, env, scope)
        info = self.call(node, env, scope)
        if info is None:
            return
        if info.op in ("log", "log1p") and info.family != "builtin" and info.operand is not None and \
                len(node.args) <= (0 if info.family == "method" else 1):
            self.check_log(info, env, scope)
        elif info.op == "nll_loss" and info.operand is not None:
            self.check_nll(info, env, scope)
        elif info.op == "binary_cross_entropy" and info.operand is not None:
            sig = self.op(info.operand, env, scope, "sigmoid")
            if sig is not None:
                where = "BCELoss()" if info.family == "module" else "binary_cross_entropy"
                z = self.text(sig.operand) if sig.operand is not None else "z"
                rest = ", ".join(self.text(a) for a in node.args[1:])
                f = self.alias_for("torch.nn.functional") or "F"
                fix = (f"nn.BCEWithLogitsLoss()({z}{', ' + rest if rest else ''})" if info.family == "module" else
                       f"{f}.binary_cross_entropy_with_logits({z}{', ' + rest if rest else ''})")
                self.report("FS105", node,
                            f"{where} on sigmoid({z}): sigmoid rounds to exactly 1.0 for logits above 16.6 (float32; "
                            f"8.3 in float16) and to 0 below -88.7, BCE then clamps log(0) to -100, so the loss caps "
                            f"at 100 and the gradient is 0 (autocast refuses binary_cross_entropy outright); pass the "
                            f"logits to the fused loss, which computes log-sigmoid stably (not applied by --fix: "
                            f"without BCE's -100 clamp the values of saturated samples change)", fix)
        elif info.op in ("acos", "asin") and info.operand is not None:
            clamp = self.op(info.operand, env, scope, "clamp")
            if clamp is not None and clamp.operand is not None:
                if info.family in ("torch", "method", "jax"):  # numpy has no gradient to guard
                    self.check_clamped_acos(info, clamp, env)
            elif self.is_cosine(info.operand, env, scope) and not self.is_constant(info.operand, env):
                c = self.text(info.operand)
                self.report("FS115", node,
                            f"{info.op} of the cosine {c} without a clamp: rounding puts the cosine of parallel "
                            f"vectors at 1.0000001 (float32) and {info.op} of it is NaN; the gradient "
                            f"1 / sqrt(1 - c**2) is infinite at c = +-1 even when the forward survives",
                            f"{info.op}({self.atom(info.operand)}.clamp(-1 + 1e-7, 1 - 1e-7)), or "
                            f"atan2(|a x b|, a . b) for the angle")
        elif info.op == "sqrt" and info.operand is not None and info.family in ("torch", "method", "jax"):
            self.check_sqrt(info.operand, node, env, scope)
        elif info.op == "pow" and info.operand is not None and info.family in ("torch", "method"):
            exponent = node.args[0 if info.family == "method" else 1:][:1]
            if exponent and self.number(exponent[0], env) == 0.5:
                self.check_sqrt(info.operand, node, env, scope)  # x.pow(0.5) is sqrt(x)
        elif info.op == "rsqrt" and info.operand is not None:
            if self.is_variance(info.operand, env, scope):
                self.report_rsqrt(node, info.operand)
        elif info.op in ("div", "true_divide") and info.family != "builtin":
            num = info.operand
            den = (node.args[0] if info.family == "method" else (node.args[1] if len(node.args) > 1 else None)) \
                if node.args else None
            if num is not None and den is not None:
                self.check_division(num, den, node, env, scope)
        elif info.op in ("masked_fill", "masked_fill_") and info.family == "method" and len(node.args) >= 2:
            self.check_literal(node.args[1], info.operand, env, scope, node, mask=True)
        elif info.op in ("clamp", "clamp_min", "clamp_", "clamp_min_") and info.operand is not None:
            low = [kw.value for kw in node.keywords if kw.arg == "min"]
            low += list(node.args[(0 if info.family == "method" else 1):][:1])
            for value in low[:1]:
                self.check_epsilon(value, info.operand, env, scope, node)

    def check_clamped_acos(self, info: _Call, clamp: _Call, env: Env) -> None:
        """acos(c.clamp(-1, 1)): the forward is finite, the gradient -1 / sqrt(1 - c**2) is not, at c = +-1."""
        node = clamp.node
        first = 0 if clamp.family == "method" else 1
        bounds = {k.arg: k.value for k in node.keywords if k.arg in ("min", "max")}
        for name, value in zip(("min", "max"), node.args[first:first + 2], strict=False):
            bounds.setdefault(name, value)
        at_one = [self.text(v) for v in bounds.values() if (n := self.number(v, env)) is not None and abs(n) >= 1]
        if not at_one or clamp.operand is None:
            return
        c = self.text(clamp.operand)
        self.report("FS115", info.node,
                    f"{self.text(info.node)}: the clamp at {' and '.join(at_one)} keeps the forward finite, but the "
                    f"gradient 1 / sqrt(1 - c**2) of {info.op} is infinite at c = +-1, where rounding puts the cosine "
                    f"of parallel vectors (1.0000001 in float32) and the clamp then holds it, so the backward is inf "
                    f"or NaN; the clamp must be strictly inside (-1, 1) (1 - 1e-7 in float32; 1 - 1e-3 in float16, "
                    f"where 1 - 1e-7 rounds to 1)",
                    f"{self.text(info.node.func) if info.family != 'method' else info.op}("
                    f"{self.atom(clamp.operand)}.clamp(-1 + 1e-7, 1 - 1e-7)), or atan2(|a x b|, a . b) for the angle"
                    if c else None)

    def check_log(self, info: _Call, env: Env, scope: _Scope) -> None:
        node, arg = info.node, info.operand
        assert arg is not None
        log1p = info.op == "log1p"
        inner, inner_env = self.strip(arg, env, scope)
        # log1p(-sigmoid(z)) and log(1 - sigmoid(z))
        minus_sigmoid = None
        if log1p and isinstance(inner, ast.UnaryOp) and isinstance(inner.op, ast.USub):
            minus_sigmoid = self.op(inner.operand, inner_env, scope, "sigmoid")
        if not log1p and isinstance(inner, ast.BinOp) and isinstance(inner.op, ast.Sub) and \
                self.number(inner.left, inner_env) == 1.0:
            minus_sigmoid = self.op(inner.right, inner_env, scope, "sigmoid")
        if minus_sigmoid is not None and minus_sigmoid.operand is not None:
            z = minus_sigmoid.operand
            f = self.alias_for("torch.nn.functional")
            fix = f"{f or 'F'}.logsigmoid(-{self.atom(z)})"
            direct = f is not None and (arg is inner) and minus_sigmoid.node is (
                inner.operand if log1p else inner.right) and minus_sigmoid.family in ("torch", "method")
            self.report("FS104", node,
                        f"{self.text(node)}: 1 - sigmoid(z) rounds to 0 for z above 16.6 (float32), 8.3 (float16) or "
                        f"6.2 (bfloat16), and log(0) = -inf with a NaN gradient; logsigmoid(-z) is the same function "
                        f"computed without the subtraction", fix, replace=node if direct else None)
            return
        if log1p:
            ex = self.exp_call(arg, env, scope)
            if ex is not None:
                self.report_softplus(node, ex)
            return
        # log(1 + x)
        if isinstance(inner, ast.BinOp) and isinstance(inner.op, ast.Add):
            one_left = self.number(inner.left, inner_env) == 1.0
            other = inner.right if one_left else (inner.left if self.number(inner.right, inner_env) == 1.0 else None)
            if other is not None:
                ex = self.exp_call(other, inner_env, scope)
                if ex is not None:
                    self.report_softplus(node, ex)
                    return
                if not self.is_constant(other, inner_env):
                    overflow = next((self.text(n) for n in _walk(other) if isinstance(n, ast.Call) and
                                     self.exp_call(n, inner_env, scope) is not None), None)
                    self.report_log1p(info, other, direct=arg is inner and overflow is None, overflow=overflow)
                return
            exp_a, exp_b = self.exp_call(inner.left, inner_env, scope), self.exp_call(inner.right, inner_env, scope)
            if exp_a is not None and exp_b is not None and exp_a.operand is not None and exp_b.operand is not None:
                ns = {"torch": "torch", "numpy": self.alias_for("numpy")}.get(exp_a.family) if \
                    exp_a.family == exp_b.family else None
                a, b = self.text(exp_a.operand), self.text(exp_b.operand)
                fix = f"{ns or 'torch'}.logaddexp({a}, {b})"
                direct = ns is not None and arg is inner and exp_a.node is inner.left and exp_b.node is inner.right \
                    and info.family == exp_a.family
                self.report("FS107", node,
                            f"{self.text(node)}: exp overflows to inf above 88.7 (float32) or 11.1 (float16), and "
                            f"both terms underflow to 0 below -104 (float32) giving log(0) = -inf; logaddexp is the "
                            f"same function computed with the larger term factored out", fix,
                            replace=node if direct else None)
                return
        softmax, indexed = self.softmax_of(arg, env, scope)
        if softmax is not None:
            if indexed:
                self.report_cross_entropy(info, softmax, "indexes the softmax probabilities by the labels")
                return
            self.report_log_softmax(info, softmax)
            return
        sig = self.op(arg, env, scope, "sigmoid")
        if sig is not None and sig.operand is not None:
            f = self.alias_for("torch.nn.functional")
            direct = f is not None and arg is sig.node and sig.family in ("torch", "method") and \
                info.family in ("torch", "method")
            self.report("FS103", node,
                        f"{self.text(node)}: sigmoid(z) is exactly 0 for z below -88.7 (float32) or -17.3 (float16), "
                        f"and log(0) = -inf with a NaN gradient; logsigmoid is the same function computed as "
                        f"min(z, 0) - log1p(exp(-|z|))", f"{f or 'F'}.logsigmoid({self.text(sig.operand)})",
                        replace=node if direct else None)
            return
        total = self.op(arg, env, scope, "sum")
        if total is not None and total.operand is not None:
            terms: list[ast.expr] = [total.operand]
            if total.family == "builtin" and isinstance(total.operand, (ast.GeneratorExp, ast.ListComp)):
                terms = [total.operand.elt]
            ex = self.exp_call(terms[0], env, scope)
            if ex is not None and ex.operand is not None:
                self.report_logsumexp(info, total, ex, direct=arg is total.node and total.operand is ex.node)
                return
        prod = self.op(arg, env, scope, "prod")
        if prod is not None and prod.operand is not None and not self.is_constant(prod.operand, env):
            p = self.text(prod.operand)
            self.report("FS108", node,
                        f"{self.text(node)}: the product of probabilities underflows to 0 (150 factors of 0.5 in "
                        f"float32, 25 in float16) and log(0) = -inf; sum the logs instead (not applied by --fix: for "
                        f"negative factors the two differ)",
                        f"{self.atom(prod.operand) if prod.family == 'method' else 'torch.log(' + p + ')'}"
                        f"{'.log()' if prod.family == 'method' else ''}.sum(...)")

    def check_nll(self, info: _Call, env: Env, scope: _Scope) -> None:
        arg = info.operand
        assert arg is not None
        log = self.op(arg, env, scope, "log")
        if log is None or log.operand is None:
            return
        softmax, _ = self.softmax_of(log.operand, env, scope)
        if softmax is not None:
            self.report_cross_entropy(log, softmax, "feeds log(softmax) to nll_loss")

    def softmax_library(self, softmax: _Call) -> str:
        """``torch``, ``numpy`` (numpy, scipy, cupy) or ``jax``: which library a softmax's rewrite is spelled in."""
        family = softmax.library if softmax.family == "manual" else softmax.family
        return {"numpy": "numpy", "scipy": "numpy", "jax": "jax"}.get(family, "torch")

    def softmax_dim(self, softmax: _Call) -> str | None:
        """The softmax's dim as written: its ``dim``/``axis`` argument, nn.Softmax's, or the dim of the sum a
        hand-written one divides by; None when the code does not show it."""
        if softmax.family == "module":
            ctor = softmax.source
            if ctor is None:
                return None
            for k in ctor.keywords:
                if k.arg == "dim":
                    return self.text(k.value)
            return self.text(ctor.args[0]) if ctor.args else None
        if softmax.family == "manual":
            total = self.call(softmax.source, {}, _Scope(env={})) if softmax.source is not None else None
            return self.dim_of(total) if total is not None else None
        for k in softmax.node.keywords:
            if k.arg in ("dim", "axis"):
                return self.text(k.value)
        pos = softmax.node.args[(0 if softmax.family == "method" else 1):]
        return self.text(pos[0]) if pos and not isinstance(pos[0], ast.Starred) else None

    def report_cross_entropy(self, log: _Call, softmax: _Call, how: str) -> None:
        z = self.text(softmax.operand) if softmax.operand is not None else "logits"
        f = self.alias_for("torch.nn.functional") or "F"
        fix, fixable = self.log_softmax_fix(log, softmax)
        if self.softmax_library(softmax) == "torch":
            stable = f"{f}.cross_entropy({z}, target) takes the logits and computes log_softmax inside"
            if not fixable:
                fix = f"{f}.cross_entropy({z}, target)"
        else:  # numpy has no fused loss: pick the log-probabilities from log_softmax
            stable = f"{fix} computes the log-probabilities stably; pick the targets' entries from it"
            fix = f"{fix}, indexed by the targets"
        self.report("FS102", log.node,
                    f"{self.text(log.node)} {how}: a probability underflows to 0 once a logit trails the largest by "
                    f"more than 104 (float32), 92.8 (bfloat16) or 17.3 (float16), so one confident wrong prediction "
                    f"makes the loss inf and every gradient NaN; {stable}", fix,
                    replace=log.node if fixable else None, claims=("FS101",))

    def report_entropy(self, log: _Call, softmax: _Call, p: ast.expr, product: ast.BinOp) -> None:
        """p * log(p) with the same softmax p on both sides: an entropy, not a cross-entropy with targets."""
        z = self.text(softmax.operand) if softmax.operand is not None else "logits"
        log_p, _ = self.log_softmax_fix(log, softmax)
        library = self.softmax_library(softmax)
        if library == "torch":
            fix = f"{self.atom(p)} * {log_p} in place of {self.text(log.node)}, or " \
                  f"torch.distributions.Categorical(logits={z}).entropy()"
        else:
            fix = f"{self.atom(p)} * {log_p} in place of {self.text(log.node)}"
        self.report("FS101", log.node,
                    f"{self.text(product)} is the entropy of the softmax {self.text(p)}: a probability underflows to 0 "
                    f"once a logit trails the largest by more than 104 (float32), 92.8 (bfloat16) or 17.3 (float16), "
                    f"and then p * log(p) is 0 * -inf = NaN (its limit is 0) with a NaN gradient; take log p from "
                    f"log_softmax, where it stays finite", fix)

    def log_softmax_fix(self, info: _Call, softmax: _Call) -> tuple[str, bool]:
        """The log_softmax spelling of log(softmax(...)), and whether it replaces the log call exactly."""
        params = ", ".join([self.text(a) for a in softmax.node.args] + [self.text(k) for k in softmax.node.keywords])
        func = softmax.node.func
        direct = info.operand is softmax.node
        fixable = direct and info.family in ("torch", "method") and softmax.family in ("torch", "method")
        if softmax.family == "method" and isinstance(func, ast.Attribute):
            return f"{self.atom(func.value)}.log_softmax({params})", fixable
        if softmax.family in ("torch", "scipy", "jax") and isinstance(func, ast.Attribute):
            return f"{self.text(func.value)}.log_softmax({params})", fixable  # scipy.special, jax.nn: same signature
        z = self.text(softmax.operand) if softmax.operand is not None else "z"
        dim = self.softmax_dim(softmax)
        library = self.softmax_library(softmax)
        if library == "numpy":
            return f"scipy.special.log_softmax({z}, axis={dim or 'None'})", False
        if library == "jax":
            return f"jax.nn.log_softmax({z}, axis={dim or 'None'})", False
        return f"{self.alias_for('torch.nn.functional') or 'F'}.log_softmax({z}, dim={dim or '...'})", False

    def report_log_softmax(self, info: _Call, softmax: _Call) -> None:
        fix, fixable = self.log_softmax_fix(info, softmax)
        node = info.node
        self.report("FS101", node,
                    f"{self.text(node)}: a probability underflows to 0 once a logit trails the largest by more than "
                    f"104 (float32), 92.8 (bfloat16) or 17.3 (float16), and log(0) = -inf with a NaN gradient; "
                    f"log_softmax is the same function computed as z - logsumexp(z)", fix,
                    replace=node if fixable else None)

    def report_log1p(self, info: _Call, x: ast.expr, *, direct: bool, overflow: str | None = None) -> None:
        node = info.node
        func = node.func
        fix: str
        fixable = False
        if info.family == "method":
            fix, fixable = f"{self.atom(x)}.log1p()", direct
        elif info.family in ("torch", "numpy", "math", "jax") and isinstance(func, ast.Attribute):
            fix, fixable = f"{self.text(func.value)}.log1p({self.text(x)})", direct
        else:
            fix = f"log1p({self.text(x)})"
        tail = ""
        if overflow is not None:  # log1p(2 * exp(z)) keeps the overflow: not a fix to apply blindly
            tail = (f"; {overflow} inside overflows to inf above 88.7 (float32) or 11.1 (float16), which log1p keeps "
                    f"(not applied by --fix: write it as a softplus or logaddexp)")
        self.report("FS110", node,
                    f"{self.text(node)}: 1 + x rounds to 1 for |x| below 6e-8 (float32), 4.9e-4 (float16) or 3.9e-3 "
                    f"(bfloat16), so the result is 0 instead of about x; log1p is the same function without the "
                    f"rounding{tail}", fix, replace=node if fixable else None)

    def report_softplus(self, node: ast.Call, ex: _Call) -> None:
        x = self.text(ex.operand) if ex.operand is not None else "x"
        f = self.alias_for("torch.nn.functional") or "F"
        if ex.family == "numpy":
            fix = f"{self.alias_for('numpy') or 'np'}.logaddexp(0, {x})"
        elif ex.family == "math":
            fix = f"max({x}, 0) + math.log1p(math.exp(-abs({x})))"
        elif ex.family == "jax":
            fix = f"jax.nn.softplus({x})"
        else:
            fix = f"{f}.softplus({x})" + (f", or torch.logaddexp({x}, torch.zeros_like({x}))"
                                          if isinstance(ex.operand, ast.Name) else "")
        self.report("FS116", node,
                    f"{self.text(node)}: exp({x}) overflows to inf above 88.7 (float32) or 11.1 (float16), so the "
                    f"result is inf where it should be about {x}; softplus computes it stably (not applied by --fix: "
                    f"softplus returns x itself above its threshold of 20)", fix, claims=("FS110",))

    def report_logsumexp(self, info: _Call, total: _Call, ex: _Call, *, direct: bool) -> None:
        assert ex.operand is not None
        x = self.text(ex.operand)
        dims = total.node.args[(0 if total.family == "method" else 1):]
        kw = [k for k in total.node.keywords if k.arg in ("dim", "keepdim", "axis", "keepdims")]
        params = ", ".join([self.text(d) for d in dims] + [self.text(k) for k in kw])
        has_dim = bool(dims) or any(k.arg in ("dim", "axis") for k in kw)
        if total.family in ("numpy", "math", "builtin") or ex.family in ("numpy", "math"):
            fix, fixable = f"scipy.special.logsumexp({x}{', ' + params if params else ''})", False
        else:
            fix = f"torch.logsumexp({x}, {params})" if has_dim else f"torch.logsumexp({x}, dim=...)"
            fixable = direct and has_dim and self.alias_for("torch") == "torch" and \
                all(k.arg in ("dim", "keepdim", None) for k in total.node.keywords) and \
                info.family in ("torch", "method") and len(dims) <= 2
        self.report("FS107", info.node,
                    f"{self.text(info.node)}: exp({x}) overflows to inf above 88.7 (float32, bfloat16) or 11.1 "
                    f"(float16), and when every term underflows (below -104 in float32) the sum is 0 and log(0) = "
                    f"-inf; logsumexp is the same function computed as m + log(sum(exp(x - m))) with m = max(x)",
                    fix, replace=info.node if fixable else None, claims=())

    def report_rsqrt(self, at: ast.expr, var: ast.expr) -> None:
        v = self.text(var)
        self.report("FS114", at,
                    f"{self.text(at)}: {v} (a variance or mean square) is 0 for a constant feature (a padded row, a dead channel) "
                    f"and flushes to 0 below 6e-8 in float16; 1 / sqrt(0) = inf, and normalising then gives "
                    f"0 * inf = NaN", f"torch.rsqrt({v} + 1e-5)", claims=("FS113",))

    def check_sqrt(self, arg: ast.expr, node: ast.expr, env: Env, scope: _Scope) -> None:
        inner, inner_env = self.strip(arg, env, scope)
        if self.is_constant(inner, inner_env):
            return
        squared = self.square_of(inner, inner_env, scope)
        desc = None
        if squared is not None:
            desc = f"sqrt of a square ({self.text(inner)})"
            fix = f"{self.atom(squared)}.abs()"
        else:
            reduced = self.op(inner, inner_env, scope, "sum", "mean", strip=False)
            if reduced is not None and reduced.family != "builtin" and reduced.operand is not None:
                x = self.square_of(reduced.operand, inner_env, scope)
                if x is not None:
                    desc = f"sqrt of the squared distance {self.text(inner)}"
                    dims = reduced.node.args[(0 if reduced.family == "method" else 1):][:1]
                    dim = [self.text(d) for d in dims] + [self.text(k) for k in reduced.node.keywords]
                    fix = f"torch.linalg.vector_norm({self.text(x)}{', ' + ', '.join(dim) if dim else ''})" \
                        if reduced.op == "sum" else f"torch.sqrt({self.text(inner)} + 1e-12)"
            elif isinstance(inner, ast.BinOp) and isinstance(inner.op, ast.Add) and \
                    self.square_of(inner.left, inner_env, scope) is not None and \
                    self.square_of(inner.right, inner_env, scope) is not None:
                desc = f"sqrt of the sum of squares {self.text(inner)}"
                fix = f"torch.sqrt({self.text(inner)} + 1e-12), or torch.hypot"
        if desc is None:
            return
        self.report("FS113", node,
                    f"{self.text(node)}: {desc}; the gradient 1 / (2 sqrt(d)) is infinite where d = 0 (two identical "
                    f"points, a zero vector), and the backward then gives 0 * inf = NaN although the forward is fine",
                    fix)

    def check_binop(self, node: ast.BinOp, env: Env, scope: _Scope, *, augmented: bool = False) -> None:
        op = node.op
        if isinstance(op, ast.Mult):
            for side, other in ((node.left, node.right), (node.right, node.left)):
                while isinstance(side, ast.UnaryOp) and isinstance(side.op, ast.USub):
                    side = side.operand
                while isinstance(other, ast.UnaryOp) and isinstance(other.op, ast.USub):
                    other = other.operand
                log = self.op(side, env, scope, "log", strip=False)
                if log is not None and log.operand is not None and log.family != "builtin":
                    softmax, indexed = self.softmax_of(log.operand, env, scope)
                    if softmax is not None:
                        partner, partner_indexed = self.softmax_of(other, env, scope)
                        if partner is not None and partner.node is softmax.node and not indexed and \
                                not partner_indexed:
                            self.report_entropy(log, softmax, other, node)  # p * log(p): the same p
                        else:
                            self.report_cross_entropy(log, softmax, "is multiplied by the targets")
        if isinstance(op, ast.Div):
            self.check_division(node.left, node.right, node, env, scope, augmented=augmented)
        elif isinstance(op, ast.Sub):
            naive = self.naive_variance(node, env, scope)
            if naive is not None:
                self.report_variance(node, *naive)
                return
            left_exp = self.op(node.left, env, scope, "exp", strip=False)
            if left_exp is not None and self.number(node.right, env) == 1.0 and left_exp.operand is not None and \
                    not self.is_constant(left_exp.operand, env):
                self.report_expm1(node, left_exp, negate=False)
            right_exp = self.op(node.right, env, scope, "exp", strip=False)
            if right_exp is not None and self.number(node.left, env) == 1.0 and right_exp.operand is not None and \
                    not self.is_constant(right_exp.operand, env):
                self.report_expm1(node, right_exp, negate=True)
        elif isinstance(op, ast.Pow):
            exponent = self.number(node.right, env)
            if exponent == 0.5:
                self.check_sqrt(node.left, node, env, scope)
            elif exponent == -0.5 and self.is_variance(node.left, env, scope):
                self.report_rsqrt(node, node.left)
        if isinstance(op, (ast.Add, ast.Sub)):
            for value, other in ((node.right, node.left), (node.left, node.right)):
                self.check_epsilon(value, other, env, scope, node)
        if isinstance(op, (ast.Mult, ast.Add, ast.Sub)):
            for value, other in ((node.right, node.left), (node.left, node.right)):
                self.check_literal(value, other, env, scope, node, mask=False)

    def report_expm1(self, node: ast.BinOp, ex: _Call, *, negate: bool) -> None:
        assert ex.operand is not None
        func = ex.node.func
        x = self.text(ex.operand)
        plain = not ex.node.keywords and len(ex.node.args) == (0 if ex.family == "method" else 1)  # no out=
        if ex.family == "method":
            call, fixable = f"{self.atom(ex.operand)}.expm1()", plain
        elif ex.family in ("torch", "numpy", "math", "jax") and isinstance(func, ast.Attribute):
            call, fixable = f"{self.text(func.value)}.expm1({x})", plain
        else:
            call, fixable = f"expm1({x})", False
        fix = f"-{call}" if negate else call
        self.report("FS111", node,
                    f"{self.text(node)}: exp(x) rounds to 1 for |x| below 6e-8 (float32) or 4.9e-4 (float16), so "
                    f"the result is 0 instead of about {'-' if negate else ''}x (the relative error is eps / |x|); "
                    f"expm1 is the same function without the cancellation", fix, replace=node if fixable else None)

    def report_variance(self, node: ast.BinOp, x: ast.expr, sq_mean: _Call | None, mean: _Call | None) -> None:
        fix, fixable = f"{self.atom(x)}.var(dim, correction=0)", False
        if sq_mean is not None and mean is not None and sq_mean.family == mean.family and \
                sq_mean.node is self.resolve(node.left, {})[0] and self._same_reduction(sq_mean, mean):
            params = self._reduction_params(mean)
            family = mean.family
            if family == "method":
                family = "torch" if self.imports_torch and not self.imports_numpy else (
                    "numpy" if self.imports_numpy and not self.imports_torch else "")
                corr = ", correction=0" if family == "torch" else ""
                fix = f"{self.atom(x)}.var({params}{corr})".replace("(, ", "(")
                fixable = bool(family) and self._mean_is_direct(node, mean)
                if not family:
                    fix = (f"{self.atom(x)}.var({params}, correction=0) for a tensor, {self.atom(x)}.var({params}) "
                           f"for an array").replace("(, ", "(")
            elif family in ("torch", "numpy") and isinstance(mean.node.func, ast.Attribute):
                ns = self.text(mean.node.func.value)
                corr = ", correction=0" if family == "torch" else ""
                fix = f"{ns}.var({self.text(x)}{', ' + params if params else ''}{corr})"
                fixable = self._mean_is_direct(node, mean)
        self.report("FS109", node,
                    f"{self.text(node)}: the variance as mean of squares minus squared mean cancels catastrophically: "
                    f"the relative error is about eps * mean**2 / var (float32 eps 1.2e-7), so data with mean 1e4 and "
                    f"std 1 loses every digit, and the result can be negative (sqrt of it is NaN); a two-pass "
                    f"variance computes E[(x - mean)**2]", fix, replace=node if fixable else None)

    def _mean_is_direct(self, node: ast.BinOp, mean: _Call) -> bool:
        right = node.right
        if isinstance(right, ast.BinOp):
            return right.left is mean.node
        if isinstance(right, ast.Call) and right.args:
            return right.args[0] is mean.node or (isinstance(right.func, ast.Attribute) and
                                                  right.func.value is mean.node)
        return False

    def _reduction_params(self, call: _Call) -> str:
        args = call.node.args[(0 if call.family == "method" else 1):]
        return ", ".join([self.text(a) for a in args] + [self.text(k) for k in call.node.keywords])

    def _same_reduction(self, a: _Call, b: _Call) -> bool:
        allowed = {"dim", "keepdim", "axis", "keepdims"}
        for c in (a, b):
            if len(c.node.args) > (1 if c.family == "method" else 2) or any(k.arg not in allowed for k in c.node.keywords):
                return False
        return self._reduction_params(a) == self._reduction_params(b)

    def check_division(self, num: ast.expr, den: ast.expr, node: ast.expr, env: Env, scope: _Scope, *,
                       augmented: bool = False) -> None:
        # exp(x) / exp(x).sum(): report at the exp, where the overflow happens.
        total = self.op(den, env, scope, "sum")
        ex = self.exp_call(num, env, scope)
        if total is not None and ex is not None and total.operand is not None and \
                self.op(total.operand, env, scope, "exp") is not None:
            self.report_softmax(ex, num, den, node, env, scope)
            return
        if ex is not None or self.op(num, env, scope, "exp") is not None:
            return  # a max-subtracted exp sums to at least 1
        # 1 / sqrt(var), x / sqrt(var)
        root = self.op(den, env, scope, "sqrt")
        if root is None:
            stripped, stripped_env = self.strip(den, env, scope)
            if isinstance(stripped, ast.BinOp) and isinstance(stripped.op, ast.Pow) and \
                    self.number(stripped.right, stripped_env) == 0.5 and self.is_variance(stripped.left, stripped_env,
                                                                                           scope):
                self.report_rsqrt(stripped, stripped.left)
                return
        if root is not None and root.operand is not None:
            _, root_env = self.strip(den, env, scope)
            if self.is_variance(root.operand, root_env, scope):
                self.report_rsqrt(root.node, root.operand)
                return
        kind = self.is_norm_like(den, env, scope)
        if kind is None or ast.dump(den) in scope.guarded:  # if n == 0: return, earlier in the function
            return
        if self.is_constant(num, env) and not isinstance(num, ast.Constant):
            return
        d = self.text(den)
        n = self.text(num)
        torchy = self.imports_torch or not self.imports_numpy
        stripped, stripped_env = self.strip(den, env, scope)
        product = isinstance(stripped, ast.BinOp)
        if kind == "norm" and not product:
            norm = self.op(den, env, scope, "norm")
            dim = ""
            if norm is not None:
                given = self.dim_of(norm)
                dim = f", dim={given}" if given and given != "None" else ""
            guard = (f"{self.alias_for('torch.nn.functional') or 'F'}.normalize({n}{dim}), or {n} / "
                     f"{self.atom(den)}.clamp_min(1e-12)") if torchy else f"{n} / np.maximum({d}, 1e-12)"
            why = "an all-zero row (padding, a dead feature) has norm 0"
        elif kind == "norm":
            guard = f"{n} / {self.atom(den)}.clamp_min(1e-12)" if torchy else f"{n} / np.maximum({d}, 1e-12)"
            if self.is_cosine(node, env, scope) and torchy:
                guard += f", or {self.alias_for('torch.nn.functional') or 'F'}.cosine_similarity(a, b, dim)"
            why = "an all-zero row (padding, a dead feature) has norm 0"
        elif kind == "std":
            guard = f"{n} / ({d} + 1e-5)"
            why = "a constant row or feature has std 0 (a single sample gives NaN std with the unbiased default)"
        else:
            guard = f"{n} / {self.atom(den)}.clamp_min(1e-12)" if torchy else f"{n} / np.maximum({d}, 1e-12)"
            why = "an all-zero row or an empty mask sums to 0"
        # x / x.norm(), (x - m) / x.std(): the numerator is 0 too, 0 / 0 = NaN; total / n: x / 0 = inf as well.
        operand = self.norm_operand(stripped, stripped_env, scope)
        num_node, num_env = self.strip(num, env, scope)
        if isinstance(num_node, ast.BinOp) and isinstance(num_node.op, ast.Sub):
            num_node, num_env = self.strip(num_node.left, num_env, scope)
        same = operand is not None and self.same_tensor(num_node, num_env, operand[0], operand[1], scope)
        result = "0 / 0 = NaN" if same else "0 / 0 = NaN (or x / 0 = inf)"
        self.report("FS112", den if not augmented else node,
                    f"division by {kind} {d} with no epsilon: {why}, and {result} in the forward and the backward",
                    guard)

    def norm_operand(self, node: ast.expr, env: Env, scope: _Scope) -> tuple[ast.expr, Env] | None:
        """The tensor a norm-like denominator is taken of (x for x.norm(dim)), or None for a product or a name."""
        info = self.call(node, env, scope)
        if info is not None and info.operand is not None and info.op in ("norm", "std", "sum", "nansum"):
            return info.operand, env
        return None

    def dim_of(self, call: _Call) -> str | None:
        """The source text of a reduction's dim (``dim=``, ``axis=`` or the first positional after the input)."""
        for k in call.node.keywords:
            if k.arg in ("dim", "axis"):
                return self.text(k.value)
        pos = call.node.args[(0 if call.family == "method" else 1):]
        if pos and not isinstance(pos[0], ast.Starred):
            if call.op == "norm" and call.family != "method" and len(pos) >= 2:
                return self.text(pos[1])  # torch.norm(x, p, dim)
            if call.op != "norm":
                return self.text(pos[0])
            return self.text(pos[1]) if len(pos) >= 2 else None  # x.norm(p, dim)
        return None

    def dim_node(self, call: _Call) -> ast.expr | None:
        """A reduction's dim argument (``dim=``, ``axis=`` or the first positional after the input), or None."""
        for k in call.node.keywords:
            if k.arg in ("dim", "axis"):
                return k.value
        pos = call.node.args[(0 if call.family == "method" else 1):]
        return pos[0] if pos and not isinstance(pos[0], ast.Starred) else None

    def int_dim(self, node: ast.expr | None, env: Env) -> bool:
        """A single dim: an int literal (``-1``) or a name not bound to a tuple or list. ``(0, 1)`` is not one."""
        if node is None:
            return False
        value = self.number(node, env)
        if value is not None:
            return value == int(value) and not (isinstance(node, ast.Constant) and isinstance(node.value, float))
        if isinstance(node, ast.Name):
            bound = env.get(node.id)
            return bound is None or self.int_dim(bound[0], bound[1])
        return False

    def report_softmax(self, ex: _Call, num: ast.expr, den: ast.expr, division: ast.expr, env: Env,
                       scope: _Scope) -> None:
        assert ex.operand is not None
        x = self.text(ex.operand)
        total = self.op(den, env, scope, "sum")
        dim = self.dim_of(total) if total is not None else None
        library = "numpy" if ex.family in ("numpy", "scipy") or (total is not None and total.family == "numpy") \
            else ex.family
        if library == "numpy":
            axis = f"axis={dim}" if dim else "axis=None"
            fix = (f"scipy.special.softmax({x}, {axis}), or e = np.exp({x} - {self.atom(ex.operand)}.max({axis}, "
                   f"keepdims=True)); e / e.sum({axis}, keepdims=True)")
        elif library == "jax":
            fix = f"jax.nn.softmax({x}, axis={dim or 'None'})"
        elif dim is not None and total is not None and not self.int_dim(self.dim_node(total), env):
            # softmax takes one dim: for several, subtract the max over them
            fix = (f"e = torch.exp({x} - {self.atom(ex.operand)}.amax(dim={dim}, keepdim=True)); "
                   f"e / e.sum(dim={dim}, keepdim=True)")
        else:
            fix = f"torch.softmax({x}, dim={dim or '...'})"
        fixable = False
        direct = self.call(den, {}, _Scope(env={})) if isinstance(den, ast.Call) else None
        if direct is not None and direct.op == "sum" and ex.node is num and direct.operand is not None and \
                ex.family == "torch" and self.alias_for("torch") == "torch" and not ex.node.keywords:
            inner = self.call(direct.operand, {}, _Scope(env={}))
            kws = {k.arg: k.value for k in direct.node.keywords}
            pos = direct.node.args[(0 if direct.family == "method" else 1):]
            given = kws.get("dim", pos[0] if pos else None)
            keep = kws.get("keepdim", pos[1] if len(pos) > 1 else None)
            # softmax takes one int dim: sum((0, 1), keepdim=True) stays a suggestion (softmax would raise)
            if inner is not None and inner.op == "exp" and inner.operand is not None and not inner.node.keywords \
                    and ast.dump(inner.operand) == ast.dump(ex.operand) and self.int_dim(given, env) and \
                    isinstance(keep, ast.Constant) and keep.value is True and set(kws) <= {"dim", "keepdim"} and \
                    len(pos) <= 2 and given is not None:
                fix, fixable = f"torch.softmax({x}, dim={self.text(given)})", True
        line = f" (normalised at line {division.lineno})" if division.lineno != ex.node.lineno else ""
        self.report("FS106", ex.node,
                    f"{self.text(ex.node)} normalised by its sum{line} with no max subtracted: exp overflows to inf "
                    f"above 88.7 (float32, bfloat16) or 11.1 (float16), and inf / inf = NaN; softmax subtracts the "
                    f"row max first", fix, replace=division if fixable else None)

    def check_epsilon(self, value: ast.expr, other: ast.expr, env: Env, scope: _Scope, at: ast.expr) -> None:
        eps = self.number(value, env)
        if eps is None or eps == 0.0 or self.is_constant(other, env):
            return
        dtype = self.dtype(other, env, scope)
        if dtype not in _LIMITS or abs(eps) > _LIMITS[dtype][1]:
            return
        self.report("FS201", value,
                    f"the epsilon {self.text(value)} rounds to 0 in {dtype} ({self.text(other)} is {dtype} here; its "
                    f"smallest subnormal is {'6e-08' if dtype == 'float16' else '9.2e-41'}), so it guards nothing: "
                    f"a division or log it protects still sees 0",
                    "an epsilon the dtype holds (1e-4 or more in float16 near 1) or compute this op in float32 "
                    f"({self.atom(other)}.float())")

    def check_literal(self, value: ast.expr, other: ast.expr | None, env: Env, scope: _Scope, at: ast.expr, *,
                      mask: bool) -> None:
        number = self.number(value, env)
        if number is None or other is None or self.is_constant(other, env):
            return
        dtype = self.dtype(other, env, scope)
        if dtype not in _LIMITS or abs(number) <= _LIMITS[dtype][0] or not math.isfinite(number):
            return  # float("-inf") is in every float dtype
        if mask:
            self.report("FS203", value,
                        f"the mask value {self.text(value)} is beyond {dtype}'s range (max {_LIMITS[dtype][0]:g}; "
                        f"{self.text(other)} is {dtype} here): eager PyTorch refuses it, exported and compiled graphs "
                        f"store -inf, and a row with every position masked then gives softmax = NaN",
                        f"masked_fill({self.text(at.args[0]) if isinstance(at, ast.Call) else 'mask'}, "
                        f"torch.finfo({self.atom(other)}.dtype).min)")
        else:
            self.report("FS204", value,
                        f"the literal {self.text(value)} overflows {dtype} (max {_LIMITS[dtype][0]:g}; "
                        f"{self.text(other)} is {dtype} here) and becomes inf; inf * 0 and inf - inf are NaN "
                        f"downstream", "compute this op in float32, or use a constant the dtype holds "
                        "(torch.finfo(dtype).max)")

    def check_optimizer(self, node: ast.Call, env: Env, scope: _Scope) -> None:
        q = self.qual(node.func) or ""
        name = q.rsplit(".", 1)[-1]
        if not q.startswith("torch.optim.") or name not in _OPTIMIZER_EPS or not node.args:
            return
        params = self.call(node.args[0], env, scope)
        if params is None or params.op not in ("parameters", "named_parameters") or params.operand is None:
            return
        dtype = self.dtype(params.operand, env, scope)
        if dtype != "float16":
            return
        eps_kw = [k.value for k in node.keywords if k.arg == "eps"]
        eps = self.number(eps_kw[0], env) if eps_kw else _OPTIMIZER_EPS[name]
        if eps is None or eps > _LIMITS["float16"][1]:
            return
        self.report("FS202", node,
                    f"{name} with eps={eps:g} on float16 parameters ({self.text(params.operand)} is float16 here): "
                    f"the update divides by sqrt(exp_avg_sq) + eps in float16, where {eps:g} rounds to 0 (smallest "
                    f"subnormal 6e-08) and exp_avg_sq = 0.001 * grad**2 underflows for gradients below 5.5e-3, so the step is m / 0",
                    "keep float32 master weights (train in float32 under torch.autocast with a GradScaler), or "
                    "eps=1e-4 for pure float16 parameters")


def _new_axes_only(index: ast.expr) -> bool:
    """An index that selects every element and only adds axes: ``[:, None]``, ``[..., None]``, ``[None]``."""
    parts = index.elts if isinstance(index, ast.Tuple) else [index]
    for part in parts:
        if isinstance(part, ast.Constant) and (part.value is None or part.value is Ellipsis):
            continue
        if isinstance(part, ast.Slice) and part.lower is None and part.upper is None and part.step is None:
            continue
        return False
    return True


def _walk(root: ast.expr, stop: type | None = None) -> Iterator[ast.AST]:
    """Every node of an expression, outermost first; below a ``stop`` node nothing (its caller walks it)."""
    todo: list[ast.AST] = [root]
    while todo:
        node = todo.pop(0)
        yield node
        if stop is None or not isinstance(node, stop):
            todo[:0] = list(ast.iter_child_nodes(node))


def _comment_positions(source: str) -> list[tuple[int, int]]:
    import io
    import tokenize

    try:
        return [tok.start for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT]
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return []


def _strip_comments(segment: str) -> str:
    """Source text with its comments removed (the code in a message, or in a suggested rewrite)."""
    lines = segment.splitlines(keepends=True)
    cuts = _comment_positions(segment)
    if not cuts:
        return segment
    for line, col in cuts:
        text = lines[line - 1]
        end = len(text) - len(text.rstrip("\r\n"))
        lines[line - 1] = text[:col].rstrip() + text[len(text) - end:]
    return "".join(lines)


def ignored_codes(source: str) -> dict[int, set[str] | None]:
    """``# floatscope: ignore[FS101,FS110]`` per line; None means every rule."""
    import io
    import tokenize

    out: dict[int, set[str] | None] = {}
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return out
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            match = _IGNORE.search(tok.string)
            if match:
                line = tok.start[0]
                codes = match.group(1)
                if codes is None:
                    out[line] = None
                elif out.get(line, set()) is not None:
                    out.setdefault(line, set()).update(c.strip().upper() for c in codes.split(",") if c.strip())
    return out


def analyze_source(source: str, filename: str) -> list[Finding]:
    """Every source finding in one file, before selection and ignore comments. A syntax error is an FS001."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        line = exc.lineno or 1
        col = exc.offset or 1
        return [Finding("FS001", filename, line, col, "error",
                        f"syntax error: {exc.msg}; the file was not checked", None, False)]
    except ValueError as exc:  # null bytes
        return [Finding("FS001", filename, 1, 1, "error", f"cannot parse: {exc}; the file was not checked", None,
                        False)]
    analyzer = _Analyzer(source, filename)
    try:
        analyzer.run(tree)
    except Exception as exc:  # outside any statement (imports): report it, keep what was found
        analyzer.internal_error(tree.body[0] if tree.body else tree, exc)
    return analyzer.results()

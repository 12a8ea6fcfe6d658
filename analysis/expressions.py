"""The expression language of analysis files: parsed, checked against an allowlist, interpreted.

Definitions, Filters, Weights, region and cut Variables are small expressions over columns,
written in Python syntax (as in coffea and RDataFrame). An analysis file is data that travels
between people, so an expression is never handed to ``eval``: it is parsed with :mod:`ast`,
every node is checked against the grammar below (at validation, before any file is opened), and
the checked tree is interpreted node by node over the columns. Nothing outside the function table
can be reached: no builtins, modules, attributes of Python objects, files or pickles.

Grammar (anything else is refused, naming the expression's YAML path and the offending piece)::

    expr      := NAME                       a branch or an earlier Definition
               | NUMBER | True | False
               | expr BINOP expr            + - * / // % ** & | ^
               | UNARYOP expr               - + ~ not
               | expr and expr | expr or expr     elementwise, as & and |
               | expr CMP expr [CMP expr ...]     == != < <= > >= (chains joined with &)
               | expr[index]                index := int | slice | None | ... | 'field'
                                                   | expr (mask or integer array) | index, ...
               | expr.FIELD                 a record field: vector's (pt, eta, phi, mass, px,
                                            py, pz, E, ...), a key of a dict literal or a name
                                            in a fields=[...] list in one of the analysis's
                                            expressions (ak.zip, ak.combinations)
               | expr.METHOD(expr, ...)     vector's deltaR, deltaR2, deltaphi, deltaeta, dot...
               | FUNCTION(arg, ..., key=arg)      FUNCTION from the table below
               | np.pi | np.e | np.inf | np.nan
    arg       := expr | None                  (and, first argument of a zip, cartesian,
               | [expr, ...] | {'key': expr, ...}   concatenate or stack, a list or dict of
                                                     arrays)

Strings appear only as record-field names (``x['pt']``, dict keys, ``fields=[...]``,
``with_name=``), never as operands or other arguments (so no name can be assembled from pieces
and no string array built), and never contain ``__``. Lists and dicts are only the first
argument of ``ak.zip``, ``vector.zip``, ``ak.cartesian``, ``ak.argcartesian``,
``ak.concatenate`` and ``np.stack``. Each function takes at most
its listed number of positional arguments (a ufunc its inputs, so nothing reaches a positional
``out``, ``dtype``, ``shape`` or ``copy``) and the keyword arguments listed for it (``axis``,
``keepdims``, ``target``, ``value``...); none opens a file, maps memory, enables pickling or
writes into an array. ``numpy.``/``awkward.`` are accepted for ``np.``/``ak.``. Integer
literals fit in 64 bits; an expression has at most 10 000 characters.

Functions (:data:`FUNCTIONS`): ``abs``; numpy's elementwise functions (``np.sqrt``, ``np.exp``,
``np.log``, ``np.sin``... ``np.maximum``, ``np.minimum``, ``np.hypot``, ``np.arctan2``,
``np.isfinite``...), ``np.where``, ``np.clip``, ``np.round``, ``np.nan_to_num``,
``np.stack`` (``np.stack([px1, px2], axis=1)``: the flat columns of two objects as one list per
event) and the reductions
``np.sum/prod/mean/std/var/min/max/any/all/argmin/argmax/count_nonzero``; awkward's
``ak.num/count/count_nonzero/sum/prod/mean/std/var/min/max/any/all/argmin/argmax/argsort/sort/
firsts/singletons/pad_none/fill_none/is_none/drop_none/flatten/local_index/combinations/
argcombinations/cartesian/argcartesian/zip/where/concatenate/mask/nan_to_num/ones_like/
zeros_like``; and ``vector.zip``.

Values are checked while interpreting too: only numbers and booleans flow between nodes
(Python, numpy or awkward, vector's records included; no strings, objects, or integers beyond
64 bits), so no function or module object can ever be reached through a value and no
big-number arithmetic can hang. Memory is bounded: no value may hold more than
:data:`MAX_ELEMENTS` numbers; ``ak.pad_none``, ``ak.combinations`` and ``ak.cartesian`` check
the size of their result before they build it (so do ``ak.concatenate`` and ``np.stack``),
``x[:, None]`` on
one value per event (an events-by-events broadcast) is refused, and every regular dimension
(``keepdims=True``, ``x[:, None]``, fixed-size branches) is turned into variable-length lists,
which awkward broadcasts within each event, never NumPy-style across events or objects.
Evaluation warnings (divide by zero, invalid value) are collected and returned, for the caller
to fold into its one-line error message.

Reference: Python's :mod:`ast` grammar; the approach is that of ``numexpr``'s and RDataFrame's
restricted expression languages, not of name filtering around ``eval`` (which cannot be made safe).
"""

from __future__ import annotations

import ast
import math
import operator
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn, cast

import awkward as ak
import numpy as np
import scipy.special
import vector

from analysis.errors import ConfigError

__all__ = [
    "CONSTANTS",
    "FUNCTIONS",
    "METHODS",
    "MODULES",
    "VECTOR_FIELDS",
    "Expression",
    "ExpressionError",
    "definition_order",
    "evaluate",
    "parse",
    "record_fields",
]

#: the module names an expression may start a function reference with, and their canonical name
MODULES = {"np": "np", "numpy": "np", "ak": "ak", "awkward": "ak", "vector": "vector"}

#: vector's properties of momentum records, readable as ``value.FIELD``
VECTOR_FIELDS = frozenset(
    """x y z t px py pz E e energy E2 e2 energy2 rho rho2 pt pt2 phi theta eta pseudorapidity
    costheta cottheta mag mag2 p p2 tau tau2 mass mass2 M M2 m m2 Et et Et2 et2
    transverse_energy transverse_energy2 Mt mt Mt2 mt2 transverse_mass transverse_mass2
    rapidity beta gamma""".split()
)

#: vector's methods of momentum records, callable as ``value.METHOD(other)``
METHODS = frozenset(
    "deltaR deltaR2 deltaphi deltaeta deltaRapidityPhi deltaRapidityPhi2 deltaangle dot".split()
)

#: named constants
CONSTANTS: dict[str, float] = {
    "np.pi": math.pi,
    "np.e": math.e,
    "np.inf": math.inf,
    "np.nan": math.nan,
}

#: most numbers one value may hold (2**27 float64 = 1 GiB): the chunks read hold a few million
#: values per branch, so only a memory bomb (an events x events broadcast, a huge pad or a
#: combinatorial explosion) comes near it; the expanding functions check it before they allocate
MAX_ELEMENTS = 2**27
_MAX_INT = 2**63  # Python integers beyond int64 are refused: no big-number arithmetic
_MAX_STRING = 128
_MAX_SOURCE = 10_000  # characters of one expression
_MAX_ZIPPED = 4  # arrays in one ak.cartesian


class ExpressionError(ValueError):
    """An expression failed while being evaluated on data (the caller adds where)."""


def _too_many(count: float, what: str) -> None:
    if count > MAX_ELEMENTS:
        raise ExpressionError(
            f"{what} would hold {count:.3g} values, more than the limit of {MAX_ELEMENTS:.3g}"
        )


def _counts(array: Any, axis: Any) -> np.ndarray:
    """Number of items per entry of ``array`` at ``axis`` (1 for a scalar axis 0)."""
    return np.asarray(ak.flatten(ak.num(array, axis=axis), axis=None), dtype=np.float64)


def _pad_none(array: Any, target: Any, axis: Any = 1, *, clip: Any = False) -> Any:
    if not isinstance(target, int) or isinstance(target, bool) or target < 0:
        raise ExpressionError(f"ak.pad_none target must be a non-negative integer, got {target!r}")
    _too_many(float(np.maximum(_counts(array, axis), target).sum()), "ak.pad_none")
    return ak.pad_none(array, target, axis=axis, clip=clip)


def _combinations(function: Callable[..., Any]) -> Callable[..., Any]:
    def call(array: Any, n: Any, **kwargs: Any) -> Any:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ExpressionError(f"n must be a positive integer, got {n!r}")
        k = _counts(array, kwargs.get("axis", 1))
        if kwargs.get("replacement", False):
            k = k + n - 1
        _too_many(float(scipy.special.comb(k, n).sum()), "ak.combinations")
        return function(array, n, **kwargs)

    return call


def _cartesian(function: Callable[..., Any]) -> Callable[..., Any]:
    def call(arrays: Any, axis: Any = 1, **kwargs: Any) -> Any:
        parts = list(arrays.values()) if isinstance(arrays, dict) else list(arrays)
        if not 1 <= len(parts) <= _MAX_ZIPPED:
            raise ExpressionError(f"ak.cartesian takes 1 to {_MAX_ZIPPED} arrays, got {len(parts)}")
        size = np.ones(1)
        for part in parts:
            size = size * _counts(part, axis)
        _too_many(float(size.sum()), "ak.cartesian")
        return function(arrays, axis, **kwargs)

    return call


def _concatenate(arrays: Any, axis: Any = 0) -> Any:
    _too_many(float(sum(getattr(a, "nbytes", 8) // 8 for a in arrays)), "ak.concatenate")
    return ak.concatenate(arrays, axis=axis)


def _stack(arrays: Any, axis: Any = 0) -> Any:
    """``np.stack``: the arrays side by side along a new axis ``axis`` (numpy's semantics, also
    for jagged arrays of equal structure): ``np.stack([px1, px2], axis=1)`` is one list
    ``[px1, px2]`` per event, a muon collection from the flat columns of two muons."""
    parts = list(arrays.values()) if isinstance(arrays, dict) else list(arrays)
    if not parts or not all(isinstance(p, ak.Array | np.ndarray) for p in parts):
        raise ExpressionError("np.stack takes a list of arrays")
    if not isinstance(axis, int) or isinstance(axis, bool) or not 0 <= axis <= parts[0].ndim:
        raise ExpressionError(
            f"np.stack axis must be an integer from 0 to {parts[0].ndim}, got {axis!r}"
        )
    _too_many(float(sum(p.nbytes // 8 for p in parts)), "np.stack")
    where = (slice(None),) * axis + (np.newaxis,)
    arrays = [p if isinstance(p, ak.Array) else ak.Array(p) for p in parts]
    return ak.concatenate([p[where] for p in arrays], axis=axis)


_REDUCE_NP = frozenset({"axis", "keepdims"})
_REDUCE_AK = frozenset({"axis", "keepdims", "mask_identity"})
_AXIS = frozenset({"axis"})
_NONE: frozenset[str] = frozenset()

_UFUNCS = """abs absolute fabs sign sqrt cbrt square reciprocal negative positive exp exp2 expm1
log log2 log10 log1p sin cos tan arcsin arccos arctan sinh cosh tanh arcsinh arccosh arctanh
floor ceil trunc rint isfinite isinf isnan logical_not deg2rad rad2deg radians degrees arctan2
hypot maximum minimum fmax fmin power mod fmod remainder copysign logical_and logical_or
logical_xor heaviside""".split()

_AK_REDUCERS = "count count_nonzero sum prod mean std var min max any all argmin argmax".split()
_NP_REDUCERS = "sum prod mean std var min max amin amax any all count_nonzero argmin argmax".split()


class Function(NamedTuple):
    """An entry of the function table: what is called, how many positional arguments it takes
    at most (so nothing reaches a positional ``out``, ``dtype``, ``copy`` or ``shape``), and the
    keyword arguments it accepts."""

    call: Callable[..., Any]
    positional: int
    keywords: frozenset[str]


#: the functions whose first argument is a list or dict of arrays (or a dict for a zip)
_CONTAINER_FUNCTIONS = frozenset(
    {"ak.concatenate", "ak.cartesian", "ak.argcartesian", "ak.zip", "vector.zip", "np.stack"}
)


def _function_table() -> dict[str, Function]:
    table = {"abs": Function(np.abs, 1, _NONE)}
    for name in _UFUNCS:
        ufunc = getattr(np, name)
        table[f"np.{name}"] = Function(ufunc, ufunc.nin, _NONE)
    for name in _NP_REDUCERS:
        table[f"np.{name}"] = Function(getattr(np, name), 2, _REDUCE_NP)
    table["np.where"] = Function(np.where, 3, _NONE)
    table["np.clip"] = Function(np.clip, 3, frozenset({"a_min", "a_max", "min", "max"}))
    table["np.round"] = Function(np.round, 2, frozenset({"decimals"}))
    table["np.nan_to_num"] = Function(np.nan_to_num, 1, frozenset({"nan", "posinf", "neginf"}))
    table["np.ones_like"] = Function(np.ones_like, 1, _NONE)
    table["np.zeros_like"] = Function(np.zeros_like, 1, _NONE)
    table["np.stack"] = Function(_stack, 2, _AXIS)
    for name in _AK_REDUCERS:
        table[f"ak.{name}"] = Function(getattr(ak, name), 2, _REDUCE_AK)
    for name in ("num", "firsts", "singletons", "is_none", "drop_none", "flatten", "local_index"):
        table[f"ak.{name}"] = Function(getattr(ak, name), 2, _AXIS)
    table["ak.argsort"] = Function(ak.argsort, 2, frozenset({"axis", "ascending", "stable"}))
    table["ak.sort"] = Function(ak.sort, 2, frozenset({"axis", "ascending", "stable"}))
    table["ak.pad_none"] = Function(_pad_none, 3, frozenset({"target", "axis", "clip"}))
    table["ak.fill_none"] = Function(ak.fill_none, 3, frozenset({"value", "axis"}))
    combine = frozenset({"n", "replacement", "axis", "fields", "nested"})
    table["ak.combinations"] = Function(_combinations(ak.combinations), 2, combine)
    table["ak.argcombinations"] = Function(_combinations(ak.argcombinations), 2, combine)
    table["ak.cartesian"] = Function(_cartesian(ak.cartesian), 2, frozenset({"axis", "nested"}))
    table["ak.argcartesian"] = Function(
        _cartesian(ak.argcartesian), 2, frozenset({"axis", "nested"})
    )
    table["ak.zip"] = Function(ak.zip, 2, frozenset({"depth_limit", "with_name"}))
    table["ak.where"] = Function(ak.where, 3, _NONE)
    table["ak.concatenate"] = Function(_concatenate, 2, _AXIS)
    table["ak.mask"] = Function(ak.mask, 2, frozenset({"valid_when"}))
    table["ak.nan_to_num"] = Function(ak.nan_to_num, 1, frozenset({"nan", "posinf", "neginf"}))
    table["ak.ones_like"] = Function(ak.ones_like, 1, _NONE)
    table["ak.zeros_like"] = Function(ak.zeros_like, 1, _NONE)
    table["vector.zip"] = Function(vector.zip, 1, _NONE)
    return table


#: dotted name -> :class:`Function`
FUNCTIONS = _function_table()

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.BitAnd: operator.and_,
    ast.BitOr: operator.or_,
    ast.BitXor: operator.xor,
}
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_SYMBOLS = {
    ast.MatMult: "@",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.In: "in",
    ast.NotIn: "not in",
}
_DESCRIBE = {
    ast.Lambda: "a lambda",
    ast.ListComp: "a list comprehension",
    ast.SetComp: "a set comprehension",
    ast.DictComp: "a dict comprehension",
    ast.GeneratorExp: "a generator expression",
    ast.JoinedStr: "an f-string",
    ast.NamedExpr: "an assignment (:=)",
    ast.IfExp: "a conditional expression (use np.where)",
    ast.Starred: "a starred argument",
    ast.Set: "a set",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}


@dataclass(frozen=True)
class Expression:
    """A checked expression: its ``source``, the column ``names`` it reads, its syntax tree."""

    source: str
    names: frozenset[str]
    tree: ast.expr = field(repr=False, compare=False)


# ----------------------------------------------------------------------------- checking
def parse(source: str, where: str, fields: Iterable[str] = ()) -> Expression:
    """Parse and check ``source``; raise :class:`ConfigError` naming ``where`` if not allowed.

    ``fields``: record-field names allowed after a dot besides :data:`VECTOR_FIELDS` (the keys
    of dict literals in the analysis's expressions, see :func:`record_fields`).
    """
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"{where}: expected a non-empty expression, got {source!r}")
    if len(source) > _MAX_SOURCE:
        raise ConfigError(
            f"{where}: the expression has {len(source)} characters; expected at most {_MAX_SOURCE}"
        )
    tree = _syntax_tree(source, where)
    checker = _Checker(source, where, VECTOR_FIELDS | frozenset(fields))
    try:
        checker.check(tree.body, "value")
    except RecursionError:
        raise ConfigError(f"{where}: the expression is nested too deeply") from None
    return Expression(source, frozenset(checker.names), tree.body)


def _syntax_tree(source: str, where: str) -> ast.Expression:
    try:
        return ast.parse(source.strip(), mode="eval")
    except SyntaxError as err:
        raise ConfigError(f"{where}: {source!r} is not a valid expression ({err.msg})") from None
    except (RecursionError, MemoryError):
        raise ConfigError(f"{where}: the expression is nested too deeply") from None


def record_fields(sources: Iterable[str]) -> frozenset[str]:
    """The record fields that ``sources`` create: the string keys of dict literals (``ak.zip``,
    ``vector.zip``, ``ak.cartesian``) and the names in ``fields=[...]`` (``ak.combinations``).

    Sources that do not parse are skipped (:func:`parse` reports them).
    """
    keys: set[str] = set()
    for source in sources:
        try:
            tree = _syntax_tree(source, "")
        except ConfigError:
            continue
        for node in ast.walk(tree):
            named: list[ast.expr | None] = []
            if isinstance(node, ast.Dict):
                named = list(node.keys)
            elif isinstance(node, ast.keyword) and node.arg == "fields":
                named = list(getattr(node.value, "elts", []))
            keys.update(
                k.value
                for k in named
                if isinstance(k, ast.Constant)
                and isinstance(k.value, str)
                and k.value.isidentifier()
                and not k.value.startswith("_")
            )
    return frozenset(keys)


def definition_order(reads: Mapping[str, Iterable[str]], where: str) -> list[str]:
    """The Definitions ``reads`` (name -> the names its expression reads) in evaluation order:
    each after the Definitions it reads, otherwise in the order of ``reads`` (config order).

    A Definition that reads its own name reads the branch of that name, not itself (a
    calibration: ``Muon_pt = Muon_pt * 1.01``); the Definitions that read that name see the
    Definition. Any other cycle (``a`` reads ``b``, ``b`` reads ``a``) is refused with a
    :class:`ConfigError` naming ``where`` and the cycle. A depth-first topological sort
    (Tarjan 1976), without recursion, so a long chain of Definitions cannot overflow the stack.
    """
    index = {name: i for i, name in enumerate(reads)}

    def uses(name: str) -> list[str]:
        return sorted(
            (n for n in set(reads[name]) if n in index and n != name), key=index.__getitem__
        )

    order: list[str] = []
    done: set[str] = set()
    for root in reads:
        if root in done:
            continue
        path = [root]
        stack = [iter(uses(root))]
        while stack:
            step = next((n for n in stack[-1] if n not in done), None)
            if step is None:
                stack.pop()
                done.add(path[-1])
                order.append(path.pop())
            elif step in path:
                cycle = " -> ".join(repr(n) for n in path[path.index(step) :] + [step])
                raise ConfigError(
                    f"{where}: Definitions {cycle} form a cycle; expected each Definition to "
                    "read branches and other Definitions without cycles"
                )
            else:
                path.append(step)
                stack.append(iter(uses(step)))
    return order


def _dotted(node: ast.expr) -> str | None:
    """``np.linalg.norm`` -> "np.linalg.norm" when ``node`` is a chain rooted at a module name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in MODULES:
        return ".".join([MODULES[node.id], *reversed(parts)])
    return None


class _Checker:
    """Walks a syntax tree and refuses every node outside the grammar (module docstring)."""

    def __init__(self, source: str, where: str, fields: frozenset[str]) -> None:
        self.source, self.where, self.fields = source, where, fields
        self.names: set[str] = set()

    def fail(self, node: ast.AST, what: str) -> NoReturn:
        piece = ast.get_source_segment(self.source.strip(), node) or type(node).__name__
        if len(piece) > 60:
            piece = piece[:57] + "..."
        source = self.source.strip()
        at = f"{piece!r} in {source!r}" if piece != source else repr(source)
        raise ConfigError(f"{self.where}: {what} (at {at})")

    def check(self, node: ast.expr, role: str) -> None:
        """``role``: "value" (an operand), "argument" (of a function), "index" (a subscript),
        "container" (the list or dict a zip, cartesian or concatenate takes), "string" (a field
        name: dict keys, ``fields=[...]``, ``with_name=``)."""
        if isinstance(node, ast.Constant):
            self._constant(node, role)
        elif isinstance(node, ast.Name):
            if node.id.startswith("_"):
                self.fail(node, f"name '{node.id}' is not allowed (names starting with '_')")
            if node.id in MODULES:
                self.fail(node, f"module '{node.id}' can only be used to call a listed function")
            if node.id in FUNCTIONS:
                self.fail(node, f"function '{node.id}' can only be called")
            self.names.add(node.id)
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINARY:
                self.fail(node, f"operator '{_SYMBOLS.get(type(node.op), '?')}' is not allowed")
            self.check(node.left, "value")
            self.check(node.right, "value")
        elif isinstance(node, ast.UnaryOp):
            self.check(node.operand, "value")
        elif isinstance(node, ast.BoolOp):
            for value in node.values:
                self.check(value, "value")
        elif isinstance(node, ast.Compare):
            for op in node.ops:
                if type(op) not in _COMPARE:
                    self.fail(node, f"comparison '{_SYMBOLS.get(type(op), '?')}' is not allowed")
            for value in [node.left, *node.comparators]:
                self.check(value, "value")
        elif isinstance(node, ast.Subscript):
            self.check(node.value, "value")
            self._index(node.slice)
        elif isinstance(node, ast.Attribute):
            self._attribute(node)
        elif isinstance(node, ast.Call):
            self._call(node)
        elif isinstance(node, ast.Dict) and role == "container":
            for key, value in zip(node.keys, node.values, strict=True):
                if key is None:
                    self.fail(node, "'**' in a dict is not allowed")
                if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                    self.fail(node, "dict keys must be strings")
                self._constant(key, "string")
                self.check(value, "value")
        elif isinstance(node, ast.List) and role in ("container", "string"):
            for item in node.elts:
                self.check(item, "value" if role == "container" else "string")
        elif isinstance(node, ast.Dict | ast.List | ast.Tuple):
            self.fail(
                node,
                f"a {type(node).__name__.lower()} is only allowed as the first argument of "
                f"{', '.join(sorted(_CONTAINER_FUNCTIONS))} (or as fields=[...])",
            )
        else:
            self.fail(node, f"{_DESCRIBE.get(type(node), type(node).__name__)} is not allowed")

    def _constant(self, node: ast.Constant, role: str) -> None:
        value = node.value
        if isinstance(value, bool) and role == "index":
            self.fail(node, "a boolean is not an index (use a mask array)")
        if isinstance(value, bool | float):
            return
        if isinstance(value, int):
            if abs(value) >= _MAX_INT:
                self.fail(node, "an integer beyond 64 bits is not allowed")
            return
        if value is None and role in ("index", "argument"):
            return
        if value is Ellipsis and role == "index":
            return
        if isinstance(value, str) and role in ("index", "string"):
            if "__" in value or len(value) > _MAX_STRING or not value.isprintable():
                self.fail(node, "this string is not allowed (no '__', printable, short)")
            return
        kind = "a string" if isinstance(value, str) else repr(value)
        self.fail(
            node,
            f"{kind} is not allowed here (strings only as field names: x['pt'], dict keys, "
            "fields=[...], with_name=...)",
        )

    def _index(self, node: ast.expr) -> None:
        if isinstance(node, ast.Tuple):
            for item in node.elts:
                self._index_item(item)
        else:
            self._index_item(node)

    def _index_item(self, node: ast.expr) -> None:
        if isinstance(node, ast.Slice):
            for part in (node.lower, node.upper, node.step):
                if part is not None:
                    self.check(part, "value")
        else:
            self.check(node, "index")

    def _attribute(self, node: ast.Attribute) -> None:
        dotted = _dotted(node)
        if dotted is not None:
            if dotted in CONSTANTS:
                return
            self.fail(node, f"'{dotted}' is not an allowed constant ({', '.join(CONSTANTS)})")
        if node.attr not in self.fields:
            self.fail(
                node,
                f"attribute '{node.attr}' is not a record field (allowed: vector's fields such "
                "as pt, eta, phi, mass, px, and the keys of dict literals in the analysis)",
            )
        self.check(node.value, "value")

    def _call(self, node: ast.Call) -> None:
        func = node.func
        name: str | None
        if isinstance(func, ast.Name):
            name = func.id
            entry = FUNCTIONS.get(name)
        elif isinstance(func, ast.Attribute) and (name := _dotted(func)) is not None:
            entry = FUNCTIONS.get(name)
        elif isinstance(func, ast.Attribute) and func.attr in METHODS:
            self.check(func.value, "value")
            name, entry = func.attr, Function(getattr, 1, _NONE)  # one other vector
        else:
            what = "a method" if isinstance(func, ast.Attribute) else "the result of an expression"
            self.fail(node, f"calling {what} is not allowed (only listed functions)")
            return
        if entry is None:
            self.fail(
                node,
                f"function '{name}' is not allowed (not in the function table: README, "
                "'Expressions')",
            )
            return
        allowed = entry.keywords
        if len(node.args) > entry.positional:
            self.fail(
                node,
                f"{name} takes at most {entry.positional} positional argument(s), got "
                f"{len(node.args)} (give the others by keyword)",
            )
        for i, arg in enumerate(node.args):
            if isinstance(arg, ast.Starred):
                self.fail(arg, "a starred argument is not allowed")
            self.check(arg, "container" if i == 0 and name in _CONTAINER_FUNCTIONS else "argument")
        for keyword in node.keywords:
            if keyword.arg is None:
                self.fail(node, "'**' arguments are not allowed")
            if keyword.arg not in allowed:
                options = ", ".join(sorted(allowed)) or "none"
                self.fail(
                    node, f"keyword '{keyword.arg}' is not allowed for {name} (allowed: {options})"
                )
            named = keyword.arg in ("fields", "with_name")
            self.check(keyword.value, "string" if named else "argument")


# ----------------------------------------------------------------------------- evaluating
def evaluate(expression: Expression, columns: Mapping[str, Any]) -> tuple[Any, list[str]]:
    """Interpret ``expression`` over ``columns``; return its value and the warnings it raised.

    Raises :class:`ExpressionError` with a one-line reason when it fails on these data.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = _Interpreter(columns).value(expression.tree)
        except ExpressionError:
            raise
        except RecursionError:
            raise ExpressionError("the expression is nested too deeply") from None
        except Exception as err:  # numpy/awkward errors on these data
            text = str(err).strip()
            first = text.splitlines()[0] if text else ""
            raise ExpressionError(f"{type(err).__name__}: {first}".rstrip(": ")) from None
    notes = list(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught))
    return value, notes


class _Interpreter:
    def __init__(self, columns: Mapping[str, Any]) -> None:
        self.columns = columns

    def value(self, node: ast.expr) -> Any:
        out = self.node(node)
        problem = _not_data(out)
        if problem is not None:
            piece = ast.unparse(node)
            piece = piece if len(piece) <= 60 else piece[:57] + "..."
            raise ExpressionError(f"{piece!r} gives {problem}; expected numbers or booleans")
        if isinstance(out, ak.Array) and any(
            type(form).__name__ == "RegularForm" for form in _forms(out.layout.form)
        ):
            # regular dimensions (x[:, None], keepdims=True, fixed-size branches) would
            # broadcast NumPy-style, across events; as variable-length lists they broadcast
            # within each event, and a list of one against a longer one is an error
            out = ak.from_regular(out, axis=None)
        return out

    def node(self, node: ast.expr) -> Any:  # noqa: PLR0911 - one branch per node kind
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in self.columns:
                raise ExpressionError(f"no column '{node.id}'")
            return self.columns[node.id]
        if isinstance(node, ast.BinOp):
            left, right = self.value(node.left), self.value(node.right)
            if isinstance(node.op, ast.Pow) and _is_int(left) and _is_int(right):
                # exact while it fits in 64 bits (bit masks like 2**60), else a float: no
                # arbitrary-precision integer powers
                if right >= 0 and (abs(left) <= 1 or right * math.log2(abs(left)) < 63):
                    return left**right
                return float(left) ** right
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp):
            return _unary(node.op, self.value(node.operand))
        if isinstance(node, ast.BoolOp):
            combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
            result = self.value(node.values[0])
            for item in node.values[1:]:
                result = combine(result, self.value(item))
            return result
        if isinstance(node, ast.Compare):
            values = [self.value(node.left)] + [self.value(c) for c in node.comparators]
            result = None
            for op, a, b in zip(node.ops, values, values[1:], strict=False):
                part = _COMPARE[type(op)](a, b)
                result = part if result is None else np.logical_and(result, part)
            return result
        if isinstance(node, ast.Subscript):
            target = self.value(node.value)
            if not isinstance(target, ak.Array | ak.Record | np.ndarray):
                raise ExpressionError(f"{ast.unparse(node.value)!r} is not an array to index")
            index = self.index(node.slice)
            items = index if isinstance(index, tuple) else (index,)
            if any(item is None for item in items) and target.ndim == 1:
                raise ExpressionError(
                    f"{ast.unparse(node)!r} adds an axis to one value per event, which would "
                    "broadcast all events against all events; per-event values broadcast "
                    "against per-object ones without it"
                )
            return target[index]
        if isinstance(node, ast.Attribute):
            return self.attribute(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        raise ExpressionError(f"{type(node).__name__} cannot be evaluated")  # refused by parse

    def index(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Tuple):
            return tuple(self.index(item) for item in node.elts)
        if isinstance(node, ast.Slice):
            parts = [
                None if p is None else self.value(p) for p in (node.lower, node.upper, node.step)
            ]
            return slice(*parts)
        if isinstance(node, ast.Constant):
            return node.value
        return self.value(node)

    def attribute(self, node: ast.Attribute) -> Any:
        dotted = _dotted(node)
        if dotted is not None:
            return CONSTANTS[dotted]
        target = self.value(node.value)
        if not isinstance(target, ak.Array | ak.Record):
            raise ExpressionError(f"{ast.unparse(node.value)!r} has no record fields")
        if node.attr in target.fields:
            return target[node.attr]
        if node.attr in VECTOR_FIELDS:
            return getattr(target, node.attr)
        raise ExpressionError(
            f"{ast.unparse(node.value)!r} has no field '{node.attr}' "
            f"(fields: {', '.join(target.fields) or 'none'})"
        )

    def argument(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Dict):
            return {k.value: self.argument(v) for k, v in zip(node.keys, node.values, strict=True)}  # type: ignore[union-attr]
        if isinstance(node, ast.List):
            return [self.argument(item) for item in node.elts]
        return self.value(node)

    def call(self, node: ast.Call) -> Any:
        func = node.func
        args = [self.argument(a) for a in node.args]
        # '**' arguments (arg None) are refused when the expression is checked
        kwargs = {cast(str, k.arg): self.argument(k.value) for k in node.keywords}
        if isinstance(func, ast.Attribute) and _dotted(func) is None:  # a vector method
            target = self.value(func.value)
            if not isinstance(target, ak.Array | ak.Record):
                raise ExpressionError(f"{ast.unparse(func.value)!r} is not a vector")
            return getattr(target, func.attr)(*args, **kwargs)
        name = func.id if isinstance(func, ast.Name) else _dotted(func)
        return FUNCTIONS[name].call(*args, **kwargs)  # type: ignore[index]


def _not_data(value: Any) -> str | None:
    """Why ``value`` may not flow between nodes, or None: only numbers and booleans do (Python,
    numpy or awkward, vector's records of numbers included), of at most :data:`MAX_ELEMENTS`
    values and, for Python integers, within 64 bits."""
    if isinstance(value, bool | float):
        return None
    if isinstance(value, int):
        return None if abs(value) < _MAX_INT else "an integer beyond 64 bits"
    if isinstance(value, np.generic | np.ndarray):
        if value.dtype.kind not in "biufc":
            return f"values of dtype {value.dtype}"
    elif isinstance(value, ak.Array | ak.Record):
        layout = value.layout if isinstance(value, ak.Array) else value.layout.array
        texts = ("string", "bytestring", "char", "byte")
        if any(f.parameters.get("__array__") in texts for f in _forms(layout.form)):
            return "strings"
    else:
        return f"a {type(value).__name__}"
    size = value.nbytes // 8  # the buffers it holds or views, in float64 numbers
    return None if size <= MAX_ELEMENTS else f"{size:.3g} numbers (too many)"


def _forms(form: Any) -> Iterable[Any]:
    """An awkward form and all the forms it contains."""
    yield form
    for child in getattr(form, "contents", None) or [getattr(form, "content", None)]:
        if child is not None:
            yield from _forms(child)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unary(op: ast.unaryop, value: Any) -> Any:
    if isinstance(op, ast.USub):
        return -value
    if isinstance(op, ast.UAdd):
        return +value
    if isinstance(op, ast.Not) or isinstance(value, bool):
        return np.logical_not(value)
    return ~value

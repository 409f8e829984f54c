"""Custom losses uploaded by `ServiceClient.create_custom_loss`: the wire graph parsed into plain data,
checked against an explicit allowlist and bounds. Pure Python, no torch.

Why in the contract: the gateway refuses a bad graph at create time (the SDK shows the message, the
session is unchanged) and has no torch; the trainer parses the same stored graph again before it runs it
(`tinkerkube_trainer.custom_loss_run`), so both apply one set of rules. Nothing the client sent is ever
resolved as a name: a node's target must be one of the strings below, which the trainer maps to torch,
math and operator callables itself. No I/O (torch.load/save/from_file), no random, no in-place method
(a trailing underscore), no `out=` argument, no global setters (`set_*`), no modules, no captured tensors.
Factory functions take their device from the server; the trainer also runs every graph on `meta`
tensors of the real shapes first and refuses any intermediate larger than `numel_limit`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

CUSTOM_LOSS_FN = "custom"  # the loss_fn of a forward_backward that runs a stored loss
LOSS_ID_KEY = "loss_id"  # loss_fn_config key naming the stored loss (the SDK's)
SPEC_CONFIG_KEY = "tinkerkube/custom_loss"  # loss_fn_config_v2 text the gateway fills with the stored loss

MAX_NODES = 1024
MAX_INPUTS = 16  # logprobs included (the SDK's bound)
MAX_ARG_DEPTH = 8  # nesting of lists/tuples/dicts/slices in one argument
MAX_SEQUENCE = 256  # items of one list/tuple/dict argument
MAX_STRING = 256  # characters of a string argument, target or key
MAX_INT = 2**40  # magnitude of an integer literal
MAX_METRICS = 64
MAX_VALUES = 1 << 16  # encoded values (literals, references, containers) in the whole graph
NUMEL_FACTOR = 16  # an intermediate may hold this many times the datum's input elements...
NUMEL_FLOOR = 1 << 16  # ...or this many, whichever is more

INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
LOSS_NAME = re.compile(r"[A-Za-z_<>][A-Za-z0-9_.<>-]{0,127}")

_ELEMENTWISE = (
    "abs", "acos", "acosh", "asin", "asinh", "atan", "atan2", "atanh", "ceil", "clamp", "clamp_max", "clamp_min",
    "clip", "cos", "cosh", "deg2rad", "digamma", "erf", "erfc", "erfinv", "exp", "exp2", "expm1", "floor", "frac",
    "lgamma", "log", "log10", "log1p", "log2", "logaddexp", "logaddexp2", "logit", "maximum", "minimum", "fmax",
    "fmin", "nan_to_num", "neg", "negative", "pow", "reciprocal", "remainder", "fmod", "round", "rsqrt", "sigmoid",
    "sign", "sgn", "sin", "sinh", "sqrt", "square", "tan", "tanh", "trunc", "xlogy", "add", "sub", "subtract",
    "mul", "multiply", "div", "divide", "true_divide", "floor_divide", "lerp", "hypot", "isfinite", "isinf",
    "isnan", "signbit", "logical_and", "logical_or", "logical_not", "logical_xor", "eq", "ne", "lt", "le", "gt",
    "ge", "greater", "greater_equal", "less", "less_equal", "not_equal", "equal", "where", "relu",
)
_REDUCTIONS = (
    "sum", "mean", "prod", "amax", "amin", "max", "min", "logsumexp", "cumsum", "cumprod", "logcumsumexp", "norm",
    "std", "var", "all", "any", "argmax", "argmin", "count_nonzero", "nansum", "nanmean", "softmax", "log_softmax",
    "diff", "dot", "matmul", "mm", "bmm", "outer", "sort", "topk", "median", "cummax", "cummin",
    "allclose", "isclose",
)
_SHAPES = (
    "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose", "permute", "movedim", "stack", "cat",
    "concat", "chunk", "split", "narrow", "select", "gather", "index_select", "take_along_dim", "roll", "flip",
    "tril", "triu", "diagonal", "diag", "broadcast_to", "t", "numel", "masked_fill", "scatter", "scatter_add",
    "repeat_interleave", "tile", "clone", "detach", "one_hot",
)
_FACTORIES = ("arange", "zeros", "ones", "full", "tensor", "eye", "linspace", "zeros_like", "ones_like",
              "full_like")
# torch.nn.functional, also under the private module fx reports for the C-implemented ones.
_FUNCTIONAL = (
    "log_softmax", "softmax", "relu", "gelu", "silu", "sigmoid", "logsigmoid", "softplus", "tanh", "elu",
    "leaky_relu", "normalize", "pad", "one_hot", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
    "kl_div", "binary_cross_entropy_with_logits", "cross_entropy", "nll_loss", "cosine_similarity",
)
_C_NN = ("softplus", "log_sigmoid", "gelu", "silu", "elu", "leaky_relu", "one_hot", "mse_loss", "l1_loss",
         "smooth_l1_loss", "huber_loss", "pad")
_MATH = ("exp", "log", "log1p", "log2", "log10", "sqrt", "pow", "fabs", "floor", "ceil", "tanh", "sin", "cos",
         "isfinite", "isnan", "isinf", "expm1", "fsum", "erf", "lgamma")
OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne", "lt",
             "le", "gt", "ge", "and_", "or_", "xor", "invert", "matmul", "getitem")

# Qualified name -> (root module, attribute path) the trainer resolves; nothing else is ever looked up.
FUNCTIONS: dict[str, tuple[str, str]] = {
    **{f"torch.{n}": ("torch", n) for n in (*_ELEMENTWISE, *_REDUCTIONS, *_SHAPES, *_FACTORIES)
       if n not in ("t", "numel", "one_hot", "relu")},
    "torch.relu": ("torch", "relu"),
    "torch.numel": ("torch", "numel"),
    **{f"torch.nn.functional.{n}": ("torch", f"nn.functional.{n}") for n in _FUNCTIONAL},
    **{f"torch._C._nn.{n}": ("torch", f"nn.functional.{n.replace('log_sigmoid', 'logsigmoid')}") for n in _C_NN},
    "torch.special.entr": ("torch", "special.entr"),
    "torch.special.xlogy": ("torch", "special.xlogy"),
    "torch.special.logit": ("torch", "special.logit"),
    "torch.special.expit": ("torch", "special.expit"),
    **{f"math.{n}": ("math", n) for n in _MATH},
    **{f"operator.{n}": ("operator", n) for n in OPERATORS},
    "getattr": ("builtins", "getattr"),
}
FACTORY_FUNCTIONS = frozenset(f"torch.{n}" for n in _FACTORIES)
# torch.Tensor methods: the math above plus conversions; none in place, none leaving torch.
METHODS = frozenset({
    *_ELEMENTWISE, *_REDUCTIONS, *_SHAPES, "view", "view_as", "expand", "expand_as", "reshape_as", "repeat",
    "contiguous", "size", "dim", "float", "double", "half", "bfloat16", "long", "int", "bool", "to", "type_as",
    "new_zeros", "new_ones", "new_full", "new_tensor", "unbind", "T", "mT", "float_power",
}) - {"one_hot", "stack", "cat", "concat"}
# Not allowed although pure math: `einsum` (a many-operand contraction makes intermediates inside one call that
# the meta-tensor size check cannot see: only each node's output is bounded).
ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "T", "mT", "real"})
DTYPES = frozenset({"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
                    "bool", "float", "double", "half", "long", "int"})
LAYOUTS = frozenset({"strided"})
MEMORY_FORMATS = frozenset({"contiguous_format", "preserve_format"})
_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


class CustomLossError(ValueError):
    """A custom loss the server will not store or run: the user's error, shown as is."""


@dataclass(frozen=True, slots=True)
class Ref:
    """An earlier node's value."""

    name: str


@dataclass(frozen=True, slots=True)
class Const:
    """A torch constant by name: kind is dtype, device (always the server's), layout or memory_format."""

    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class Seq:
    """A tuple (`tuple=True`) or list argument."""

    items: tuple[Any, ...]
    tuple: bool


@dataclass(frozen=True, slots=True)
class Mapping_:
    items: tuple[tuple[str, Any], ...]


@dataclass(frozen=True, slots=True)
class Slice:
    start: Any
    stop: Any
    step: Any


ELLIPSIS = Const("ellipsis", "...")


@dataclass(frozen=True, slots=True)
class Node:
    op: str  # call_function | call_method
    name: str
    target: str
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]


@dataclass(frozen=True, slots=True)
class LossSpec:
    """A validated custom loss: its inputs (logprobs first) with ranks, its nodes in order, what it returns."""

    name: str
    inputs: tuple[tuple[str, int], ...]
    nodes: tuple[Node, ...]
    loss: Ref
    metrics: tuple[tuple[str, Ref], ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        """The loss_fn_inputs keys it reads (after logprobs)."""
        return tuple(name for name, _ in self.inputs[1:])


def numel_limit(input_numel: int) -> int:
    """The most elements one intermediate of a datum's loss may hold."""
    return max(NUMEL_FLOOR, NUMEL_FACTOR * input_numel)


def parse(request: dict[str, Any]) -> LossSpec:
    """The `{name, inputs, graph}` of a CreateCustomLossRequest as a `LossSpec`; CustomLossError naming
    the first thing out of bounds or not allowed."""
    if not isinstance(request, dict):
        raise CustomLossError("a custom loss is an object with name, inputs and graph")
    name = request.get("name")
    if not isinstance(name, str) or not LOSS_NAME.fullmatch(name):
        raise CustomLossError(f"custom loss name must match {LOSS_NAME.pattern}, got {str(name)[:80]!r}")
    inputs = _inputs(name, request.get("inputs"))
    graph = request.get("graph")
    if not isinstance(graph, dict) or graph.get("format", 1) != 1 or not isinstance(graph.get("nodes"), list):
        raise CustomLossError(f"loss {name!r}: graph must be {{'format': 1, 'nodes': [...]}}")
    raw_nodes = graph["nodes"]
    if len(raw_nodes) > MAX_NODES:
        raise CustomLossError(f"loss {name!r} has {len(raw_nodes)} nodes; at most {MAX_NODES} are allowed")
    return _Parser(name, inputs).run(raw_nodes)


def _inputs(name: str, raw: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(raw, list) or not raw:
        raise CustomLossError(f"loss {name!r}: inputs must list logprobs and the loss_fn_inputs it reads")
    if len(raw) > MAX_INPUTS:
        raise CustomLossError(f"loss {name!r} takes {len(raw)} inputs; at most {MAX_INPUTS}, logprobs included")
    out: list[tuple[str, int]] = []
    for item in raw:
        key = item.get("name") if isinstance(item, dict) else None
        rank = item.get("rank") if isinstance(item, dict) else None
        if not isinstance(key, str) or not INPUT_NAME.fullmatch(key):
            raise CustomLossError(f"loss {name!r}: input name {str(key)[:80]!r} must match {INPUT_NAME.pattern}")
        if type(rank) is not int or rank not in (0, 1, 2):
            raise CustomLossError(f"loss {name!r}: input {key!r} has rank {rank!r}; ranks are 0, 1 or 2")
        out.append((key, rank))
    if out[0][0] != "logprobs" or out[0][1] == 0:
        raise CustomLossError(f"loss {name!r}: the first input is logprobs, of rank 1 or 2")
    if len({k for k, _ in out}) != len(out):
        raise CustomLossError(f"loss {name!r}: input names must be distinct")
    return tuple(out)


class _Parser:
    def __init__(self, name: str, inputs: tuple[tuple[str, int], ...]) -> None:
        self.name, self.inputs = name, inputs
        self.defined: set[str] = set()
        self.values = 0

    def fail(self, what: str) -> CustomLossError:
        return CustomLossError(f"loss {self.name!r}: {what}")

    def run(self, raw_nodes: list[Any]) -> LossSpec:
        nodes: list[Node] = []
        placeholders = 0
        output: Any = None
        for i, raw in enumerate(raw_nodes):
            if output is not None:
                raise self.fail("the output node must be the last node")
            if not isinstance(raw, dict):
                raise self.fail(f"node {i} is not an object")
            op, node_name, target = raw.get("op"), raw.get("name"), raw.get("target")
            if not isinstance(node_name, str) or not NODE_NAME.fullmatch(node_name) or node_name in self.defined:
                raise self.fail(f"node {i} name {str(node_name)[:80]!r} must be a new identifier")
            if not isinstance(target, str) or len(target) > MAX_STRING:
                raise self.fail(f"node {node_name!r} target must be a string of at most {MAX_STRING} characters")
            args, kwargs = raw.get("args", []), raw.get("kwargs", {})
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise self.fail(f"node {node_name!r}: args must be a list and kwargs an object")
            if op == "placeholder":
                if placeholders >= len(self.inputs) or target != self.inputs[placeholders][0] or args or kwargs:
                    raise self.fail(f"placeholder {target!r} does not match the declared inputs "
                                    f"{[k for k, _ in self.inputs]} in order")
                placeholders += 1
            elif op == "output":
                if placeholders != len(self.inputs):
                    raise self.fail("the graph reads fewer inputs than it declares")
                output = self.arg(args[0] if len(args) == 1 else None, 0)
                continue
            elif op in ("call_function", "call_method"):
                nodes.append(self.call(op, node_name, target, args, kwargs))
            else:
                raise self.fail(f"node {node_name!r} is a {str(op)[:40]!r} node; a custom loss may only call "
                                "allowed torch, math and operator functions and torch.Tensor methods")
            self.defined.add(node_name)
        if output is None:
            raise self.fail("the graph has no output node")
        loss, metrics = self.returns(output)
        return LossSpec(self.name, self.inputs, tuple(nodes), loss, metrics)

    def call(self, op: str, node_name: str, target: str, args: list[Any], kwargs: dict[str, Any]) -> Node:
        if len(args) > MAX_SEQUENCE or len(kwargs) > MAX_SEQUENCE:
            raise self.fail(f"node {node_name!r} has too many arguments")
        if "out" in kwargs:
            raise self.fail(f"node {node_name!r} passes out=; custom losses never write into tensors")
        if op == "call_function" and target not in FUNCTIONS:
            raise self.fail(f"calls {target!r}, which custom losses may not call (allowed: torch math, "
                            "reductions and shape functions, torch.nn.functional activations and losses, math, "
                            "operator; see docs/custom-losses.md)")
        if op == "call_method":
            if target not in METHODS:
                raise self.fail(f"calls method {target!r}, which custom losses may not call (no in-place, I/O, "
                                "device or host methods)")
            if not args or not isinstance(args[0], dict) or "ref" not in args[0]:
                raise self.fail(f"method call {node_name!r} must be on an earlier node's value")
        parsed_args = tuple(self.arg(a, 0) for a in args)
        parsed_kwargs = tuple((self.key(k), self.arg(v, 0)) for k, v in kwargs.items())
        if target == "getattr" and (len(parsed_args) != 2 or not isinstance(parsed_args[0], Ref)
                                    or parsed_args[1] not in ATTRIBUTES):
            raise self.fail(f"getattr may only read {sorted(ATTRIBUTES)} of a value")
        return Node(op, node_name, target, parsed_args, parsed_kwargs)

    def key(self, key: str) -> str:
        if len(key) > MAX_STRING:
            raise self.fail(f"a key is longer than {MAX_STRING} characters")
        return key

    def arg(self, value: Any, depth: int) -> Any:
        if depth > MAX_ARG_DEPTH:
            raise self.fail(f"an argument is nested deeper than {MAX_ARG_DEPTH} levels")
        self.values += 1
        if self.values > MAX_VALUES:
            raise self.fail(f"the graph holds more than {MAX_VALUES} argument values")
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            if abs(value) > MAX_INT:
                raise self.fail(f"integer literal {value} is beyond ±2**40")
            return value
        if isinstance(value, float):
            return value
        if isinstance(value, str):
            if len(value) > MAX_STRING:
                raise self.fail(f"a string argument is longer than {MAX_STRING} characters")
            return value
        if isinstance(value, list):
            return Seq(self.items(value, depth), tuple=False)
        if not isinstance(value, dict) or len(value) != 1:
            raise self.fail(f"argument {str(value)[:80]!r} is not an encoded value")
        (kind, inner), = value.items()
        if kind == "ref":
            if inner not in self.defined:
                raise self.fail(f"argument refers to {str(inner)[:80]!r}, which is not an earlier node")
            return Ref(inner)
        if kind == "tuple" and isinstance(inner, list):
            return Seq(self.items(inner, depth), tuple=True)
        if kind == "dict" and isinstance(inner, dict):
            if len(inner) > MAX_SEQUENCE:
                raise self.fail(f"a dict argument has more than {MAX_SEQUENCE} entries")
            return Mapping_(tuple((self.key(k), self.arg(v, depth + 1)) for k, v in inner.items()))
        if kind == "slice" and isinstance(inner, list) and len(inner) == 3:
            return Slice(*(self.arg(v, depth + 1) for v in inner))
        if kind == "ellipsis" and inner is True:
            return ELLIPSIS
        if kind == "float" and inner in _FLOATS:
            return _FLOATS[inner]
        allowed = {"dtype": DTYPES, "layout": LAYOUTS, "memory_format": MEMORY_FORMATS}
        if kind in allowed and inner in allowed[kind]:
            return Const(kind, inner)
        if kind == "device" and isinstance(inner, str) and len(inner) <= 32:
            return Const("device", "server")  # tensors live where the server runs the loss
        raise self.fail(f"argument {str(value)[:80]!r} is not an allowed encoded value")

    def items(self, values: list[Any], depth: int) -> tuple[Any, ...]:
        if len(values) > MAX_SEQUENCE:
            raise self.fail(f"a list argument has more than {MAX_SEQUENCE} items")
        return tuple(self.arg(v, depth + 1) for v in values)

    def returns(self, output: Any) -> tuple[Ref, tuple[tuple[str, Ref], ...]]:
        if not isinstance(output, Seq) or len(output.items) != 2:
            raise self.fail("must return (loss, metrics)")
        loss, metrics = output.items
        if not isinstance(loss, Ref):
            raise self.fail("must return its loss as a tensor")
        if not isinstance(metrics, Mapping_):
            raise self.fail("must return its metrics as a dict")
        if len(metrics.items) > MAX_METRICS:
            raise self.fail(f"returns more than {MAX_METRICS} metrics")
        for key, value in metrics.items:
            if not METRIC_KEY.fullmatch(key):
                raise self.fail(f"metric {key[:80]!r} must be named custom/<name>:sum or custom/<name>:mean")
            if not isinstance(value, Ref):
                raise self.fail(f"metric {key!r} must be a tensor")
        return loss, tuple((k, v) for k, v in metrics.items)

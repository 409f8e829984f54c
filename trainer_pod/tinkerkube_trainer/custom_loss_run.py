"""Runs a stored custom loss (`tinkerkube_contract.custom_loss.LossSpec`) the way the SDK's client-side
path does (`run_loss_handle`): one scalar loss per datum from its logprobs and the loss_fn_inputs it
names, summed over datums; metrics summed, `:mean` ones then divided by the number of datums.

Why an interpreter and not `torch.fx`: every value is built here from the spec (an allowlisted
callable, a literal, an earlier node's value), so nothing the client sent is ever evaluated or looked
up by name beyond the contract's tables. Before a batch runs, rank 0 runs the loss on `meta` tensors
of every datum's real shapes (`check_shapes`): no memory is touched, any data-dependent op fails, and
an intermediate beyond the contract's `numel_limit` refuses the op as the user's error. The real run
then has the same shapes, so it stays within that bound.
"""

from __future__ import annotations

import builtins
import functools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tinkerkube_contract import custom_loss as cl
from tinkerkube_trainer.engine_api import OpError

_ROOTS: dict[str, Any] = {"torch": torch, "math": math, "operator": operator, "builtins": builtins}
_MAX_INT_RESULT = 2**62
_MAX_INT_EXPONENT = 64
_SCALARS = (torch.Tensor, bool, int, float)


@dataclass(frozen=True, slots=True)
class CustomPayload:
    """A forward_backward's custom loss: the spec and, per datum in request order, its loss inputs
    (numpy, in `spec.input_names` order, each at its declared rank)."""

    spec: cl.LossSpec
    inputs: tuple[tuple[np.ndarray, ...], ...]


@functools.cache
def _resolve(target: str) -> Any:
    root, path = cl.FUNCTIONS[target]  # parse() admitted only these names
    value = _ROOTS[root]
    for part in path.split("."):
        value = getattr(value, part)
    return value


def parse_spec(text: str) -> cl.LossSpec:
    import json

    try:
        return cl.parse(json.loads(text))
    except (ValueError, TypeError) as exc:
        raise OpError(f"custom loss: {exc}", code="invalid_custom_loss") from None


def prepare(spec: cl.LossSpec, datums: Sequence[Any]) -> CustomPayload:
    """Each datum's inputs at their declared ranks (OpError for a missing or wrong-rank one), then the
    meta run over every distinct set of shapes."""
    (_, lp_rank), *declared = spec.inputs
    per_datum: list[tuple[np.ndarray, ...]] = []
    for i, d in enumerate(datums):
        targets = d.inputs.get("target_tokens")
        if targets is None or targets.ndim != lp_rank:
            raise OpError(f"datum {i}: loss {spec.name!r} declared logprobs with rank {lp_rank}, so every datum "
                          f"needs loss_fn_inputs['target_tokens'] of rank {lp_rank}", code="bad_shape")
        values = []
        for name, rank in declared:
            arr = d.inputs.get(name)
            if arr is None:
                raise OpError(f"datum {i} has no loss_fn_inputs[{name!r}], which loss {spec.name!r} takes",
                              code="missing_loss_input")
            if rank == 0 and arr.shape == (1,):
                arr = arr.reshape(())  # the wire has no 0-d shape: a scalar arrives as one element
            if arr.ndim != rank:
                raise OpError(f"datum {i} loss_fn_inputs[{name!r}] has rank {arr.ndim}, but loss {spec.name!r} "
                              f"declared {name} with rank {rank}", code="bad_shape")
            values.append(arr)
        per_datum.append(tuple(values))
    seen: set[tuple[Any, ...]] = set()
    for i, (d, values) in enumerate(zip(datums, per_datum, strict=True)):
        lp_shape = tuple(d.inputs["target_tokens"].shape)
        key = (lp_shape, *((a.shape, a.dtype.str) for a in values))
        if key not in seen:
            seen.add(key)
            check_shapes(spec, lp_shape, values, i)
    return CustomPayload(spec, tuple(per_datum))


def check_shapes(spec: cl.LossSpec, lp_shape: tuple[int, ...], values: Sequence[np.ndarray], i: int) -> None:
    """The loss on `meta` tensors of datum i's shapes: OpError for any failure or oversized intermediate."""
    meta = torch.device("meta")
    tensors = [torch.empty(lp_shape, dtype=torch.float32, device=meta)]
    tensors += [torch.empty(a.shape, dtype=torch.from_numpy(np.empty(0, dtype=a.dtype)).dtype, device=meta)
                for a in values]
    limit = cl.numel_limit(sum(t.numel() for t in tensors))
    try:
        Interpreter(spec, meta, limit).run(tensors)
    except OpError:
        raise
    except Exception as exc:  # whatever torch says of the user's graph on these shapes
        raise OpError(f"loss {spec.name!r} cannot run on datum {i} (logprobs {list(lp_shape)}): "
                      f"{type(exc).__name__}: {str(exc)[:400]}", code="invalid_custom_loss") from None


def datum_loss(payload: CustomPayload, index: int,
               logprobs: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Datum `index`'s loss (a 0-d tensor carrying the gradient) and its metric values."""
    device = logprobs.device
    # (a copy: np.ascontiguousarray would turn a 0-d input into a 1-d one)
    inputs = [logprobs, *(torch.from_numpy(np.array(a, copy=True, order="C")).to(device)
                          for a in payload.inputs[index])]
    try:
        loss, metrics = Interpreter(payload.spec, device, None).run(inputs)
    except OpError:
        raise
    except Exception as exc:
        raise OpError(f"loss {payload.spec.name!r} failed on datum {index}: {type(exc).__name__}: "
                      f"{str(exc)[:400]}", code="invalid_custom_loss") from None
    return loss, {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in metrics.items()}


class Interpreter:
    """Evaluates a spec's nodes in order; `limit` (meta runs) bounds every intermediate's elements."""

    def __init__(self, spec: cl.LossSpec, device: torch.device, limit: int | None) -> None:
        self.spec, self.device, self.limit = spec, device, limit
        self.env: dict[str, Any] = {}

    def run(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        for (name, _), value in zip(self.spec.inputs, inputs, strict=True):
            self.env[name] = value
        for node in self.spec.nodes:
            out = self.call(node)
            if self.limit is not None:
                self.bound(node, out)
            self.env[node.name] = out
        loss = self.env[self.spec.loss.name]
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.is_floating_point():
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise OpError(f"loss {self.spec.name!r} must return a scalar floating-point loss, got {shape}",
                          code="invalid_custom_loss")
        metrics = {}
        for key, ref in self.spec.metrics:
            value = self.env[ref.name]
            if (isinstance(value, torch.Tensor) and value.numel() != 1) or not isinstance(value, (*_SCALARS,)):
                raise OpError(f"loss {self.spec.name!r}: metric {key!r} must be a one-element tensor",
                              code="invalid_custom_loss")
            metrics[key] = value
        return loss, metrics

    def call(self, node: cl.Node) -> Any:
        args = [self.value(a) for a in node.args]
        kwargs = {k: self.value(v) for k, v in node.kwargs}
        if node.op == "call_method":
            target, *rest = args
            if not isinstance(target, torch.Tensor):
                raise OpError(f"loss {self.spec.name!r}: method {node.target!r} of node {node.name!r} is called on a "
                              f"{type(target).__name__}, not a tensor", code="invalid_custom_loss")
            return getattr(target, node.target)(*rest, **kwargs)
        if node.target.startswith("operator."):
            self.check_operator(node, args)
        if node.target in cl.FACTORY_FUNCTIONS and not node.target.endswith("_like"):
            kwargs["device"] = self.device  # factories make tensors where the loss runs, nothing else
        out = _resolve(node.target)(*args, **kwargs)
        if isinstance(out, int) and not isinstance(out, bool) and abs(out) > _MAX_INT_RESULT:
            raise OpError(f"loss {self.spec.name!r}: node {node.name!r} makes an integer beyond 2**62",
                          code="invalid_custom_loss")
        return out

    def check_operator(self, node: cl.Node, args: list[Any]) -> None:
        """Python operators only on tensors and numbers (no string or list repetition), bounded powers."""
        if node.target == "operator.getitem":
            return
        if not all(isinstance(a, _SCALARS) for a in args):
            raise OpError(f"loss {self.spec.name!r}: {node.target} of node {node.name!r} takes tensors and "
                          "numbers only", code="invalid_custom_loss")
        if node.target == "operator.pow" and all(isinstance(a, int) for a in args) and abs(args[1]) > \
                _MAX_INT_EXPONENT:
            raise OpError(f"loss {self.spec.name!r}: integer power beyond {_MAX_INT_EXPONENT} in node {node.name!r}",
                          code="invalid_custom_loss")

    def value(self, v: Any) -> Any:
        if isinstance(v, cl.Ref):
            return self.env[v.name]
        if isinstance(v, cl.Seq):
            items = [self.value(x) for x in v.items]
            return tuple(items) if v.tuple else items
        if isinstance(v, cl.Mapping_):
            return {k: self.value(x) for k, x in v.items}
        if isinstance(v, cl.Slice):
            return slice(self.value(v.start), self.value(v.stop), self.value(v.step))
        if isinstance(v, cl.Const):
            if v is cl.ELLIPSIS or v.kind == "ellipsis":
                return Ellipsis
            if v.kind == "device":
                return self.device
            if v.kind == "layout":
                return torch.strided
            value = getattr(torch, v.name)  # a name from the contract's DTYPES / MEMORY_FORMATS
            return value
        return v

    def bound(self, node: cl.Node, out: Any) -> None:
        assert self.limit is not None
        stack = [out]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                if item.numel() > self.limit:
                    raise OpError(
                        f"loss {self.spec.name!r}: node {node.name!r} ({node.target}) makes a tensor of "
                        f"{item.numel()} elements; a custom loss's intermediates may hold at most {self.limit} "
                        f"for this datum ({cl.NUMEL_FACTOR}x its inputs' elements, at least {cl.NUMEL_FLOOR})",
                        code="custom_loss_too_large")
            elif isinstance(item, (tuple, list)):
                stack.extend(item)

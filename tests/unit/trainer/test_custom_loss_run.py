"""Custom losses as the trainer runs them: the graph the real SDK traces and encodes is parsed by the
contract's allowlist, run by the trainer's interpreter with the SDK's client-side results (loss, metrics,
gradients), and every allowlist or bound violation is refused as the user's error (OpError / CustomLossError)
with a message naming it."""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

from tinkerkube_contract import custom_loss as cl
from tinkerkube_trainer import custom_loss_run
from tinkerkube_trainer.codec import DatumData
from tinkerkube_trainer.engine_api import OpError


def clipped(logprobs, advantages, scale):
    ratio = torch.exp(logprobs - logprobs.detach())
    n = logprobs.shape[0]
    position = torch.arange(n, dtype=torch.float32, device=logprobs.device) / n
    loss = -(torch.clamp(ratio, 0.8, 1.2) * advantages).sum() * scale + 0.01 * (logprobs**2 * position).mean()
    loss = loss + F.softplus(logprobs[..., :-1]).sum() * 0.001
    return loss, {"custom/ratio:mean": ratio.mean(), "custom/adv:sum": advantages.sum()}


RANKS: dict[str, Any] = {"logprobs": 1, "advantages": 1, "scale": 0}


def wire(fn: Any = clipped, ranks: dict[str, Any] = RANKS) -> dict[str, Any]:
    """What create_custom_loss sends, through JSON as the gateway stores it."""
    handle = trace_loss(fn, ranks, "session")
    request = {"name": handle.name, "inputs": [i.model_dump() for i in handle.inputs],
               "graph": encode_graph(handle).model_dump(mode="json")}
    return json.loads(json.dumps(request))


def datum(n: int, seed: int) -> DatumData:
    rng = np.random.default_rng(seed)
    return DatumData(tokens=np.arange(n), inputs={"target_tokens": np.arange(n), "advantages":
                                                  rng.normal(size=n).astype(np.float32),
                                                  "scale": np.array([1.5], dtype=np.float32)})


def test_the_server_runs_the_sdks_graph_with_the_sdks_loss_metrics_and_gradients() -> None:
    handle = trace_loss(clipped, RANKS, "session")
    datums = [datum(6, 1), datum(9, 2)]
    payload = custom_loss_run.prepare(cl.parse(wire()), datums)
    for i, d in enumerate(datums):
        lp = torch.randn(d.tokens.shape[0], requires_grad=True)
        want, want_metrics = handle.graph(lp, torch.from_numpy(d.inputs["advantages"]), torch.tensor(1.5))
        got, got_metrics = custom_loss_run.datum_loss(payload, i, lp)
        assert float(got) == float(want)
        assert got_metrics == {k: float(v) for k, v in want_metrics.items()}
        assert torch.equal(torch.autograd.grad(got, lp)[0], torch.autograd.grad(want, lp)[0])


def _mutated(change: Any) -> dict[str, Any]:
    request = copy.deepcopy(wire())
    change(request)
    return request


def _node(request: dict[str, Any], name: str) -> dict[str, Any]:
    return next(n for n in request["graph"]["nodes"] if n["name"] == name)


def _set(name: str, **values: Any) -> Any:
    return lambda r: _node(r, name).update(values)


def _deep(r: dict[str, Any]) -> None:
    arg: Any = 1.0
    for _ in range(12):
        arg = {"tuple": [arg]}
    _node(r, "exp")["args"].append(arg)


def _many(r: dict[str, Any]) -> None:
    nodes = r["graph"]["nodes"]
    extra = [{"op": "call_function", "name": f"n{i}", "target": "operator.add", "args": [1, 2], "kwargs": {}}
             for i in range(cl.MAX_NODES)]
    r["graph"]["nodes"] = nodes[:3] + extra + nodes[3:]


def _values(r: dict[str, Any]) -> None:
    nodes = r["graph"]["nodes"]
    extra = [{"op": "call_function", "name": f"n{i}", "target": "torch.tensor", "args": [[0.0] * 250]}
             for i in range(300)]
    r["graph"]["nodes"] = nodes[:3] + extra + nodes[3:]


def _metric_key(r: dict[str, Any]) -> None:
    output = r["graph"]["nodes"][-1]["args"][0]["tuple"][1]["dict"]
    output["Loss"] = output.pop("custom/adv:sum")


@pytest.mark.parametrize(("change", "message"), [
    (_set("exp", target="torch.load"), "calls 'torch.load'"),
    (_set("exp", target="torch.rand_like"), "calls 'torch.rand_like'"),
    (_set("exp", target="os.system"), "calls 'os.system'"),
    (_set("exp", target="torch.set_default_dtype"), "calls 'torch.set_default_dtype'"),
    (_set("detach", target="add_"), "method 'add_'"),
    (_set("detach", target="cpu"), "method 'cpu'"),
    (_set("detach", op="call_module"), "'call_module' node"),
    (_set("detach", op="get_attr"), "'get_attr' node"),
    (_set("exp", kwargs={"out": {"ref": "sub"}}), "out="),
    (_set("exp", args=[{"ref": "later"}]), "not an earlier node"),
    (_set("exp", args=["x" * 300]), "longer than 256"),
    (_set("exp", args=[2**50]), "beyond"),
    (_deep, "nested deeper than 8"),
    (_many, "at most 1024"),
    (_values, "more than 65536 argument values"),
    (_metric_key, "metric 'Loss'"),
    (lambda r: r["inputs"].append({"name": "Bad-Name", "rank": 1}), "input name 'Bad-Name'"),
    (lambda r: r["inputs"].extend({"name": f"x{i}", "rank": 1} for i in range(20)), "at most 16"),
    (lambda r: r["inputs"].__setitem__(0, {"name": "logprobs", "rank": 0}), "rank 1 or 2"),
    (lambda r: r["graph"]["nodes"].pop(), "no output"),
], ids=["torch.load", "random", "os", "set_", "in-place", "device", "module", "captured", "out",
        "forward-ref", "string", "int", "depth", "nodes", "values", "metric-key", "input-name", "inputs",
        "logprobs-rank", "no-output"])
def test_a_graph_outside_the_allowlist_or_bounds_is_refused_by_name(change: Any, message: str) -> None:
    with pytest.raises(cl.CustomLossError, match=message.replace("(", r"\(")):
        cl.parse(_mutated(change))


def test_an_oversized_intermediate_is_refused_on_meta_tensors_before_anything_runs() -> None:
    def blowup(logprobs):
        big = logprobs.repeat(100_000)
        return big.sum(), {}

    spec = cl.parse(wire(blowup, {"logprobs": 1}))
    with pytest.raises(OpError, match=r"makes a tensor of 800000 elements.*at most 65536") as err:
        custom_loss_run.prepare(spec, [datum(8, 1)])
    assert err.value.code == "custom_loss_too_large"


@pytest.mark.parametrize(("fn", "message"), [
    (lambda logprobs: (logprobs * 2, {}), "scalar floating-point loss"),
    (lambda logprobs: (logprobs.sum(), {"custom/v:sum": logprobs}), "one-element tensor"),
    (lambda logprobs: (logprobs[logprobs > 0].sum(), {}), "cannot run on datum 0"),
], ids=["vector-loss", "vector-metric", "data-dependent"])
def test_a_loss_that_cannot_run_on_the_datums_shapes_is_the_users_error(fn: Any, message: str) -> None:
    def loss(logprobs):
        return fn(logprobs)

    spec = cl.parse(wire(loss, {"logprobs": 1}))
    with pytest.raises(OpError, match=message):
        custom_loss_run.prepare(spec, [datum(5, 1)])


def test_a_datum_without_an_input_at_its_declared_rank_is_refused() -> None:
    spec = cl.parse(wire())
    wrong = datum(5, 1)
    wrong.inputs["scale"] = np.ones(5, dtype=np.float32)
    with pytest.raises(OpError, match="has rank 1, but loss 'clipped' declared scale with rank 0"):
        custom_loss_run.prepare(spec, [wrong])
    del wrong.inputs["scale"]
    with pytest.raises(OpError, match=r"no loss_fn_inputs\['scale'\]"):
        custom_loss_run.prepare(spec, [wrong])


def test_python_operators_take_numbers_and_tensors_only() -> None:
    request = wire()
    nodes = request["graph"]["nodes"]
    nodes.insert(3, {"op": "call_function", "name": "rep", "target": "operator.mul", "args": ["x", 10**9],
                     "kwargs": {}})
    with pytest.raises(OpError, match="takes tensors and numbers only"):
        custom_loss_run.prepare(cl.parse(request), [datum(5, 1)])

"""Sessions search, projects and trace export through the real SDK's RestClient (fake trainers)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tinker
from tinker import types

from tests.component.gateway.conftest import TINY
from tests.support.sdk import GatewayProc, start_gateway

KEYS = '{"tml-carol": "carol", "tml-dave": "dave"}'
CAROL, DAVE = "tml-carol", "tml-dave"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path) -> Iterator[GatewayProc]:
    gateway = start_gateway(tmp_path_factory.mktemp("sessions") / "state", model_cache_dir=model_cache_dir,
                            extra_env={"TINKERKUBE_GATEWAY_API_KEYS": KEYS, "FAKE_TRAINER_OP_DELAY": "0.05"})
    yield gateway
    gateway.stop()


def _search(gw: GatewayProc, key: str, **fields: Any) -> types.SessionSearchResponse:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # search_sessions is experimental in the SDK
        return tinker.RestClient(base_url=gw.url, api_key=key).search_sessions(
            types.SessionSearchRequest(**fields)).result()


def _session(gw: GatewayProc, key: str, status: str | None, **kwargs: Any) -> str:
    service = tinker.ServiceClient(base_url=gw.url, api_key=key, **kwargs)
    service.create_lora_training_client(base_model=TINY, rank=4).result()  # creates the session
    session_id = service.holder.get_session_id()
    if status is not None:
        service.close(status).result()  # type: ignore[arg-type]
    return session_id


@pytest.fixture(scope="module")
def sessions(gw: GatewayProc) -> dict[str, str]:
    return {
        "alpha": _session(gw, CAROL, "success", display_name="Alpha run", user_metadata={"team": "red"},
                          project_id="p-red"),
        "beta": _session(gw, CAROL, "errored", display_name="beta sweep", user_metadata={"team": "blue"}),
        "gamma": _session(gw, CAROL, None, display_name="Gamma Sweep Two", user_metadata={"team": "red"}),
        "dave": _session(gw, DAVE, None, display_name="alpha of dave"),
    }


def test_search_filters_by_name_metadata_project_and_status(gw: GatewayProc, sessions: dict[str, str]) -> None:
    def ids(**fields: Any) -> list[str]:
        return [s.session_id for s in _search(gw, CAROL, **fields).sessions]

    mine = [sessions["gamma"], sessions["beta"], sessions["alpha"]]  # newest first
    assert ids() == mine
    assert ids(display_name="SWEEP") == [sessions["gamma"], sessions["beta"]]
    assert ids(display_name="two sweep") == [sessions["gamma"]]  # every word, any order
    assert ids(display_name="nothing", session_id=sessions["alpha"]) == [sessions["alpha"]]  # either matches
    assert ids(user_metadata={"team": "red"}) == [sessions["gamma"], sessions["alpha"]]
    assert ids(project_ids=["p-red"]) == [sessions["alpha"]]
    assert ids(project_ids=["default"]) == [sessions["gamma"], sessions["beta"]]
    assert ids(statuses=[types.ActiveSessionStatusQuery()]) == [sessions["gamma"]]
    assert ids(statuses=[types.ClientFinishedSessionStatusQuery(reasons=["errored"])]) == [sessions["beta"]]
    assert ids(statuses=[types.FailedSessionStatusQuery()]) == []
    assert ids(owner=types.UserSearchOwner(owner_urns=["carol"])) == mine
    assert ids(owner=types.UserSearchOwner(owner_urns=["dave"])) == []
    assert [s.session_id for s in _search(gw, DAVE).sessions] == [sessions["dave"]]  # tenants never mix

    alpha = _search(gw, CAROL, session_id=sessions["alpha"]).sessions[0]
    assert (alpha.owner, alpha.project_id, alpha.display_name) == ("carol", "p-red", "Alpha run")
    assert alpha.status == types.ClientSessionFinished(reason=types.ClientSessionFinishSuccess())
    assert alpha.user_metadata == {"team": "red"} and alpha.checkpoints_count == 0


def test_search_pages_with_its_cursor(gw: GatewayProc, sessions: dict[str, str]) -> None:
    seen, cursor = [], None
    while True:
        page = _search(gw, CAROL, limit=1, cursor=cursor)
        seen += [s.session_id for s in page.sessions]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == [sessions["gamma"], sessions["beta"], sessions["alpha"]]


def test_a_session_moves_into_a_project(gw: GatewayProc, sessions: dict[str, str]) -> None:
    rest = tinker.RestClient(base_url=gw.url, api_key=CAROL)
    rest.assign_session_project(sessions["beta"], "p-blue").result()
    assert [s.session_id for s in _search(gw, CAROL, project_ids=["p-blue"]).sessions] == [sessions["beta"]]
    with pytest.raises(tinker.NotFoundError):
        tinker.RestClient(base_url=gw.url, api_key=DAVE).assign_session_project(sessions["beta"], "x").result()
    with gw.http(CAROL) as http:
        empty = http.put(f"/api/v1/sessions/{sessions['beta']}/project", json={"project_id": ""})
    assert empty.status_code == 400


def test_a_sessions_trace_has_a_span_per_request_with_what_the_trainer_said(gw: GatewayProc) -> None:
    with tinker.ServiceClient(base_url=gw.url, api_key=CAROL) as service:
        training = service.create_lora_training_client(base_model=TINY, rank=4).result()
        datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                            loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]})
        training.forward_backward([datum], "cross_entropy").result()
        training.optim_step(types.AdamParams()).result()
        sampler = training.save_weights_and_get_sampling_client().result()
        sampler.sample(types.ModelInput.from_ints([1]), 1, types.SamplingParams(max_tokens=2)).result()
        session_id = service.holder.get_session_id()
        rest = tinker.RestClient(base_url=gw.url, api_key=CAROL)
        url = rest.export_session_trace(session_id).result()
    with urllib.request.urlopen(url, timeout=30) as response:
        trace = json.loads(response.read())
    events = trace["traceEvents"]
    begins = [e for e in events if e["ph"] == "b" and e["cat"] == "request"]
    tops = {e["name"] for e in begins if "request_id" in e.get("args", {})}
    assert {"create_model #0", "forward_backward #1", "optim_step #2", "save_sampler_weights #3", "sample #0"} <= tops
    assert len([e for e in events if e["ph"] == "e"]) == len(begins)  # every slice closes
    inner = {e["name"] for e in begins} - tops
    assert {"in the gateway", "trainer queue", "on the trainer"} <= inner
    names = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert f"run {training.model_id}" in names and any(n.startswith("sampler ") for n in names)
    def window(name: str, request_id: str) -> tuple[int, int]:
        begin = next(e for e in begins if e["id"] == request_id and e["name"] == name)
        end = next(e for e in events if e["ph"] == "e" and e["id"] == request_id and e["name"] == name)
        assert end["ts"] >= begin["ts"]
        return begin["ts"], end["ts"]

    for top in (e for e in begins if e["name"] in tops):  # every part of a request lies within it
        outer = window(top["name"], top["id"])
        for inside in (e["name"] for e in begins if e["id"] == top["id"] and e["name"] not in tops):
            start, stop = window(inside, top["id"])
            assert outer[0] <= start <= stop <= outer[1], (top["name"], inside)
    with pytest.raises(urllib.error.HTTPError) as forged:
        urllib.request.urlopen(url.replace(session_id, session_id[:-1] + "0"), timeout=30)
    assert forged.value.code in (403, 404)
    with pytest.raises(tinker.NotFoundError):
        tinker.RestClient(base_url=gw.url, api_key=DAVE).export_session_trace(session_id).result()

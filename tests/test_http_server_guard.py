"""The CPU stand-in of SGLang refuses the weight-update routes as SGLang 0.5.23 does, through one guard
(http_server.ROUTE_RULES): which routes need a single replica and which an open session is read from
the installed SGLang's own source, and the refusals are checked on the stand-in's application in this
process (a refused request never reaches the model, so none is loaded)."""

from __future__ import annotations

import asyncio
import importlib.util
import re
from pathlib import Path

import pytest

from megatron_nft.rollout import http_server, protocol
from megatron_nft.rollout.http_server import (
    IN_SESSION,
    ROUTE_RULES,
    SINGLE_REPLICA,
    LocalServer,
    ServerFlags,
)

# the installed package's files, read without importing it (its import takes half a minute)
SPEC = importlib.util.find_spec("sglang")
if SPEC is None or SPEC.origin is None:
    pytest.skip("sglang is not installed", allow_module_level=True)
SRT = Path(SPEC.origin).parent / "srt"


def upstream_single_replica() -> set[str]:
    """Tokenizer-manager methods that `assert get_parallel().dp_size == 1` (each is the route of its name)."""
    source = (SRT / "managers/tokenizer_control_mixin.py").read_text()
    methods = re.split(r"\n    async def ", source)[1:]
    return {m.split("(", 1)[0] for m in methods if "assert get_parallel().dp_size == 1" in m}


def upstream_in_session() -> dict[str, str]:
    """Scheduler refusals outside a weight-update session: route name -> SGLang's message."""
    source = (SRT / "managers/scheduler_components/weight_updater.py").read_text()
    found = re.findall(r'message="(\w+) must run between "\s*"([^"]+)"', source)
    return {name: f"{name} must run between {rest}" for name, rest in found}


def served_routes() -> set[str]:
    app = LocalServer(None, "model").app()
    return {r.resource.canonical for r in app.router.routes()}


def test_the_rules_are_sglangs():
    served = served_routes()
    single = {"/" + n for n in upstream_single_replica()} & served
    session = {"/" + n for n in upstream_in_session()} & served
    assert single and session  # the upstream source still reads as expected
    assert {p for p, rules in ROUTE_RULES.items() if SINGLE_REPLICA in rules} == single
    assert {p for p, rules in ROUTE_RULES.items() if IN_SESSION in rules} == session


def requests(server: LocalServer, calls: list[tuple[str, dict]]) -> list[tuple[int, object]]:
    from aiohttp.test_utils import TestClient, TestServer

    async def go():
        async with TestClient(TestServer(server.app())) as client:
            out = []
            for path, body in calls:
                response = await client.post(path, json=body)
                is_json = response.content_type == "application/json"
                out.append((response.status, await (response.json() if is_json else response.text())))
            return out

    return asyncio.run(go())


def test_one_guard_gives_sglangs_refusals():
    routes = sorted(ROUTE_RULES)
    # --dp-size 2: FastAPI's plain 500 for every single-replica route, in a session or not
    dp2 = LocalServer(None, "model", ServerFlags(dp_size=2))
    answers = requests(dp2, [(p, {}) for p in routes] + [("/begin_weight_update", protocol.begin_update_body())]
                       + [(p, {}) for p in routes])
    assert answers[: len(routes)] == [(500, "Internal Server Error")] * len(routes)
    assert answers[len(routes)] == (200, {"success": True, "message": "Success"})  # not a single-replica route
    assert answers[len(routes) + 1:] == [(500, "Internal Server Error")] * len(routes)
    # one replica, no session: the session routes answer SGLang's message; the group routes run
    messages = upstream_in_session()
    one = LocalServer(None, "model")
    session_routes = [p for p in routes if IN_SESSION in ROUTE_RULES[p]]
    answers = requests(one, [(p, {}) for p in session_routes])
    assert answers == [(400, {"success": False, "message": messages[p.lstrip("/")]}) for p in session_routes]
    status, body = requests(one, [("/destroy_weights_update_group", {"group_name": "none"})])[0]
    assert (status, body) == (400, {"success": False, "message": "The group to be destroyed does not exist."})


def test_the_guard_runs_for_every_route_and_only_in_one_place():
    """No route repeats the checks (the duplicated guards this replaced could drift apart)."""
    source = Path(http_server.__file__).read_text()
    assert source.count("self.flags.dp_size != 1") == 1
    assert source.count("must run between begin_weight_update() and end_weight_update()") == 1

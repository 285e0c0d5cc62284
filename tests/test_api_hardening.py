"""The HTTP API under load and under a fuzzer: servers that are full are a load signal (requests
wait briefly or get a clean 503, never a 500, and no server is banned for it), and a schema-driven
fuzzer (schemathesis) finds no 5xx but 503 and no reply that breaks the published OpenAPI document.

Own swarm of a tiny random model with a chat template and a context of 64 positions (so that every
generation the fuzzer asks for is short): two servers of both its blocks, each with cache for two
sessions. The API runs in this process (uvicorn in a thread), so tests can read the client's bans.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from stamen.client.config import ClientConfig
from stamen.client.swarm import Swarm
from stamen.types import PeerIDStr

MODEL_ID = "tiny-chat"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
SESSION_TOKENS = 60
"""Positions of every request below (prompt + max_tokens); a server's cache holds two such sessions."""


def test_concurrent_pardons_of_one_server_do_not_collide():
    """Two requests that find no route without a banned server take it back at once: the second
    used to raise KeyError (an HTTP 500)."""
    swarm = Swarm.__new__(Swarm)  # no DHT: only the ban bookkeeping
    swarm.config = ClientConfig(initial_peers=[])
    swarm._servers, swarm._banned_until, swarm._rtts = {PeerIDStr("peer"): None}, {}, {}

    async def ping_all(peers):
        await asyncio.sleep(0.01)
        return [0.001] * len(peers)

    swarm._ping_all = ping_all
    swarm.ban(PeerIDStr("peer"), "a test")

    async def both():
        return await asyncio.gather(swarm._pardon(), swarm._pardon())

    assert asyncio.run(both()) == [True, True]
    assert swarm._banned_until == {}


def test_openapi_document_publishes_bodies_errors_and_event_streams():
    """Request bodies, OpenAI's error JSON for 400/404/503 (never FastAPI's 422, which this API
    does not send), and streamed replies as ``text/event-stream``."""
    from unittest import mock

    from stamen.api.app import create_app

    engine = mock.Mock(model_id=MODEL_ID)
    document = create_app(engine).openapi()
    schemas = document["components"]["schemas"]
    for path, request in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")):
        operation = document["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{request}"} and request in schemas
        replies = operation["responses"]
        assert set(replies) == {"200", "400", "404", "503"}
        assert set(replies["200"]["content"]) == {"application/json", "text/event-stream"}
        for status in ("400", "404", "503"):
            assert replies[status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorResponse"}
    assert "messages" in schemas["ChatCompletionRequest"]["required"]
    assert schemas["ChatCompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]["minimum"] == 1
    assert set(document["paths"]["/v1/models/{model_id}"]["get"]["responses"]) == {"200", "404"}
    assert "HTTPValidationError" not in schemas
    # every reference resolves
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"].rsplit("/", 1)[1])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    assert refs <= set(schemas)


@pytest.fixture(scope="module")
def tiny_api(tmp_path_factory):
    import uvicorn
    from transformers import AutoTokenizer

    from stamen import AutoDistributedModelForCausalLM
    from stamen.api.app import create_app
    from stamen.api.engine import Engine
    from stamen.dht.records import ServerState
    from stamen.testing.models import TRAINED_SPREAD, save_random_llama
    from stamen.testing.swarm import LocalSwarm
    from stamen.types import Span

    path = save_random_llama(tmp_path_factory.mktemp("tiny-chat") / MODEL_ID, dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, **TRAINED_SPREAD))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    with LocalSwarm(log_dir=tmp_path_factory.mktemp("tiny-chat-logs")) as swarm:
        swarm.start_bootstrap()
        for _ in range(2):
            swarm.add_server(path, Span(0, 2), "--torch-threads", "1", "--max-cache-tokens", str(2 * SESSION_TOKENS))
        swarm.wait_for(MODEL_ID, 2, lambda records: len(records) == 2 and all(
            r.state == ServerState.ONLINE for r in records.values()), "both servers online")
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, full_wait=2.0)
        engine = Engine(model, tokenizer, MODEL_ID, default_max_tokens=16)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while not server.started:
                assert time.monotonic() < deadline and thread.is_alive(), "the API did not start"
                time.sleep(0.05)
            yield f"http://127.0.0.1:{port}/v1", model
        finally:
            server.should_exit = True
            thread.join(10)
            model.shutdown()


def _post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _concurrently(url: str, count: int) -> list[tuple[int, dict]]:
    prompt = "The swarm shares"  # 4 tokens here; max_tokens fills the session
    body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": SESSION_TOKENS - 8, "temperature": 0}
    results: list[tuple[int, dict]] = []
    threads = [threading.Thread(target=lambda: results.append(_post(f"{url}/completions", body)))
               for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_full_servers_are_waited_for_or_a_503_never_a_500_nor_a_ban(tiny_api, caplog):
    """With every server's cache held, requests wait up to ``full_wait`` and end with OpenAI's 503;
    cache freed while they wait serves them. Full servers are never banned."""
    from stamen.client.session import InferenceSession

    url, model = tiny_api
    caplog.set_level(logging.INFO, logger="stamen.client.session")
    held = [InferenceSession(model.swarm, SESSION_TOKENS) for _ in range(4)]  # both servers' whole cache
    try:
        for session in held:
            session.open()  # the third and fourth find the first server full and go to the other
        assert len({s.route[0].peer_id for s in held}) == 2
        start = time.monotonic()
        results = _concurrently(url, 3)
        assert [status for status, _ in results] == [503] * 3, results
        assert time.monotonic() - start >= 2.0  # each waited for cache before giving up
        for _, reply in results:
            assert reply["error"]["code"] == "servers_full" and reply["error"]["type"] == "service_unavailable"
            assert reply["error"]["message"]
        threading.Timer(0.5, lambda: [s.close() for s in held]).start()  # cache frees while requests wait
        results = _concurrently(url, 6)
    finally:
        for session in held:
            session.close()
    statuses = [status for status, _ in results]
    assert all(s in (200, 503) for s in statuses), results
    assert statuses.count(200) >= 4, results  # two sessions per server at a time, then the others
    assert all(r["usage"]["completion_tokens"] == SESSION_TOKENS - 8 for s, r in results if s == 200)
    assert "is full" in caplog.text  # the full servers were met, and routed around or waited for
    assert model.swarm._banned_until == {}  # full is load, not a fault


@pytest.mark.timeout(180)
def test_schema_fuzzer_finds_no_server_error(tiny_api):
    """schemathesis, positive and negative cases from the published OpenAPI document with a fixed
    seed: no 5xx but 503, and every reply conforms to the document (status, content type, body)."""
    import schemathesis
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error  # noqa: F401  (the registry loads the built-in checks)
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    url, _ = tiny_api
    schema = schemathesis.openapi.from_url(url.removesuffix("/v1") + "/openapi.json")
    cases = {"count": 0, "statuses": {}}

    @schemathesis.check
    def no_server_error_but_503(ctx, response, case):
        if response.status_code >= 500 and response.status_code != 503:
            raise AssertionError(f"{response.status_code}: {response.text[:500]}")

    def served_model(case_and_pick):
        case, pick = case_and_pick
        if pick and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL_ID  # most cases reach generation, the rest get 404s
        return case

    for result in schema.get_all_operations():
        operation = result.ok()
        generates = operation.method.upper() == "POST"
        modes = [schemathesis.GenerationMode.POSITIVE]
        if generates:  # a GET here takes nothing that could be invalid
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:
            strategy = operation.as_strategy(generation_mode=mode)
            checks = [no_server_error_but_503, status_code_conformance, content_type_conformance,
                      response_schema_conformance]
            if mode == schemathesis.GenerationMode.NEGATIVE:
                checks.append(negative_data_rejection)
            else:  # a negative case must stay invalid: only positive ones get the served model's name
                strategy = st.tuples(strategy, st.integers(0, 3)).map(served_model)

            _fuzz(strategy, checks, 15 if generates else 5, url.removesuffix("/v1"), cases)
    assert cases["count"] <= 100
    assert cases["statuses"].get(200, 0) >= 5, cases  # the fuzzer reached generation, not only errors


def _fuzz(strategy, checks, examples: int, base_url: str, cases: dict) -> None:
    """Call the API with ``examples`` cases drawn (derandomized: the same ones every run) and check the replies."""
    import hypothesis

    @hypothesis.settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                         phases=[hypothesis.Phase.generate], suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(case=strategy)
    def run(case):
        response = case.call(base_url=base_url, timeout=60)
        cases["count"] += 1
        cases["statuses"][response.status_code] = cases["statuses"].get(response.status_code, 0) + 1
        case.validate_response(response, checks=checks)

    run()

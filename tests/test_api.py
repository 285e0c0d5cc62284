"""The OpenAI-compatible API over a 3-server swarm of the real SmolLM2 model, driven by the official
``openai`` client (and raw HTTP for malformed requests); references come from transformers."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch

MODEL = "SmolLM2-135M-Instruct"
pytestmark = pytest.mark.swarm


def local_chat(smol_local, question: str, max_new_tokens: int) -> tuple[list[int], list[int], str]:
    """(prompt ids, generated ids incl. a final end of sequence, text) from transformers greedy."""
    model, tok = smol_local
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_dict=True)["input_ids"]
    return _greedy(smol_local, list(prompt), max_new_tokens)


def _greedy(smol_local, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[int], str]:
    model, tok = smol_local
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, len(prompt):].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id) + 1]
    # cut by length inside a multi-byte character, the API shows no half character (decode shows U+FFFD)
    return prompt, new, tok.decode(new, skip_special_tokens=True).rstrip("\ufffd")


@pytest.fixture(scope="module")
def client(smol_swarm):
    return openai.OpenAI(base_url=smol_swarm.api_url, api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_swarm_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_completion_equals_transformers_greedy(client, smol_local):
    prompt, new, text = local_chat(smol_local, "What is the capital of France?", 40)
    reply = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=40,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert reply.choices[0].message.content == text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == ("stop" if new[-1] == smol_local[1].eos_token_id else "length")
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(new)
    assert reply.usage.total_tokens == len(prompt) + len(new)


def test_streamed_chat_deltas_join_to_the_same_text(client, smol_local):
    question = "Name three primary colors."
    prompt, new, text = local_chat(smol_local, question, 40)
    stream = client.chat.completions.create(model=MODEL, temperature=0, max_completion_tokens=40, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": question}])
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(deltas) > 3  # really streamed, not one blob
    assert "".join(deltas) == text
    assert finish == "stop"
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), len(new))


def test_completion_stops_at_length(client, smol_local):
    prompt_text = "The three largest cities in Europe are"
    tok = smol_local[1]
    prompt, new, text = _greedy(smol_local, tok(prompt_text)["input_ids"], 12)
    reply = client.completions.create(model=MODEL, prompt=prompt_text, max_tokens=12, temperature=0)
    assert reply.choices[0].text == text
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), 12)


def test_stop_string_cuts_the_text(client, smol_local):
    _, _, text = local_chat(smol_local, "What is the capital of France?", 40)
    assert "Paris" in text
    reply = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=40, stop=["Paris"],
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert reply.choices[0].message.content == text[: text.index("Paris")]
    assert reply.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client):
    kwargs = dict(model=MODEL, temperature=0.9, top_p=0.9, seed=7, max_tokens=16,
                  messages=[{"role": "user", "content": "Tell me a fact about the sea."}])
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    second = client.chat.completions.create(**kwargs).choices[0].message.content
    assert first == second and first


def test_four_concurrent_streams_all_complete(client, smol_local):
    questions = ["What is the capital of France?", "Name three primary colors.", "What is 2 + 2?",
                 "Say hello in Spanish."]
    expected = {q: local_chat(smol_local, q, 24)[2] for q in questions}
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def run(question: str) -> None:
        try:
            stream = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=24, stream=True,
                                                    messages=[{"role": "user", "content": question}])
            results[question] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert results == expected


def _post(url: str, body: bytes | str | dict) -> tuple[int, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else (body.encode() if isinstance(body, str) else body)
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body, status, param", [
    ('{"model": "SmolLM2-135M-Instruct", "messages": [', 400, None),
    ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": MODEL, "max_tokens": -1, "messages": [{"role": "user", "content": "hi"}]}, 400, "max_tokens"),
    ({"model": MODEL, "max_tokens": "10", "messages": [{"role": "user", "content": "hi"}]}, 400, "max_tokens"),
    ({"model": MODEL, "temperature": "hot", "messages": [{"role": "user", "content": "hi"}]}, 400, "temperature"),
    ({"model": MODEL, "messages": "hi"}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "n": 2, "messages": [{"role": "user", "content": "hi"}]}, 400, None),
    ({"model": MODEL, "max_tokens": 8190, "messages": [{"role": "user", "content": "hi"}]}, 400, None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 9000}]}, 400, None),
])
def test_bad_requests_get_openai_errors(smol_swarm, body, status, param):
    code, reply = _post(f"{smol_swarm.api_url}/chat/completions", body)
    assert code == status, reply
    error = reply["error"]
    assert error["message"] and error["type"] in ("invalid_request_error",)
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param)
    # the server keeps serving
    code, good = _post(f"{smol_swarm.api_url}/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2,
                                                              "temperature": 0})
    assert code == 200 and good["usage"]["completion_tokens"] == 2


def test_over_long_prompt_is_a_400_for_the_openai_client(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="word " * 9000, max_tokens=4)


def test_unknown_model_is_a_404_for_the_openai_client(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])


def test_uncovered_swarm_is_a_503(smol_swarm, smol_dir):
    _, url = smol_swarm.start_api(smol_dir, "--dht-prefix", "nobody-serves-this", "--model-id", MODEL)
    code, reply = _post(f"{url}/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert code == 503 and reply["error"]["code"] == "swarm_not_ready"
    assert "0..29" in reply["error"]["message"]


@pytest.fixture(scope="module")
def probe(smol_swarm):
    """A swarm client of our own, to ask servers for their free cache."""
    from stamen.client.config import ClientConfig
    from stamen.client.swarm import Swarm
    from stamen.types import ModelName

    swarm = Swarm(ModelName(MODEL), 30, ClientConfig(initial_peers=smol_swarm.initial_peers))
    yield swarm
    swarm.shutdown()


def _server_free_cache(probe) -> dict[str, int]:
    from stamen.client import loop
    from stamen.rpc.calls import call_info

    return {s.peer_id: loop.run(call_info(probe.p2p, probe.peer(s.peer_id), 10)).cache_tokens_left
            for s in probe.servers(refresh=True)}


def test_disconnect_mid_stream_frees_the_servers_cache(smol_swarm, probe):
    before = _server_free_cache(probe)
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 500, "stream": True,
                       "temperature": 0}).encode()
    request = urllib.request.Request(f"{smol_swarm.api_url}/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    response = urllib.request.urlopen(request, timeout=60)
    lines = [response.readline() for _ in range(6)]  # a few events: generation is under way
    assert any(line.startswith(b"data: {") for line in lines)
    during = _server_free_cache(probe)
    assert all(during[p] < before[p] for p in before)  # every server holds the session's cache
    response.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while _server_free_cache(probe) != before:
        assert time.monotonic() < deadline, "the servers' cache was not freed after the client left"
        time.sleep(0.2)


def test_disconnect_during_a_non_streamed_request_frees_the_servers_cache_at_once(smol_swarm, probe):
    """A client that gives up on a non-streamed completion (no bytes flow until the end) frees the
    servers' cache within a second or two, not when the generation would have ended."""
    import http.client
    from urllib.parse import urlsplit

    before = _server_free_cache(probe)
    url = urlsplit(smol_swarm.api_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    connection.request("POST", f"{url.path}/completions", json.dumps(
        {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0}),
        {"Content-Type": "application/json"})
    deadline = time.monotonic() + 60
    while not all(free < before[p] for p, free in _server_free_cache(probe).items()):
        assert time.monotonic() < deadline, "the request's session never opened"
        time.sleep(0.1)
    time.sleep(1.0)  # generating (1000 tokens take a minute here)
    connection.close()  # the client goes away without reading a byte
    left = time.monotonic()
    while _server_free_cache(probe) != before:
        assert time.monotonic() - left < 5, "the servers' cache was not freed soon after the client left"
        time.sleep(0.1)
    assert time.monotonic() - left < 3  # a poll (0.2 s), a token, the close, and our own info calls


def _api_metrics(smol_swarm) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    base = smol_swarm.api_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_latency_and_time_to_first_token(smol_swarm, client):
    """``/metrics`` parses with prometheus_client's parser; counters rise with each request."""

    def value(samples, name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    chat = dict(route="/v1/chat/completions", method="POST")
    before = _api_metrics(smol_swarm)
    reply = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8,
                                           messages=[{"role": "user", "content": "What is 2 + 2?"}])
    for _ in client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8, stream=True,
                                            messages=[{"role": "user", "content": "What is 2 + 2?"}]):
        pass
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    after = _api_metrics(smol_swarm)
    assert value(after, "stamen_api_requests_total", status="200", **chat) - \
        value(before, "stamen_api_requests_total", status="200", **chat) == 2
    assert value(after, "stamen_api_requests_total", status="404", **chat) - \
        value(before, "stamen_api_requests_total", status="404", **chat) == 1
    assert value(after, "stamen_api_request_seconds_count", **chat) - \
        value(before, "stamen_api_request_seconds_count", **chat) == 3
    assert value(after, "stamen_api_request_seconds_sum", **chat) > \
        value(before, "stamen_api_request_seconds_sum", **chat)
    for stream in ("true", "false"):  # one generation each way
        ttft = dict(route="/v1/chat/completions", stream=stream)
        assert value(after, "stamen_api_time_to_first_token_seconds_count", **ttft) - \
            value(before, "stamen_api_time_to_first_token_seconds_count", **ttft) == 1
    assert value(after, "stamen_api_tokens_total", kind="completion") - \
        value(before, "stamen_api_tokens_total", kind="completion") == 2 * reply.usage.completion_tokens
    assert value(after, "stamen_api_requests_in_progress") == 1  # the scrape itself
    assert value(after, "stamen_api_requests_total", route="/metrics", method="GET", status="200") >= 1

"""The running server driven by the official `openai` client on the default model (CPU)."""
import json
import random
import socket
import time
import urllib.error
import urllib.request

import openai
import pytest

from conftest import API_KEY
from rawhttp import Stream, request_bytes

CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name three colors of the rainbow."}]


def chat(client, model, **kwargs):
    return client.chat.completions.create(model=model, messages=kwargs.pop("messages", CHAT), **kwargs)


def test_models_lists_the_served_model(client, model):
    models = client.models.list().data
    assert [m.id for m in models] == [model]
    assert client.models.retrieve(model).id == model


def test_chat_completion_reports_text_usage_and_finish_reason(client, model):
    r = chat(client, model, max_tokens=16, temperature=0)
    assert r.object == "chat.completion"
    assert r.model == model
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10
    assert 1 <= r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_equals_the_whole_answer_and_reports_usage(client, model):
    whole = chat(client, model, max_tokens=20, temperature=0)
    chunks = list(chat(client, model, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completions_streamed_and_not(client, model):
    prompt = "The capital of France is"
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    assert whole.object == "text_completion"
    assert whole.choices[0].text
    assert whole.usage.completion_tokens <= 12
    streamed = list(client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert streamed[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_a_stop_string_ends_the_text_before_it(client, model):
    full = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=24, temperature=0).choices[0].text
    # A stop string from the middle of the greedy text, likely spanning a token boundary.
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3, full
    expected = full[: full.index(stop)]
    for stream in (False, True):
        r = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=24, temperature=0, stop=[stop, "never"], stream=stream)
        chunks = list(r) if stream else [r]
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_seed_reproduces_a_sampled_answer(client, model):
    answers = [chat(client, model, max_tokens=24, temperature=1.0, top_p=0.95, seed=1234).choices[0].message.content
               for _ in range(2)]
    assert answers[0] == answers[1]


def test_chat_logprobs_are_the_models_and_greedy_picks_the_top(client, model):
    r = chat(client, model, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    assert bytes(b for e in content for b in e.bytes).decode() .startswith(r.choices[0].message.content)


def test_completion_logprobs_use_the_legacy_shape(client, model):
    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0


@pytest.mark.parametrize("kwargs, status", [
    ({"n": 2}, 400),
    ({"temperature": 5}, 400),
    ({"top_p": 0}, 400),
    ({"max_tokens": 100000}, 400),
    ({"messages": []}, 400),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ({"extra_body": {"frobnicate": True}}, 400),
    ({"model": "no-such-model"}, 404),
])
def test_bad_requests_get_openai_error_objects(client, model, kwargs, status):
    arguments = {"model": model, "messages": CHAT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**arguments)
    assert caught.value.status_code == status
    assert caught.value.body["message"]
    assert caught.value.body["type"] == "invalid_request_error"


def test_a_prompt_longer_than_the_context_is_refused(client, model):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model, prompt="hello " * 9000, max_tokens=4)
    assert caught.value.code == "context_length_exceeded"


def test_a_wrong_api_key_is_refused(server, model):
    other = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        other.models.list()


def raw(server, method, path, body=b"", headers=None):
    request = urllib.request.Request(server.base_url + path, data=body if method == "POST" else None, method=method,
                                     headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", "/v1/chat/completions", b'{"messages": [', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', 400),
    ("POST", "/v1/completions", b'{"prompt": "' + b"a" * (1 << 20) + b'"}', 413),
    ("GET", "/v1/nothing", b"", 404),
    ("DELETE", "/v1/models", b"", 405),
    ("GET", "/v1/completions", b"", 405),
])
def test_malformed_http_requests_get_error_objects(server, method, path, body, status):
    code, payload = raw(server, method, path, body)
    assert code == status
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"}


def test_a_client_that_leaves_mid_stream_cancels_and_the_server_goes_on(server, client, model):
    before = server.metric("fulgur_cancelled_generations_total") or 0
    with chat(client, model, max_tokens=400, temperature=0.8, seed=3, stream=True,
              messages=[{"role": "user", "content": "Write a long story about a lighthouse."}]) as stream:
        for i, _ in enumerate(stream):
            if i == 3:
                break
    # Bounded wait: cancellation lands at the next token the server tries to send.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (server.metric("fulgur_cancelled_generations_total") or 0) <= before:
        time.sleep(0.1)
    assert server.metric("fulgur_cancelled_generations_total") == before + 1
    while time.monotonic() < deadline and server.metric("fulgur_running_generations") != 0:
        time.sleep(0.1)
    assert server.metric("fulgur_running_generations") == 0
    r = chat(client, model, max_tokens=8, temperature=0)
    assert r.choices[0].message.content
    assert server.process.poll() is None


def test_a_client_that_leaves_before_a_whole_answer_cancels_it_and_the_server_goes_on(server, client, model):
    before = server.metric("fulgur_cancelled_generations_total") or 0
    left_before = server.metric('fulgur_http_requests_total{path="/v1/completions",status="499"}') or 0
    assert server.wait_for_metric("fulgur_running_generations", lambda v: v == 0) == 0
    # Greedy counting runs to its limit: without cancellation it would go on long after the client.
    body = json.dumps({"model": model, "prompt": "1, 2, 3, 4,", "max_tokens": 500, "temperature": 0}).encode()
    sock = socket.create_connection((server.host, server.port), timeout=30)
    sock.sendall(request_bytes("POST", "/v1/completions", body, api_key=API_KEY))
    assert server.wait_for_metric("fulgur_running_generations", lambda v: v == 1) == 1
    sock.close()
    # Bounded waits, not speed claims: the generation stops at its next token.
    assert server.wait_for_metric("fulgur_cancelled_generations_total", lambda v: v == before + 1, timeout=20) == before + 1
    assert server.wait_for_metric("fulgur_running_generations", lambda v: v == 0, timeout=20) == 0
    assert server.metric('fulgur_http_requests_total{path="/v1/completions",status="499"}') == left_before + 1
    # A whole answer says that its connection closes (the watcher took over its reading).
    r = client.completions.with_raw_response.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.headers["connection"] == "close"
    assert r.parse().choices[0].text
    assert server.process.poll() is None


def test_a_waiting_client_that_leaves_before_a_whole_answer_gives_its_place_back(start_server):
    s = start_server("--lanes", "1", "--max-queue", "4", "--key-quota", "2", api_keys=("alpha",))
    running = Stream(s.address, "/v1/completions", {"prompt": "1, 2, 3, 4,", "max_tokens": 500, "temperature": 0, "stream": True}, "alpha")
    assert running.next_event()[0] == "data"
    sock = socket.create_connection((s.host, s.port), timeout=30)
    sock.sendall(request_bytes("POST", "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 4}).encode(), api_key="alpha"))
    assert s.wait_for_metric("fulgur_queue_depth", lambda v: v == 1) == 1
    sock.close()
    assert s.wait_for_metric("fulgur_queue_depth", lambda v: v == 0, timeout=20) == 0
    assert s.wait_for_metric("fulgur_cancelled_generations_total", lambda v: v == 1, timeout=20) == 1
    running.close()
    assert s.wait_for_metric("fulgur_running_generations", lambda v: v == 0, timeout=20) == 0
    # The place it gave up was given back: alpha's second admission of 2 is still there.
    alpha = s.client("alpha")
    r = alpha.completions.create(model=alpha.models.list().data[0].id, prompt="Hi", max_tokens=2)
    assert r.usage.completion_tokens >= 1


def test_health_needs_no_key(server):
    with urllib.request.urlopen(server.base_url + "/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok"}


def test_a_fuzzed_body_gets_an_answer_or_an_error_object_and_the_server_goes_on(server, client, model):
    rng = random.Random(6)
    valid = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                        "temperature": 0, "stop": ["\n"]}).encode()
    for _ in range(60):
        body = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(body))
            action = rng.random()
            if action < 0.4:
                body[at] = rng.randrange(256)
            elif action < 0.7:
                del body[at]
            else:
                body.insert(at, rng.choice(b'{}[]",:0-9.eE\\ \x00\xff'))
        code, payload = raw(server, "POST", "/v1/chat/completions", bytes(body))
        assert code == 200 or 400 <= code < 500, (bytes(body), code, payload)
        answer = json.loads(payload)
        assert "choices" in answer if code == 200 else set(answer["error"]) == {"message", "type", "param", "code"}
    assert server.process.poll() is None
    assert chat(client, model, max_tokens=4, temperature=0).choices[0].message.content

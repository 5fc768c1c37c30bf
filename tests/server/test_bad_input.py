"""Malformed and hostile requests against the live server: each gets a well-formed 4xx
OpenAI error object, and afterwards the server still gives the same greedy answer as before.
Clients that leave mid-stream free their lanes (KV slots, throughput first) and queue places,
as /metrics shows."""
import json
import random
import time

import pytest

from conftest import API_KEY
from rawhttp import Stream, exchange, request_bytes

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Say hi."}]


def chat_body(**fields):
    return json.dumps({"messages": USER, "max_tokens": 2, **fields}).encode()


def completion_body(**fields):
    return json.dumps({"prompt": "Hello", "max_tokens": 2, **fields}).encode()


def nested(depth, inner=b"1"):
    return b"[" * depth + inner + b"]" * depth


GREEDY = {"messages": [{"role": "user", "content": "Name three colors of the rainbow."}], "max_tokens": 12, "temperature": 0}


def greedy_answer(server):
    r = exchange(server.address, request_bytes("POST", CHAT, json.dumps(GREEDY).encode(), api_key=API_KEY))
    assert r.status == 200, r.body
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def baseline(server):
    return greedy_answer(server)


def assert_error_object(r, status):
    assert r.status == status, (r.status, r.body[:300])
    assert r.headers.get("content-type") == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    assert isinstance(error["type"], str)
    return error


# (name, method, path, body, status, code): every body is sent with a valid key and
# Content-Length; codes are checked where the cause is unambiguous.
CASES = [
    # Not JSON, or not an object.
    ("empty body", "POST", CHAT, b"", 400, "invalid_json"),
    ("lone brace", "POST", CHAT, b"{", 400, "invalid_json"),
    ("truncated array", "POST", CHAT, b'{"messages": [', 400, "invalid_json"),
    ("missing closing brace", "POST", CHAT, chat_body()[:-1], 400, "invalid_json"),
    ("null", "POST", CHAT, b"null", 400, "invalid_json"),
    ("array", "POST", CHAT, b"[]", 400, "invalid_json"),
    ("string", "POST", CHAT, b'"hello"', 400, "invalid_json"),
    ("number", "POST", CHAT, b"42", 400, "invalid_json"),
    ("trailing comma", "POST", CHAT, b'{"messages": [{"role": "user", "content": "hi"}],}', 400, "invalid_json"),
    ("single quotes", "POST", CHAT, b"{'messages': []}", 400, "invalid_json"),
    ("NaN", "POST", CHAT, chat_body()[:-1] + b', "temperature": NaN}', 400, "invalid_json"),
    ("Infinity", "POST", CHAT, chat_body()[:-1] + b', "temperature": Infinity}', 400, "invalid_json"),
    ("comment", "POST", CHAT, b"// hi\n" + chat_body(), 400, "invalid_json"),
    ("two documents", "POST", CHAT, chat_body() + chat_body(), 400, "invalid_json"),
    ("number beyond double", "POST", CHAT, chat_body()[:-1] + b', "temperature": 1e99999}', 400, "invalid_json"),
    ("unescaped control character", "POST", CHAT, b'{"messages": [{"role": "user", "content": "a\x01b"}]}', 400, "invalid_json"),
    # Invalid UTF-8, raw and escaped.
    ("invalid UTF-8 bytes", "POST", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "invalid_json"),
    ("overlong encoding", "POST", CHAT, b'{"messages": [{"role": "user", "content": "\xc0\xaf"}]}', 400, "invalid_json"),
    ("UTF-8 encoded surrogate", "POST", CHAT, b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', 400, "invalid_json"),
    ("truncated multibyte", "POST", CHAT, b'{"messages": [{"role": "user", "content": "\xe2\x82"}]}', 400, "invalid_json"),
    ("invalid UTF-8 in a key", "POST", CHAT, b'{"mess\xffages": []}', 400, "invalid_json"),
    ("lone surrogate escape", "POST", CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "invalid_json"),
    # Nesting: refused past the parser's limit, and deep but legal nesting does no harm either.
    ("100000 nested arrays", "POST", CHAT, nested(100000), 400, "invalid_json"),
    ("deep nesting in a field", "POST", CHAT, chat_body()[:-1] + b', "x": ' + nested(5000) + b"}", 400, "invalid_json"),
    ("500 levels in an unknown field", "POST", CHAT, chat_body()[:-1] + b', "x": ' + nested(500) + b"}", 400, "unknown_parameter"),
    # Wrong types.
    ("messages a string", "POST", CHAT, json.dumps({"messages": "hi"}).encode(), 400, "invalid_type"),
    ("messages an object", "POST", CHAT, json.dumps({"messages": {"role": "user"}}).encode(), 400, "invalid_type"),
    ("message a number", "POST", CHAT, json.dumps({"messages": [5]}).encode(), 400, "invalid_type"),
    ("content a number", "POST", CHAT, json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "invalid_type"),
    ("content part a string", "POST", CHAT, json.dumps({"messages": [{"role": "user", "content": ["hi"]}]}).encode(), 400, "invalid_type"),
    ("role a number", "POST", CHAT, json.dumps({"messages": [{"role": 7, "content": "hi"}]}).encode(), 400, "invalid_type"),
    ("max_tokens a string", "POST", CHAT, chat_body(max_tokens="10"), 400, "invalid_type"),
    ("max_tokens a fraction", "POST", CHAT, chat_body(max_tokens=1.5), 400, "invalid_type"),
    ("max_tokens 10^30", "POST", CHAT, chat_body(max_tokens=10 ** 30), 400, "invalid_type"),
    ("temperature a string", "POST", CHAT, chat_body(temperature="hot"), 400, "invalid_type"),
    ("top_p a boolean", "POST", CHAT, chat_body(top_p=True), 400, "invalid_type"),
    ("stream a string", "POST", CHAT, chat_body(stream="yes"), 400, "invalid_type"),
    ("stop a number", "POST", CHAT, chat_body(stop=5), 400, "invalid_type"),
    ("stop numbers", "POST", CHAT, chat_body(stop=[1, 2]), 400, "invalid_type"),
    ("seed a string", "POST", CHAT, chat_body(seed="abc"), 400, "invalid_type"),
    ("seed 2^64", "POST", CHAT, chat_body(seed=2 ** 64), 400, "invalid_type"),
    ("model a number", "POST", CHAT, chat_body(model=42), 400, "invalid_type"),
    ("stream_options a string", "POST", CHAT, chat_body(stream=True, stream_options="yes"), 400, "invalid_type"),
    ("prompt an object", "POST", COMPLETIONS, json.dumps({"prompt": {"text": "hi"}}).encode(), 400, "invalid_type"),
    # Values out of range.
    ("max_tokens negative", "POST", CHAT, chat_body(max_tokens=-1), 400, "invalid_value"),
    ("max_tokens zero", "POST", CHAT, chat_body(max_tokens=0), 400, "invalid_value"),
    ("max_tokens over the limit", "POST", CHAT, chat_body(max_tokens=100000), 400, "invalid_value"),
    ("temperature negative", "POST", CHAT, chat_body(temperature=-0.5), 400, "invalid_value"),
    ("temperature 1e308", "POST", CHAT, chat_body(temperature=1e308), 400, "invalid_value"),
    ("top_p zero", "POST", CHAT, chat_body(top_p=0), 400, "invalid_value"),
    ("top_k negative", "POST", CHAT, chat_body(top_k=-5), 400, "invalid_value"),
    ("min_p above 1", "POST", CHAT, chat_body(min_p=2), 400, "invalid_value"),
    ("n zero", "POST", CHAT, chat_body(n=0), 400, "invalid_value"),
    ("top_logprobs 21", "POST", CHAT, chat_body(logprobs=True, top_logprobs=21), 400, "invalid_value"),
    ("top_logprobs without logprobs", "POST", CHAT, chat_body(top_logprobs=2), 400, "invalid_value"),
    ("stream_options without stream", "POST", CHAT, chat_body(stream_options={"include_usage": True}), 400, "invalid_value"),
    ("five stop strings", "POST", CHAT, chat_body(stop=["a", "b", "c", "d", "e"]), 400, "invalid_value"),
    ("no messages", "POST", CHAT, json.dumps({"messages": []}).encode(), 400, "invalid_value"),
    ("unknown role", "POST", CHAT, json.dumps({"messages": [{"role": "root", "content": "hi"}]}).encode(), 400, "invalid_value"),
    ("image content part", "POST", CHAT, json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}).encode(), 400, "invalid_value"),
    ("frequency_penalty", "POST", CHAT, chat_body(frequency_penalty=1), 400, "invalid_value"),
    ("logit_bias", "POST", CHAT, chat_body(logit_bias={"1": 5}), 400, "invalid_value"),
    ("token id beyond the vocabulary", "POST", COMPLETIONS, json.dumps({"prompt": [1, 10 ** 9]}).encode(), 400, "invalid_value"),
    ("negative token id", "POST", COMPLETIONS, json.dumps({"prompt": [-1]}).encode(), 400, "invalid_value"),
    ("several prompts", "POST", COMPLETIONS, json.dumps({"prompt": ["a", "b"]}).encode(), 400, "invalid_value"),
    ("echo", "POST", COMPLETIONS, completion_body(echo=True), 400, "invalid_value"),
    ("prompt longer than the context", "POST", COMPLETIONS, json.dumps({"prompt": "hello " * 9000}).encode(), 400, "context_length_exceeded"),
    # Missing and unknown fields.
    ("missing messages", "POST", CHAT, json.dumps({"max_tokens": 2}).encode(), 400, "missing_required_parameter"),
    ("missing prompt", "POST", COMPLETIONS, json.dumps({"max_tokens": 2}).encode(), 400, "missing_required_parameter"),
    ("missing role", "POST", CHAT, json.dumps({"messages": [{"content": "hi"}]}).encode(), 400, "missing_required_parameter"),
    ("unknown field", "POST", CHAT, chat_body(frobnicate=True), 400, "unknown_parameter"),
    ("unknown message field", "POST", CHAT, json.dumps({"messages": [{"role": "user", "content": "hi", "mood": "x"}]}).encode(), 400, "unknown_parameter"),
    ("unknown stream option", "POST", CHAT, chat_body(stream=True, stream_options={"x": 1}), 400, "unknown_parameter"),
    ("unknown model", "POST", CHAT, chat_body(model="gpt-9"), 404, "model_not_found"),
    # Routes and methods.
    ("unknown route", "GET", "/v1/nothing", b"", 404, "unknown_url"),
    ("path traversal", "GET", "/v1/../../etc/passwd", b"", 404, "unknown_url"),
    ("long path", "GET", "/v1/" + "a" * 6000, b"", 404, "unknown_url"),
    ("DELETE on chat", "DELETE", CHAT, b"", 405, "method_not_allowed"),
    ("PUT on models", "PUT", "/v1/models", b"{}", 405, "method_not_allowed"),
    ("GET on completions", "GET", COMPLETIONS, b"", 405, "method_not_allowed"),
]


@pytest.mark.parametrize("name, method, path, body, status, code", CASES, ids=[c[0] for c in CASES])
def test_a_bad_request_gets_an_error_object(server, baseline, name, method, path, body, status, code):
    r = exchange(server.address, request_bytes(method, path, body, api_key=API_KEY, headers={"Content-Type": "application/json"}))
    error = assert_error_object(r, status)
    assert error["code"] == code, error


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic dGVzdC1rZXk6", "Bearer", "Bearer " + API_KEY + "x", "bearer " + API_KEY])
def test_a_missing_or_wrong_key_gets_401(server, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    r = exchange(server.address, request_bytes("POST", CHAT, chat_body(), headers=headers))
    assert assert_error_object(r, 401)["code"] == "invalid_api_key"


def test_a_body_over_the_limit_gets_413_whether_announced_or_chunked(server):
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'
    announced = exchange(server.address, request_bytes("POST", COMPLETIONS, big, api_key=API_KEY))
    assert assert_error_object(announced, 413)["code"] == "request_too_large"
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 65536]), big[i:i + 65536]) for i in range(0, len(big), 65536)) + b"0\r\n\r\n"
    chunked = exchange(server.address, request_bytes("POST", COMPLETIONS, chunks, api_key=API_KEY, headers={"Transfer-Encoding": "chunked"}))
    assert assert_error_object(chunked, 413)["code"] == "request_too_large"


def test_broken_chunked_encoding_gets_400(server):
    r = exchange(server.address, request_bytes("POST", CHAT, b"zz\r\nhello\r\n0\r\n\r\n", api_key=API_KEY,
                                                headers={"Transfer-Encoding": "chunked"}))
    assert r.status == 400
    if r.body:  # a parse error inside the body reaches the handler: an error object
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_bytes_that_are_not_http_get_a_bare_400_and_the_server_goes_on(server, baseline):
    # Below HTTP's own framing there is no request to answer with JSON: Hummingbird answers 400
    # with an empty body and closes the connection.
    for garbage in [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64), b"HELLO\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n"]:
        r = exchange(server.address, garbage, timeout=30)
        assert r.status == 400
    assert greedy_answer(server) == baseline


@pytest.fixture(scope="module")
def strict_server(request):
    """A server with a short request timeout, for clients that send their body slowly."""
    from conftest import launch
    s = launch("--request-timeout", "2")
    yield s
    s.stop()


@pytest.mark.parametrize("how", ["stalls after part of the body", "trickles the body"])
def test_a_slow_body_gets_408(strict_server, how):
    body = chat_body()
    data = request_bytes("POST", CHAT, body, api_key=API_KEY)
    head = len(data) - len(body)
    if how == "stalls after part of the body":
        r = exchange(strict_server.address, data, send=head + 10)
    else:
        # A byte every 0.25 s: each read resets an idle timer, but not the body's deadline.
        r = exchange(strict_server.address, data, send=head, trickle=(1, 0.25))
    assert assert_error_object(r, 408)["code"] == "request_timeout"
    assert r.headers.get("connection") == "close"


def test_a_stalled_request_head_is_closed_and_the_server_goes_on(strict_server):
    r = exchange(strict_server.address, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    assert r is None or r.status in (400, 408)
    ok = exchange(strict_server.address, request_bytes("POST", CHAT, json.dumps(GREEDY).encode(), api_key=API_KEY))
    assert ok.status == 200


# A seeded fuzzer: structured mutations of valid requests.

# Long strings stay short of a long prefill: the fuzz pass is about parsing, not speed.
HOSTILE_VALUES = [None, True, -1, 0, 2 ** 63, -(2 ** 63), 10 ** 40, 1e308, -1e308, 0.5, "", "x" * 3000, "\u0000",
                  "\U0001F600" * 50, [], [[[[[]]]]], {}, {"a": {"b": {"c": []}}}, ["a"] * 100]

VALID = [
    (CHAT, {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "max_tokens": 2, "temperature": 0, "stop": ["\n"], "stream": False}),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 2,
            "logprobs": True, "top_logprobs": 2, "seed": 1}),
    (COMPLETIONS, {"prompt": "Once", "max_tokens": 2, "top_p": 0.9, "top_k": 5, "logprobs": 1}),
]


def paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, prefix + (i,))


def replace(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replace(value[path[0]], path[1:], new)
    return copy


def mutate(rng, body):
    """Returns (bytes, whether the mutation always makes the request invalid)."""
    kind = rng.choice(["value", "value", "unknown field", "delete", "truncate", "bad utf-8", "deep", "bytes"])
    # max_tokens stays: without it a request may run to the server's limit of 512 tokens.
    mutable_paths = [p for p in paths(body) if p and p != ("max_tokens",)]
    if kind == "value":
        path = rng.choice(mutable_paths)
        return json.dumps(replace(body, path, rng.choice(HOSTILE_VALUES))).encode(), False
    if kind == "unknown field":
        target = rng.choice([p for p in paths(body) if isinstance(eval_path(body, p), dict)])
        return json.dumps(replace(body, target, {**eval_path(body, target), f"zz{rng.randrange(1000)}": 1})).encode(), True
    if kind == "delete":
        path = rng.choice(mutable_paths)
        parent = eval_path(body, path[:-1])
        smaller = {k: v for k, v in parent.items() if k != path[-1]} if isinstance(parent, dict) else [v for i, v in enumerate(parent) if i != path[-1]]
        return json.dumps(replace(body, path[:-1], smaller)).encode(), False
    data = json.dumps(body).encode()
    if kind == "truncate":
        return data[: rng.randrange(1, len(data) - 1)], True
    if kind == "bad utf-8":
        quotes = [i for i, b in enumerate(data) if b == ord('"')]
        at = rng.choice(quotes) + 1
        return data[:at] + rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80"]) + data[at:], True
    if kind == "deep":
        path = rng.choice(mutable_paths)
        return json.dumps(replace(body, path, "DEEP")).encode().replace(b'"DEEP"', nested(rng.choice([600, 3000]))), True
    mutable = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(len(mutable))
        mutable[at] = rng.randrange(256)
    return bytes(mutable), False


def eval_path(value, path):
    for p in path:
        value = value[p]
    return value


def test_a_seeded_fuzz_pass_gets_answers_or_error_objects_and_the_server_answers_the_same_after(server, baseline):
    rng = random.Random(2026)
    statuses = {}
    for i in range(240):
        path, body = rng.choice(VALID)
        data, invalid = mutate(rng, body)
        r = exchange(server.address, request_bytes("POST", path, data, api_key=API_KEY))
        statuses[r.status] = statuses.get(r.status, 0) + 1
        if r.status == 200:
            assert not invalid, data[:200]
            if r.headers.get("content-type") == "text/event-stream":
                assert r.body.endswith(b"data: [DONE]\n\n"), data[:200]
            else:
                assert r.json()["choices"], data[:200]
        else:
            assert 400 <= r.status < 500, (data[:200], r.status, r.body[:300])
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}, data[:200]
    # Mostly refusals, and some mutations that stayed valid were answered.
    assert sum(n for s, n in statuses.items() if s != 200) > 120, statuses
    assert statuses.get(200, 0) > 0, statuses
    assert server.process.poll() is None
    assert greedy_answer(server) == baseline


@pytest.mark.parametrize("flags", [("--lanes", "2"), ("--schedule", "throughput", "--max-batch", "2")], ids=["latency", "throughput"])
def test_clients_that_leave_mid_stream_free_their_lanes_and_places(start_server, flags):
    s = start_server(*flags, "--max-queue", "8")
    payload = {"prompt": "1, 2, 3, 4,", "max_tokens": 400, "temperature": 0, "stream": True}
    before = s.metric("fulgur_cancelled_generations_total") or 0
    streams = [Stream(s.address, COMPLETIONS, payload, API_KEY) for _ in range(4)]
    # Two run (text arrives), two wait (their position arrives).
    for stream in streams:
        kind, _ = stream.next_event()
        assert kind in ("data", "comment")
    assert s.wait_for_metric("fulgur_running_generations", lambda v: v == 2) == 2
    assert s.metric("fulgur_queue_depth") == 2
    assert s.metric("fulgur_reserved_lanes") == 2
    for stream in streams:
        stream.close()
    # Each cancellation lands at the running generation's next token, or at once in the queue.
    assert s.wait_for_metric("fulgur_cancelled_generations_total", lambda v: v == before + 4) == before + 4
    assert s.wait_for_metric("fulgur_running_generations", lambda v: v == 0) == 0
    assert s.metric("fulgur_queue_depth") == 0
    assert s.wait_for_metric("fulgur_reserved_lanes", lambda v: v == 0) == 0
    # And both lanes serve again.
    answers = [s.client().completions.create(model=s.client().models.list().data[0].id, prompt="1, 2, 3, 4,", max_tokens=4, temperature=0)
               for _ in range(2)]
    assert answers[0].choices[0].text == answers[1].choices[0].text != ""

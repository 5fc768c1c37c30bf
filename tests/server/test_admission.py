"""Admission on the live server: lanes, the queue's order and positions, per-key quotas
(latency first and throughput first alike), session length and idle release (latency first;
throughput first refuses sessions), each with short limits set here.

Waits are bounded generously; no test asserts how fast anything is."""
import json
import subprocess
import threading

import openai
import pytest

from conftest import API_KEY, BINARY, ONE_AT_A_TIME
from rawhttp import Stream, exchange, request_bytes

COMPLETIONS = "/v1/completions"
COUNTING = "1, 2, 3, 4,"


def short(**fields):
    return {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, **fields}


def read_all(stream):
    """Comments, text, last JSON event and whether [DONE] came, for a stream read to its end."""
    comments, text, last, done = [], "", None, False
    for kind, value in stream.events():
        if kind == "comment":
            comments.append(value)
        elif kind == "data":
            last = value
            if "choices" in value and value["choices"]:
                text += value["choices"][0]["text"]
        else:
            done = True
    return comments, text, last, done


def post(server, payload, key=API_KEY):
    return exchange(server.address, request_bytes("POST", COMPLETIONS, json.dumps(payload).encode(), api_key=key))


@pytest.mark.parametrize("schedule", ONE_AT_A_TIME)
def test_the_queue_reports_positions_and_admits_in_arrival_order(start_server, schedule):
    s = start_server(*ONE_AT_A_TIME[schedule], "--max-queue", "3")
    # Long enough that the others arrive while it runs.
    running = Stream(s.address, COMPLETIONS, {"prompt": COUNTING, "max_tokens": 200, "temperature": 0, "stream": True}, API_KEY)
    assert running.headers["x-queue-position"] == "0"
    waiting = [Stream(s.address, COMPLETIONS, short(stream=True), API_KEY) for _ in range(3)]
    # Each learns its place on arrival, in the header and as the stream's first comment.
    assert [w.headers["x-queue-position"] for w in waiting] == ["1", "2", "3"]
    # A fourth finds the queue full.
    full = post(s, short())
    assert full.status == 503
    assert full.json()["error"]["code"] == "queue_full"
    assert full.headers["retry-after"] == "1"

    order, lock = [], threading.Lock()
    results = [None] * 3

    def follow(i):
        comments, text = [], ""
        for kind, value in waiting[i].events():
            if kind == "comment":
                comments.append(value)
            elif kind == "data" and value["choices"] and value["choices"][0]["text"] and not text:
                with lock:
                    order.append(i)
                text = value["choices"][0]["text"]
        results[i] = comments

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    assert read_all(running)[3]
    for t in threads:
        t.join(timeout=300)
    assert order == [0, 1, 2]
    # Positions count down as those ahead are admitted.
    assert results[0] == ["queue position 1"]
    assert results[1] == ["queue position 2", "queue position 1"]
    assert results[2] == ["queue position 3", "queue position 2", "queue position 1"]


@pytest.mark.parametrize("schedule", ONE_AT_A_TIME)
def test_a_key_over_its_daily_quota_gets_429_with_a_clear_message(start_server, schedule):
    s = start_server(*ONE_AT_A_TIME[schedule], "--key-quota", "2", api_keys=("alpha", "beta"))
    # The client's own retries stay on: the server tells it not to retry.
    alpha = s.client("alpha", max_retries=2)
    model = alpha.models.list().data[0].id
    for _ in range(2):
        assert alpha.completions.create(model=model, **short()).choices[0].text
    with pytest.raises(openai.RateLimitError) as caught:
        alpha.completions.create(model=model, **short())
    error = caught.value
    assert error.code == "insufficient_quota"
    assert "all 2 of its admissions for today" in error.message
    assert "resets at 00:00 UTC" in error.message
    assert error.response.headers["x-should-retry"] == "false"
    with pytest.raises(openai.RateLimitError):  # a stream is refused before it starts
        alpha.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True)
    # One refusal each: the client did not retry.
    assert s.metric('fulgur_refused_requests_total{reason="quota"}') == 2
    # Quotas are per key.
    assert s.client("beta").completions.create(model=model, **short()).choices[0].text


def test_a_session_keeps_its_lane_for_its_key_until_its_length_runs_out(start_server):
    # Long enough for alpha's second request to come within the session, however slow the machine.
    s = start_server("--lanes", "1", "--session-length", "15", api_keys=("alpha", "beta"))
    first = post(s, short(), key="alpha")
    assert first.status == 200 and first.headers["x-queue-position"] == "0"
    # The lane is alpha's although nothing runs: beta waits ...
    beta = Stream(s.address, COMPLETIONS, short(stream=True), "beta")
    assert beta.headers["x-queue-position"] == "1"
    assert beta.next_event() == ("comment", "queue position 1")
    # ... while alpha's next request goes straight to its lane.
    again = post(s, short(), key="alpha")
    assert again.status == 200 and again.headers["x-queue-position"] == "0"
    assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    assert s.metric("fulgur_queue_depth") == 1
    # When alpha's 15 s are over, beta is admitted and served.
    comments, text, last, done = read_all(beta)
    assert text and done and last["choices"][0]["finish_reason"] in ("stop", "length")
    assert s.metric('fulgur_sessions_ended_total{reason="length"}') >= 1


def test_a_generation_running_when_the_session_ends_is_stopped_with_session_expired(start_server):
    s = start_server("--lanes", "1", "--session-length", "3", api_keys=("alpha",))
    # Greedy counting runs to the 500-token limit: well past 3 s.
    stream = Stream(s.address, COMPLETIONS, {"prompt": COUNTING, "max_tokens": 500, "temperature": 0, "stream": True}, "alpha")
    comments, text, last, done = read_all(stream)
    assert done
    assert last["error"]["code"] == "session_expired", last
    assert "limit of 3 s" in last["error"]["message"]
    assert text  # it ran until the end of the session
    # The next request is a new admission, and served.
    assert post(s, short(), key="alpha").status == 200


def test_an_idle_reserved_lane_is_released_to_the_queue(start_server):
    s = start_server("--lanes", "1", "--session-length", "600", "--idle-release", "5", api_keys=("alpha", "beta"))
    assert post(s, short(), key="alpha").status == 200
    # Without the release beta would wait for alpha's 600 s.
    beta = Stream(s.address, COMPLETIONS, short(stream=True), "beta")
    assert beta.headers["x-queue-position"] == "1"
    comments, text, last, done = read_all(beta)
    assert comments == ["queue position 1"] and text and done
    assert s.metric('fulgur_sessions_ended_total{reason="idle"}') == 1
    # alpha lost its lane: its next request is a new admission that waits for beta's session.
    again = post(s, short(), key="alpha")
    assert again.status == 200 and again.headers["x-queue-position"] == "1"
    assert s.metric('fulgur_sessions_ended_total{reason="idle"}') == 2


def test_throughput_first_refuses_sessions_with_a_usage_error():
    # Refused before the model loads: a session reserves a lane, which batching does not have.
    run = subprocess.run([BINARY, "serve", "--schedule", "throughput", "--api-key", "k", "--session-length", "60", "--port", "0"],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert run.returncode != 0
    assert "--session-length" in run.stderr and "--schedule throughput" in run.stderr, run.stderr


def test_quotas_survive_a_restart_through_the_quota_file(start_server, tmp_path):
    path = tmp_path / "quota.json"
    flags = ("--lanes", "1", "--key-quota", "2", "--quota-file", str(path))
    keys = ("alpha", "beta")
    s = start_server(*flags, api_keys=keys)
    for _ in range(2):
        assert post(s, short(), key="alpha").status == 200
    assert post(s, short(), key="alpha").status == 429
    assert s.stop() == 0
    saved = json.loads(path.read_text())
    assert saved["used"] == {"alpha": 2}
    assert not (tmp_path / "quota.json.tmp").exists()  # renamed over the file, not left beside it

    # A restart on the same file: alpha's admissions today are still used up; beta's are not.
    s = start_server(*flags, api_keys=keys)
    refused = post(s, short(), key="alpha")
    assert refused.status == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    assert post(s, short(), key="beta").status == 200
    assert s.stop() == 0
    assert json.loads(path.read_text())["used"] == {"alpha": 2, "beta": 1}

    # The same file written a day earlier: a new day resets the counts.
    saved = json.loads(path.read_text())
    saved["day"] -= 1
    path.write_text(json.dumps(saved))
    s = start_server(*flags, api_keys=keys)
    assert post(s, short(), key="alpha").status == 200
    assert json.loads(path.read_text())["used"] == {"alpha": 1}


def test_a_corrupt_quota_file_stops_the_server_at_start_and_is_left_alone(tmp_path):
    path = tmp_path / "quota.json"
    path.write_text('{"format": "fulgur-key-quota-1", "day": 3, "used": {"alpha": ')
    run = subprocess.run([BINARY, "serve", "--port", "0", "--api-key", "alpha", "--key-quota", "2", "--quota-file", str(path)],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode != 0
    assert str(path) in run.stderr and "not a quota file" in run.stderr, run.stderr
    assert path.read_text().endswith('"alpha": ')


def test_a_quota_file_needs_a_quota():
    run = subprocess.run([BINARY, "serve", "--port", "0", "--api-key", "k", "--quota-file", "/tmp/never-written.json"],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert run.returncode != 0 and "--quota-file" in run.stderr and "--key-quota" in run.stderr, run.stderr

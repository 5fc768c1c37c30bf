"""SIGTERM and SIGINT: admissions end, running streams finish or end with an error event and
[DONE], and the process exits 0."""
import json
import signal
import urllib.error
import urllib.request

from conftest import API_KEY
from rawhttp import Stream, exchange, request_bytes

COMPLETIONS = "/v1/completions"


def events_after_comments(stream):
    data, done = [], False
    for kind, value in stream.events():
        if kind == "data":
            data.append(value)
        elif kind == "done":
            done = True
    return data, done


def health(server):
    try:
        with urllib.request.urlopen(server.base_url + "/health", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_sigterm_ends_streams_cleanly_and_exits_0(start_server):
    s = start_server("--lanes", "1", "--max-queue", "4", "--shutdown-grace", "8")
    # Greedy counting runs to its 500-token limit, past the grace.
    running = Stream(s.address, COMPLETIONS, {"prompt": "1, 2, 3, 4,", "max_tokens": 500, "temperature": 0, "stream": True}, API_KEY)
    assert running.next_event()[0] == "data"
    waiting = Stream(s.address, COMPLETIONS, {"prompt": "Hi", "max_tokens": 4, "stream": True}, API_KEY)
    assert waiting.next_event() == ("comment", "queue position 1")
    s.process.send_signal(signal.SIGTERM)

    # The waiting request ends at once with an error event, then [DONE].
    data, done = events_after_comments(waiting)
    assert done and data[-1]["error"]["code"] == "server_shutting_down"
    # While the running one has its grace, the server turns new work away and says so.
    status, body = health(s)
    assert (status, body) == (503, {"status": "shutting_down"})
    refused = exchange(s.address, request_bytes("POST", COMPLETIONS, b'{"prompt": "Hi"}', api_key=API_KEY))
    assert refused.status == 503 and refused.json()["error"]["code"] == "server_shutting_down"
    # The running stream ends with an error event (or its finish, had it been shorter), then [DONE].
    data, done = events_after_comments(running)
    assert done
    assert data[-1].get("error", {}).get("code") == "server_shutting_down" or data[-1]["choices"][0]["finish_reason"]
    assert s.process.wait(timeout=60) == 0
    assert "shutting down" in s.log()


def test_sigint_on_an_idle_server_exits_0(start_server):
    s = start_server()
    assert health(s) == (200, {"status": "ok"})
    s.process.send_signal(signal.SIGINT)
    assert s.process.wait(timeout=60) == 0

"""Starts `fulgur serve` on the default model on free loopback ports.

`server` is one server for the whole session; `start_server` starts more with other flags
(admission limits, timeouts) for one test. Every server is always stopped: at the end of its
scope, on an exception, and on SIGTERM (scripts/test bounds the run with `timeout`); pids also
go to $FULGUR_SERVER_PIDFILE so that scripts/test can stop them if Python itself is killed.
"""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from openai import OpenAI

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.environ.get("FULGUR_BIN", os.path.join(ROOT, ".build-test", "release", "fulgur"))
API_KEY = "test-key"
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30


def _exit_on_sigterm(signum, frame):
    # Turns SIGTERM into an exception so that fixtures' finalizers run.
    sys.exit(128 + signum)


signal.signal(signal.SIGTERM, _exit_on_sigterm)


class Server:
    def __init__(self, process, address, log_path, api_key):
        self.process = process
        self.address = address
        self.base_url = f"http://{address}"
        self.log_path = log_path
        self.api_key = api_key

    @property
    def host(self):
        return self.address.split(":")[0]

    @property
    def port(self):
        return int(self.address.split(":")[1])

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def metrics(self):
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        request = urllib.request.Request(self.base_url + "/metrics", headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode()

    def metric(self, name):
        """A sample's value; `name` may carry labels, e.g. 'x_total{reason="idle"}'."""
        match = re.search(rf"^{re.escape(name)} (\S+)$", self.metrics(), re.MULTILINE)
        return float(match.group(1)) if match else None

    def wait_for_metric(self, name, predicate, timeout=60):
        """Polls until predicate(value) holds (a generous bound, not a speed claim); returns the value."""
        deadline = time.monotonic() + timeout
        value = self.metric(name)
        while not predicate(value) and time.monotonic() < deadline:
            time.sleep(0.1)
            value = self.metric(name)
        return value

    def client(self, api_key=None, **kwargs):
        # No retries unless asked: a 4xx or 5xx must reach the test as it is.
        options = {"timeout": 120, "max_retries": 0, **kwargs}
        return OpenAI(base_url=self.base_url + "/v1", api_key=api_key or self.api_key or "none", **options)

    def stop(self, sig=signal.SIGTERM):
        """Stops the server with `sig`; returns its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        _record_pid(self.process.pid, running=False)
        return self.process.returncode


def _record_pid(pid, running=True):
    """Keeps $FULGUR_SERVER_PIDFILE listing the servers still running."""
    pidfile = os.environ.get("FULGUR_SERVER_PIDFILE")
    if not pidfile:
        return
    with open(pidfile) as f:
        pids = [line.strip() for line in f if line.strip() and line.strip() != str(pid)]
    with open(pidfile, "w") as f:
        f.write("".join(f"{p}\n" for p in pids + ([str(pid)] if running else [])))


def launch(*args, api_keys=(API_KEY,)):
    """Starts `fulgur serve` with `args` and waits until it listens."""
    log = tempfile.NamedTemporaryFile(prefix="fulgur-serve-", suffix=".log", delete=False)
    command = [BINARY, "serve", "--host", "127.0.0.1", "--port", "0"]
    for key in api_keys:
        command += ["--api-key", key]
    process = subprocess.Popen(command + list(args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _record_pid(process.pid)
    address = None
    deadline = time.monotonic() + START_TIMEOUT_S
    while address is None and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
        with open(log.name, errors="replace") as f:
            match = re.search(r"Serving \S+ on http://(127\.0\.0\.1:\d+)/v1", f.read())
        address = match and match.group(1)
    if address is None:
        process.kill()
        process.wait()
        _record_pid(process.pid, running=False)
        with open(log.name, errors="replace") as f:
            pytest.fail(f"fulgur serve did not start within {START_TIMEOUT_S} s (exit status {process.poll()}):\n{f.read()}")
    return Server(process, address, log.name, api_keys[0] if api_keys else None)


@pytest.fixture(scope="session")
def server():
    s = launch("--max-queue", "40", "--max-tokens-limit", "512", "--max-body-bytes", str(1 << 20))
    try:
        yield s
    finally:
        s.stop()
        os.unlink(s.log_path)


# Flags for one generation at a time in each schedule: a lane that runs alone, or a batch of one
# slot. Admission (queue order, positions, quotas, refusals) must not depend on which.
ONE_AT_A_TIME = {
    "latency": ("--lanes", "1"),
    "throughput": ("--schedule", "throughput", "--max-batch", "1"),
}


@pytest.fixture(scope="session")
def throughput_server():
    """The session server's flags, throughput first: concurrent requests share forward passes."""
    s = launch("--schedule", "throughput", "--max-batch", "32", "--prefill-chunk", "32",
               "--max-queue", "40", "--max-tokens-limit", "512", "--max-body-bytes", str(1 << 20))
    try:
        yield s
    finally:
        s.stop()
        os.unlink(s.log_path)


@pytest.fixture
def start_server():
    """Starts servers with other flags for one test; all are stopped after it."""
    started = []

    def start(*args, api_keys=(API_KEY,)):
        s = launch(*args, api_keys=api_keys)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
        os.unlink(s.log_path)


@pytest.fixture(scope="session")
def client(server):
    return server.client()


@pytest.fixture(scope="session")
def model(client):
    return client.models.list().data[0].id

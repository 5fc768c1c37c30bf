"""Starts `fulgur serve` on the default model on a free loopback port for the whole session.

The server is always stopped: at the end of the session, on an exception, and on SIGTERM
(scripts/test bounds the run with `timeout`); its pid also goes to $FULGUR_SERVER_PIDFILE so
that scripts/test can stop it if Python itself is killed.
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


def _exit_on_sigterm(signum, frame):
    # Turns SIGTERM into an exception so that fixtures' finalizers run.
    sys.exit(128 + signum)


signal.signal(signal.SIGTERM, _exit_on_sigterm)


class Server:
    def __init__(self, process, address, log_path):
        self.process = process
        self.base_url = f"http://{address}"
        self.log_path = log_path

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def metrics(self):
        request = urllib.request.Request(self.base_url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode()

    def metric(self, name):
        match = re.search(rf"^{re.escape(name)} (\S+)$", self.metrics(), re.MULTILINE)
        return float(match.group(1)) if match else None


@pytest.fixture(scope="session")
def server():
    log = tempfile.NamedTemporaryFile(prefix="fulgur-serve-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [BINARY, "serve", "--host", "127.0.0.1", "--port", "0", "--api-key", API_KEY,
         "--max-queue", "40", "--max-tokens-limit", "512", "--max-body-bytes", str(1 << 20)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    pidfile = os.environ.get("FULGUR_SERVER_PIDFILE")
    if pidfile:
        with open(pidfile, "w") as f:
            f.write(str(process.pid))
    try:
        address = None
        deadline = time.monotonic() + START_TIMEOUT_S
        while address is None and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
            with open(log.name, errors="replace") as f:
                match = re.search(r"Serving \S+ on http://(127\.0\.0\.1:\d+)/v1", f.read())
            address = match and match.group(1)
        if address is None:
            with open(log.name, errors="replace") as f:
                pytest.fail(f"fulgur serve did not start within {START_TIMEOUT_S} s (exit status {process.poll()}):\n{f.read()}")
        yield Server(process, address, log.name)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        if pidfile:
            open(pidfile, "w").close()
        os.unlink(log.name)


@pytest.fixture(scope="session")
def client(server):
    # No retries: a 4xx or 5xx must reach the test as it is.
    return OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, timeout=120, max_retries=0)


@pytest.fixture(scope="session")
def model(client):
    return client.models.list().data[0].id

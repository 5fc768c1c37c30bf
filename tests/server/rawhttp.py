"""HTTP over a bare socket, for requests no client library would send, and SSE streams read
event by event with their comments and headers."""
import http.client
import json
import select
import socket
import struct
import time


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # lower-cased names
        self.body = body

    def json(self):
        return json.loads(self.body)


def _read_all(sock, timeout):
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _dechunk(body):
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out


def parse(data):
    """The response in `data`, or None when the server closed without one."""
    if not data:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    elif "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return Response(status, headers, body)


def exchange(address, data, timeout=60, send=None, trickle=None):
    """Sends `data` and reads the answer until the server closes. `send`: send only that many
    bytes at once; `trickle` = (bytes, seconds): then the rest a few bytes at a time, stopping
    as soon as the server answers."""
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data if send is None else data[:send])
        if trickle and send is not None:
            step, interval = trickle
            for i in range(send, len(data), step):
                if select.select([sock], [], [], interval)[0]:
                    break  # the answer is here: sending more would reset the connection
                try:
                    sock.sendall(data[i: i + step])
                except (BrokenPipeError, ConnectionResetError):
                    break
        return parse(_read_all(sock, timeout))


def request_bytes(method, path, body=b"", headers=None, api_key=None, content_length=True):
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close"]
    if api_key:
        lines.append(f"Authorization: Bearer {api_key}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if content_length and not any(k.lower() in ("content-length", "transfer-encoding") for k in (headers or {})):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Stream:
    """A streamed completion read as it arrives: `headers`, then `next_event()` gives
    ('comment', text), ('data', parsed JSON), ('done', None), or None at the end."""

    def __init__(self, address, path, payload, api_key, timeout=120):
        host, port = address.split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
        self.connection.request("POST", path, json.dumps(payload),
                                {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
        self.response = self.connection.getresponse()
        self.status = self.response.status
        self.headers = {k.lower(): v for k, v in self.response.getheaders()}

    def next_event(self):
        lines = []
        while True:
            line = self.response.readline()
            if not line:
                return None
            line = line.decode().rstrip("\n")
            if line == "":
                if lines:
                    break
                continue
            lines.append(line)
        text = "\n".join(lines)
        if text.startswith(":"):
            return ("comment", text[1:].strip())
        assert text.startswith("data: "), text
        data = text[len("data: "):]
        return ("done", None) if data == "[DONE]" else ("data", json.loads(data))

    def events(self):
        while (event := self.next_event()) is not None:
            yield event

    def close(self):
        """Leaves abruptly, as a client that goes away does."""
        sock = self.connection.sock
        if sock is not None:
            # Linger 0: the close resets the connection at once.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The response's file holds the socket open too.
        self.response.close()
        self.connection.close()

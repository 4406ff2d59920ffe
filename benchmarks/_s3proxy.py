"""A misbehaving front for the test S3 server: a reverse proxy that throttles, resets and goes down.

``ThrottlingProxy`` runs ``python -m benchmarks._s3proxy`` (this file) in its own process session
on a free 127.0.0.1 port, in front of an upstream S3 endpoint (the moto server of
:mod:`benchmarks._s3server`). Every request is forwarded as it came (method, target, headers and
body byte-exact, ``Content-Length`` and ``Transfer-Encoding: chunked`` bodies alike) and the
answer streamed back, except for what a fault takes instead:

- ``throttle`` (a share, 0..1): the request is answered ``503 Slow Down`` with S3's SlowDown XML
  body (~260 bytes, ``application/xml``; no body for HEAD) and never reaches the upstream.
- ``reset`` (a share, 0..1): after the request is read the connection is reset (SO_LINGER 0, then
  close: the client gets an RST and no answer).
- ``down`` (true/false): the listening socket is closed, so connects are refused, and a request
  arriving on a connection opened before is reset; when ``down`` turns false it listens again on
  the same port.
- ``throttle_until`` (a unix time, optional): every request is throttled until then, after which
  the ``throttle`` share applies again.

The faults come from a JSON control file that the test rewrites whenever it likes (atomically,
with ``os.replace``)::

    {"throttle": 0.10, "reset": 0.01, "down": false, "throttle_until": 1767225600.0, "version": "..."}

A missing file (or a missing key) means no fault. The proxy polls the file about every 0.1 s and
applies any change, then writes what it applied to ``<control>.applied`` (JSON: the settings, the
file's ``version``, ``listening``, ``pid``, ``port``). :meth:`ThrottlingProxy.set` writes a new
``version`` and waits until the proxy reports it applied, so a test never races the proxy. The
proxy also answers ``GET /__proxy__/state`` itself with the same JSON (not logged, no draw).

Which request gets a fault is decided by one ``random.Random(seed)``: exactly one draw ``u`` per
request (after ``/__proxy__`` requests and requests refused while down are set aside), in the
order requests arrive: throttled if ``time.time() < throttle_until`` or ``u < throttle``, reset if
``throttle <= u < throttle + reset``, forwarded otherwise. With one client sending one request at a
time, a seed gives the same sequence on every run.

Keep-alive: the proxy keeps the client's connection open across requests (HTTP/1.1 keep-alive,
as S3 does) whatever the upstream does; moto answers every request with ``Connection: close``,
so the proxy opens a new upstream connection when the last one was closed. ``Connection`` and
``Keep-Alive`` are hop-by-hop headers: the proxy replaces the upstream's with its own on the way
back; every other header and every body byte passes unchanged. A request with
``Expect: 100-continue`` gets its ``100 Continue`` from the proxy (the upstream's is dropped).

The request log (``--log``) has one line per request, written before its answer is sent (so when a
client has its answer, the line is in the log), in the access-log format of moto's server, so
:func:`benchmarks._s3server.read_log` and ``Request`` parse it::

    127.0.0.1 - - [06/Dec/2026 21:34:07] "GET /bucket/key?x=1 HTTP/1.1" 200 - forward c3
    127.0.0.1 - - [06/Dec/2026 21:34:07] "GET /bucket/key HTTP/1.1" 503 - throttle c3
    127.0.0.1 - - [06/Dec/2026 21:34:07] "PUT /bucket/key HTTP/1.1" 000 - reset c4
    127.0.0.1 - - [06/Dec/2026 21:34:07] "HEAD /bucket/key HTTP/1.1" 000 - down c4
    127.0.0.1 - - [06/Dec/2026 21:34:07] "GET /bucket/key HTTP/1.1" 502 - upstream-error c5

The status is the upstream's for a forwarded request, ``503`` for a throttled one (moto never
answers 503), ``000`` (``Request.status == 0``) for a reset, ``502`` when the upstream could not
be reached; the word after it names the outcome and ``c<N>`` the client connection (so a test
can see that a client reused its connection). :meth:`ThrottlingProxy.log` returns both.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

CONTROL_PATH = "/__proxy__/state"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_POLL_S = 0.1
_MAX_HEAD = 1 << 20
_BLOCK = 1 << 16
_NO_FAULTS = {"throttle": 0.0, "reset": 0.0, "down": False, "throttle_until": None}


# ---------------------------------------------------------------------------------------------
# The test-side API


@dataclass(frozen=True)
class ProxyRequest:
    """One line of the proxy's log: the request (as ``_s3server`` parses it), what the proxy did
    with it (``forward``, ``throttle``, ``reset``, ``down``, ``upstream-error``) and the number of
    the client connection it came on."""

    request: object  # benchmarks._s3server.Request
    outcome: str
    conn: int


class ThrottlingProxy:
    """The proxy process in front of ``upstream`` (``http://127.0.0.1:PORT``); ``stop()`` ends it.

    ``set(...)`` states the whole fault setting (what it leaves out is "no fault") and returns once
    the proxy applied it.
    """

    def __init__(self, upstream: str, log_path: str, control_path: str, *, seed: int = 0,
                 port: int | None = None, start_timeout: float = 60.0) -> None:
        from winnow.ray.cluster import free_port

        self.upstream = upstream
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.control_path = control_path
        self.applied_path = control_path + ".applied"
        self.seed = seed
        try:
            os.unlink(self.applied_path)
        except FileNotFoundError:
            pass
        open(log_path, "ab").close()
        self._out = open(log_path + ".out", "w")  # noqa: SIM115 - the proxy's stderr until stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._s3proxy", "--upstream", upstream, "--port", str(self.port),
             "--control", control_path, "--log", log_path, "--seed", str(seed)],
            cwd=_REPO, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            self._wait_applied(lambda state: state.get("pid") == self.proc.pid, start_timeout)
        except BaseException:
            self.stop()
            raise

    # -- faults -----------------------------------------------------------------------------

    def set(self, *, throttle: float = 0.0, reset: float = 0.0, down: bool = False,
            throttle_until: float | None = None, timeout: float = 30.0) -> dict:
        """Rewrite the control file (atomically) and wait until the proxy applied it; returns
        what it applied. Called with no argument: no faults."""
        version = uuid.uuid4().hex
        config = {"throttle": float(throttle), "reset": float(reset), "down": bool(down),
                  "throttle_until": None if throttle_until is None else float(throttle_until),
                  "version": version}
        tmp = f"{self.control_path}.{os.getpid()}.{version}.tmp"
        with open(tmp, "w") as f:
            json.dump(config, f)
        os.replace(tmp, self.control_path)
        return self._wait_applied(lambda state: state.get("version") == version, timeout)

    def state(self) -> dict:
        """What the proxy applied last (its ``<control>.applied`` file)."""
        with open(self.applied_path) as f:
            return json.load(f)

    def _wait_applied(self, ok, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                state = self.state()
                if ok(state):
                    return state
            except (FileNotFoundError, ValueError):
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the S3 proxy exited ({self.proc.returncode}); see {self.log_path}.out")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the S3 proxy did not apply its control file in {timeout} s; see {self.log_path}.out")
            time.sleep(0.01)

    # -- clients ----------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The standard AWS environment (as ``S3Server.env()``) pointing at the proxy."""
        from benchmarks._s3server import aws_env

        return aws_env(self.endpoint)

    # -- the log ----------------------------------------------------------------------------

    def mark(self) -> int:
        """A point in the log; the readers below return what came after it. No settling needed:
        the proxy writes a request's line before it answers."""
        return os.path.getsize(self.log_path)

    def log(self, since: int = 0) -> list[ProxyRequest]:
        from benchmarks._s3server import parse_request_line

        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", "replace")
        out = []
        for line in text.splitlines():
            request = parse_request_line(line)
            if request is None:
                continue
            words = line.rsplit(None, 2)
            out.append(ProxyRequest(request, words[-2], int(words[-1].lstrip("c"))))
        return out

    def requests(self, since: int = 0) -> list:
        """The logged requests as ``benchmarks._s3server.Request`` (503: throttled, 0: reset)."""
        return [entry.request for entry in self.log(since)]

    def counts(self, since: int = 0) -> collections.Counter:
        """LIST/GET/HEAD/PUT/POST/DELETE counts, as ``S3Server.counts`` (faulted requests included)."""
        return collections.Counter(r.kind for r in self.requests(since))

    def outcomes(self, since: int = 0) -> collections.Counter:
        """forward/throttle/reset/down/upstream-error counts."""
        return collections.Counter(entry.outcome for entry in self.log(since))

    # -- lifetime ---------------------------------------------------------------------------

    def stop(self) -> None:
        from benchmarks._s3server import stop_group

        stop_group(self.proc)
        self._out.close()

    def __enter__(self) -> ThrottlingProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# The proxy process


class _Closed(Exception):
    """The peer closed its connection in the middle of a message."""


class _Reader:
    """Buffered reads from a socket: heads, lines and counted bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(_BLOCK)
        if not data:
            return False
        self.buf += data
        return True

    def head(self) -> bytes | None:
        """The bytes up to and including the blank line; None at a clean end of stream."""
        start = 0
        while True:
            end = self.buf.find(b"\r\n\r\n", start)
            if end >= 0:
                out = bytes(self.buf[:end + 4])
                del self.buf[:end + 4]
                return out
            start = max(0, len(self.buf) - 3)
            if len(self.buf) > _MAX_HEAD:
                raise _Closed("message head too large")
            if not self._fill():
                if self.buf:
                    raise _Closed("end of stream inside a message head")
                return None

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                out = bytes(self.buf[:end + 1])
                del self.buf[:end + 1]
                return out
            if len(self.buf) > _MAX_HEAD:
                raise _Closed("line too long")
            if not self._fill():
                raise _Closed("end of stream inside a chunked body")

    def some(self, n: int) -> bytes:
        """Up to ``n`` bytes (at least one); b"" at end of stream."""
        if not self.buf and not self._fill():
            return b""
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


def _copy_length(reader: _Reader, n: int, write) -> None:
    while n > 0:
        data = reader.some(min(n, _BLOCK))
        if not data:
            raise _Closed("end of stream inside a body")
        write(data)
        n -= len(data)


def _copy_chunked(reader: _Reader, write) -> None:
    """Pass a chunked body through as it is (chunk lines, extensions, trailers)."""
    while True:
        size_line = reader.line()
        write(size_line)
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:  # trailers, up to the blank line
                trailer = reader.line()
                write(trailer)
                if trailer in (b"\r\n", b"\n"):
                    return
        _copy_length(reader, size + 2, write)  # the data and its CRLF


def _copy_until_close(reader: _Reader, write) -> None:
    while True:
        data = reader.some(_BLOCK)
        if not data:
            return
        write(data)


def _discard(_data: bytes) -> None:
    pass


def _parse_head(head: bytes) -> tuple[list[bytes], dict[str, str]]:
    """The head's lines (start line first, CRLFs kept) and its headers, names lower-cased (the last
    of a repeated header wins)."""
    lines = head.splitlines(keepends=True)[:-1]  # without the blank line
    headers = {}
    for raw in lines[1:]:
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines, headers


def _copy_body(reader: _Reader, headers: dict[str, str], write, *, until_close: bool) -> bool:
    """Copy a message body framed by ``headers``; returns whether the stream ended with it."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        _copy_chunked(reader, write)
    elif "content-length" in headers:
        _copy_length(reader, int(headers["content-length"]), write)
    elif until_close:
        _copy_until_close(reader, write)
        return True
    return False


def _slowdown(head_only: bool, request_number: int, keep_alive: bool) -> bytes:
    digest = hashlib.sha256(f"slowdown-{os.getpid()}-{request_number}".encode()).digest()
    request_id = digest[:8].hex().upper()
    host_id = (digest.hex() + digest[::-1].hex())[:76]
    body = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            '<Message>Please reduce your request rate.</Message>'
            f'<RequestId>{request_id}</RequestId><HostId>{host_id}</HostId></Error>').encode()
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())
    head = (f"HTTP/1.1 503 Slow Down\r\nx-amz-request-id: {request_id}\r\nx-amz-id-2: {host_id}\r\n"
            f"Content-Type: application/xml\r\nContent-Length: {0 if head_only else len(body)}\r\n"
            f"Date: {date}\r\nServer: AmazonS3\r\nConnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    return head.encode() + (b"" if head_only else body)


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _keep_alive(version: str, headers: dict[str, str]) -> bool:
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


class _Proxy:
    def __init__(self, upstream: str, port: int, control: str, log: str, seed: int) -> None:
        url = urlsplit(upstream)
        self.upstream = (url.hostname or "127.0.0.1", url.port or 80)
        self.port = port
        self.control = control
        self.applied = control + ".applied"
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.config = dict(_NO_FAULTS, version=None)
        self.listener: socket.socket | None = None
        self.connections = 0
        self.answered = 0

    # -- control --------------------------------------------------------------------------

    def _read_control(self) -> dict | None:
        """The control file's settings; None when it cannot be parsed (a writer not using
        os.replace caught half-way: try again at the next poll)."""
        try:
            with open(self.control, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return dict(_NO_FAULTS, version=None)
        try:
            data = json.loads(raw)
            return {"throttle": float(data.get("throttle") or 0.0), "reset": float(data.get("reset") or 0.0),
                    "down": bool(data.get("down", False)),
                    "throttle_until": None if data.get("throttle_until") is None else float(data["throttle_until"]),
                    "version": data.get("version")}
        except (ValueError, TypeError, AttributeError):
            return None

    def _state(self) -> dict:
        return dict(self.config, listening=self.listener is not None, pid=os.getpid(), port=self.port)

    def _write_applied(self) -> None:
        tmp = f"{self.applied}.tmp"
        with open(tmp, "w") as f:
            json.dump(self._state(), f)
        os.replace(tmp, self.applied)

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        sock.setblocking(False)
        self.listener = sock

    def _apply(self, config: dict) -> bool:
        """Apply a setting and report it applied; False (try again at the next poll) when the port
        cannot be listened on again yet."""
        if not config["down"] and self.listener is None:
            try:
                self._listen()
            except OSError as exc:
                print(f"cannot listen on port {self.port} again yet: {exc}", file=sys.stderr, flush=True)
                return False
        self.config = config
        if config["down"] and self.listener is not None:
            self.listener.close()
            self.listener = None
        self._write_applied()
        return True

    def serve(self) -> None:
        last = None
        next_poll = 0.0
        while True:
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + _POLL_S
                config = self._read_control()
                if config is not None and config != last and self._apply(config):
                    last = config
            if self.listener is None:
                time.sleep(_POLL_S)
                continue
            ready, _, _ = select.select([self.listener], [], [], max(0.0, next_poll - time.monotonic()))
            if not ready:
                continue
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            conn.setblocking(True)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections += 1
            threading.Thread(target=self._serve_connection, args=(conn, self.connections), daemon=True).start()

    # -- requests -------------------------------------------------------------------------

    def _log(self, method: str, target: str, version: str, status: int, outcome: str, conn: int) -> None:
        stamp = time.strftime("%d/%b/%Y %H:%M:%S")
        line = f'127.0.0.1 - - [{stamp}] "{method} {target} {version}" {status:03d} - {outcome} c{conn}\n'
        os.write(self.log_fd, line.encode("utf-8", "replace"))

    def _decide(self) -> tuple[str, int]:
        with self.lock:
            config = self.config
            u = self.rng.random()
            self.answered += 1
            number = self.answered
        until = config["throttle_until"]
        if (until is not None and time.time() < until) or u < config["throttle"]:
            return "throttle", number
        if u < config["throttle"] + config["reset"]:
            return "reset", number
        return "forward", number

    def _serve_connection(self, client: socket.socket, conn: int) -> None:
        reader = _Reader(client)
        upstream: list = [None, None]  # socket, reader
        try:
            while True:
                head = reader.head()
                if head is None:
                    return
                lines, headers = _parse_head(head)
                method, target, version = (lines[0].decode("latin-1").split() + ["", "", ""])[:3]
                keep = _keep_alive(version, headers)
                if target.startswith("/__proxy__/"):
                    _copy_body(reader, headers, _discard, until_close=False)
                    self._answer_state(client, target, keep)
                    if not keep:
                        return
                    continue
                if self.config["down"]:
                    self._log(method, target, version, 0, "down", conn)
                    _reset(client)
                    return
                outcome, number = self._decide()
                if headers.get("expect", "").lower() == "100-continue":
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                if outcome == "forward":
                    if not self._forward(client, reader, head, method, target, version, headers, keep, upstream, conn):
                        return
                    continue
                _copy_body(reader, headers, _discard, until_close=False)
                if outcome == "reset":
                    self._log(method, target, version, 0, "reset", conn)
                    _reset(client)
                    return
                self._log(method, target, version, 503, "throttle", conn)
                client.sendall(_slowdown(method == "HEAD", number, keep))
                if not keep:
                    return
        except (OSError, _Closed, ValueError):
            return
        finally:
            if upstream[0] is not None:
                upstream[0].close()
            if client.fileno() >= 0:
                client.close()

    def _answer_state(self, client: socket.socket, target: str, keep: bool) -> None:
        if target.split("?", 1)[0] == CONTROL_PATH:
            body, status = json.dumps(self._state()).encode(), "200 OK"
        else:
            body, status = b"unknown proxy path\n", "404 Not Found"
        client.sendall(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                       f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n".encode() + body)

    def _upstream(self, upstream: list) -> tuple[socket.socket, _Reader]:
        sock = upstream[0]
        if sock is not None:
            # Reuse only a connection the upstream has not closed (or written to) meanwhile.
            readable, _, _ = select.select([sock], [], [], 0)
            if readable or upstream[1].buf:
                sock.close()
                sock = upstream[0] = None
        if sock is None:
            sock = socket.create_connection(self.upstream, timeout=None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream[0], upstream[1] = sock, _Reader(sock)
        return upstream[0], upstream[1]

    def _forward(self, client, reader, head, method, target, version, headers, keep, upstream, conn) -> bool:
        """Forward one request and stream its answer back; returns whether the client connection
        stays open."""
        try:
            up, up_reader = self._upstream(upstream)
        except OSError:
            _copy_body(reader, headers, _discard, until_close=False)
            self._log(method, target, version, 502, "upstream-error", conn)
            body = b"upstream unreachable\n"
            client.sendall(f"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                           f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n".encode() + body)
            return keep
        up.sendall(head)
        _copy_body(reader, headers, up.sendall, until_close=False)
        while True:  # skip interim (1xx) answers: the client had its 100 Continue from the proxy
            answer = up_reader.head()
            if answer is None:
                raise _Closed("the upstream closed the connection without answering")
            lines, answer_headers = _parse_head(answer)
            parts = lines[0].decode("latin-1").split(None, 2)
            status = int(parts[1])
            if not 100 <= status < 200 or status == 101:
                break
        no_body = method == "HEAD" or status in (204, 304)
        framed = no_body or "chunked" in answer_headers.get("transfer-encoding", "").lower() \
            or "content-length" in answer_headers
        upstream_keep = _keep_alive(parts[0], answer_headers) and framed
        keep = keep and framed
        kept = [ln for ln in lines if ln.split(b":", 1)[0].strip().lower() not in (b"connection", b"keep-alive")]
        kept.append(f"Connection: {'keep-alive' if keep else 'close'}\r\n".encode())
        self._log(method, target, version, status, "forward", conn)
        client.sendall(b"".join(kept) + b"\r\n")
        if not no_body:
            _copy_body(up_reader, answer_headers, client.sendall, until_close=True)
        if not upstream_keep:
            up.close()
            upstream[0] = upstream[1] = None
        return keep


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT of the S3 server")
    parser.add_argument("--port", type=int, required=True, help="the 127.0.0.1 port to listen on")
    parser.add_argument("--control", required=True, help="the JSON control file (missing: no faults)")
    parser.add_argument("--log", required=True, help="the request log, appended to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault draws")
    args = parser.parse_args(argv)
    _Proxy(args.upstream, args.port, args.control, args.log, args.seed).serve()


if __name__ == "__main__":
    main()

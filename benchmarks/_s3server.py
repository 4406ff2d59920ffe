"""A real S3-compatible server on 127.0.0.1 for the storage tests and benchmarks (moto's standalone
server), and its request log read back as LIST/GET/HEAD/PUT/POST/DELETE counts.

Nothing in winnow knows about this server: tests and benchmarks point the standard AWS environment
at it. It lives here because benchmarks never import ``tests`` (the tests import it from here).
The log is the server's own (one line per request, whichever process sent it: the test, a
child process or a Ray worker), so the counts include every request of a run.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from winnow.ray.cluster import free_port

_LINE = re.compile(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) (\S+) HTTP/[0-9.]+(?:\x1b\[[0-9;]*m)*" (\d{3})')

ACCESS_KEY = "winnowtestkey"
SECRET_KEY = "winnow-test-secret-Zq7x9"  # distinctive, so tests can prove it is never printed
REGION = "us-east-1"


@dataclass(frozen=True)
class Request:
    method: str
    bucket: str
    key: str
    query: dict
    status: int

    @property
    def kind(self) -> str:
        """LIST, GET (an object's bytes), HEAD, PUT, POST (multipart create/complete), DELETE."""
        if self.method == "GET" and not self.key:
            return "LIST"
        return self.method


def aws_env(endpoint: str) -> dict[str, str]:
    """The standard AWS environment pointing at ``endpoint`` with this module's keys."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def parse_request_line(line: str) -> Request | None:
    """The request in one access-log line (``... "GET /bucket/key?q HTTP/1.1" 200 ...``), or None
    for a line that is not one, or one of moto's own ``/moto-api`` calls."""
    m = _LINE.search(line)
    if m is None:
        return None
    method, target, status = m.group(1), m.group(2), int(m.group(3))
    url = urlsplit(target)
    if url.path.startswith("/moto-api"):
        return None
    bucket, _, key = url.path.lstrip("/").partition("/")
    return Request(method, bucket, key, parse_qs(url.query, keep_blank_values=True), status)


def read_log(log_path: str, since: int = 0) -> list[Request]:
    """The requests logged in ``log_path`` after byte offset ``since`` (this server's log or a
    :mod:`benchmarks._s3proxy` log: same line format)."""
    with open(log_path, "rb") as f:
        f.seek(since)
        text = f.read().decode("utf-8", "replace")
    return [r for r in map(parse_request_line, text.splitlines()) if r is not None]


class S3Server:
    """``python -m moto.server`` on a free loopback port; ``stop()`` ends only that process."""

    def __init__(self, log_path: str, *, auth: bool = False) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ)
        if auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # check signatures: unknown keys are refused
        self._log = open(log_path, "w")  # noqa: SIM115 - the server writes to it until stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).read()
                break
            except OSError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start; see {log_path}") from exc
                time.sleep(0.1)

    def env(self) -> dict[str, str]:
        """The standard AWS environment pointing at this server."""
        return aws_env(self.endpoint)

    def create_bucket(self, name: str) -> None:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http", access_key=ACCESS_KEY,
                               secret_key=SECRET_KEY, region=REGION, allow_bucket_creation=True)
        fs.create_dir(name)

    def mark(self) -> int:
        """A point in the request log; :meth:`requests` returns what came after it."""
        self._settle()
        return os.path.getsize(self.log_path)

    def _settle(self) -> None:
        # The server writes a request's line right after answering it: wait until the log
        # stops growing so the last requests of a step are in.
        size = -1
        while size != os.path.getsize(self.log_path):
            size = os.path.getsize(self.log_path)
            time.sleep(0.15)

    def requests(self, since: int = 0) -> list[Request]:
        self._settle()
        return read_log(self.log_path, since)

    def counts(self, since: int = 0) -> collections.Counter:
        return collections.Counter(r.kind for r in self.requests(since))

    def stop(self) -> None:
        stop_group(self.proc)
        self._log.close()


def stop_group(proc: subprocess.Popen) -> None:
    """End a server started with ``start_new_session=True``: its whole process group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

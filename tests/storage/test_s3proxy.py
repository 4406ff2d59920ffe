"""The throttling S3 proxy (benchmarks/_s3proxy.py) in front of the real moto server, driven with
pyarrow's S3FileSystem (the AWS C++ SDK) and botocore.

Every fault change goes through ``ThrottlingProxy.set``, which returns once the proxy applied
it; the proxy logs each request before it answers, so the log is complete when a client has its
answer. Nothing here waits on a guess of how long something takes.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import botocore.config
import botocore.exceptions
import botocore.session
import pyarrow.fs as pafs
import pytest

from benchmarks._s3proxy import ThrottlingProxy
from benchmarks._s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server

BUCKET = "proxytest"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    server = S3Server(str(tmp_path_factory.mktemp("s3log") / "requests.log"))
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def proxy(upstream, tmp_path_factory):
    folder = tmp_path_factory.mktemp("s3proxy")
    with ThrottlingProxy(upstream.endpoint, str(folder / "proxy.log"), str(folder / "control.json"), seed=0) as p:
        yield p


@pytest.fixture(autouse=True)
def no_faults(proxy):
    proxy.set()
    yield
    proxy.set()


def _botocore(endpoint: str):
    # total_max_attempts=1: no retry at all (botocore's ``max_attempts`` counts retries, so
    # max_attempts=1 would still send a failed request twice).
    config = botocore.config.Config(retries={"total_max_attempts": 1}, connect_timeout=10, read_timeout=30)
    return botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY, config=config)


def _pyarrow(proxy: ThrottlingProxy) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{proxy.port}", scheme="http", access_key=ACCESS_KEY,
                             secret_key=SECRET_KEY, region=REGION, connect_timeout=10, request_timeout=30)


def test_env_points_at_the_proxy(proxy, upstream):
    env = proxy.env()
    assert env["AWS_ENDPOINT_URL"] == proxy.endpoint != upstream.endpoint
    assert {k: v for k, v in env.items() if k != "AWS_ENDPOINT_URL"} == \
        {k: v for k, v in upstream.env().items() if k != "AWS_ENDPOINT_URL"}
    assert proxy.state()["listening"] and proxy.state()["port"] == proxy.port


def test_pyarrow_roundtrip_through_the_proxy(proxy, upstream):
    fs = _pyarrow(proxy)
    big = os.urandom(10 * 1024 * 1024 + 12345)  # over pyarrow's part size: a multipart upload
    mark, upstream_mark = proxy.mark(), upstream.mark()
    with fs.open_output_stream(f"{BUCKET}/pa/big.bin") as f:
        f.write(big)
    with fs.open_output_stream(f"{BUCKET}/pa/small.txt") as f:
        f.write(b"small object")
    with fs.open_input_stream(f"{BUCKET}/pa/big.bin") as f:
        assert f.read() == big
    with fs.open_input_file(f"{BUCKET}/pa/big.bin") as f:
        assert f.read_at(8, 100) == big[100:108]
    info = fs.get_file_info(f"{BUCKET}/pa/small.txt")
    assert info.type == pafs.FileType.File and info.size == len(b"small object")
    listed = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/pa"))
    assert sorted((i.base_name, i.size) for i in listed) == [("big.bin", len(big)), ("small.txt", 12)]

    log = proxy.log(mark)
    assert log and {e.outcome for e in log} == {"forward"}
    assert all(200 <= e.request.status < 300 for e in log), [(e.request, e.outcome) for e in log]
    # The proxy's log parses like the server's, and every request reached the server.
    assert proxy.counts(mark) == upstream.counts(upstream_mark)
    print("pyarrow through the proxy:", dict(proxy.counts(mark)))


def test_botocore_keep_alive_sequence(proxy):
    client = _botocore(proxy.endpoint)
    mark = proxy.mark()
    bodies = {f"ka/{i:02d}": os.urandom(100 + i) for i in range(25)}
    for key, body in bodies.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=body)
        assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == body
    log = proxy.log(mark)
    assert [(e.request.method, e.request.status, e.outcome) for e in log] == \
        [(m, 200, "forward") for _ in bodies for m in ("PUT", "GET")]
    assert len({e.conn for e in log}) == 1, "botocore did not reuse its connection through the proxy"
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="ka/")["Contents"]
    assert {o["Key"]: o["Size"] for o in listed} == {k: len(v) for k, v in bodies.items()}
    head = client.head_object(Bucket=BUCKET, Key="ka/07")
    assert head["ContentLength"] == len(bodies["ka/07"])


def test_pyarrow_reuses_connections(proxy):
    fs = _pyarrow(proxy)
    for i in range(5):
        with fs.open_output_stream(f"{BUCKET}/pk/{i}") as f:
            f.write(b"%d" % i * 50)
    mark = proxy.mark()
    for _ in range(10):
        for i in range(5):
            with fs.open_input_stream(f"{BUCKET}/pk/{i}") as f:
                assert f.read() == b"%d" % i * 50
    log = proxy.log(mark)  # a HEAD (the size) and a GET per stream
    assert sorted(e.request.method for e in log) == ["GET"] * 50 + ["HEAD"] * 50
    assert {e.outcome for e in log} == {"forward"} and {e.request.status for e in log} <= {200, 206}
    print(f"pyarrow: {len(log)} requests on {len({e.conn for e in log})} connection(s)")
    assert len({e.conn for e in log}) < 10


def test_throttled_botocore_get_is_slowdown(proxy):
    client = _botocore(proxy.endpoint)
    client.put_object(Bucket=BUCKET, Key="thr/a", Body=b"abc")
    proxy.set(throttle=1.0)
    mark = proxy.mark()
    with pytest.raises(botocore.exceptions.ClientError) as err:
        client.get_object(Bucket=BUCKET, Key="thr/a")
    assert err.value.response["Error"]["Code"] == "SlowDown"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    with pytest.raises(botocore.exceptions.ClientError) as err:
        client.head_object(Bucket=BUCKET, Key="thr/a")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert [(e.request.method, e.request.status, e.outcome) for e in proxy.log(mark)] == \
        [("GET", 503, "throttle"), ("HEAD", 503, "throttle")]
    proxy.set()
    assert client.get_object(Bucket=BUCKET, Key="thr/a")["Body"].read() == b"abc"  # same connection, still usable


def test_throttled_pyarrow_ranged_read(proxy):
    fs = _pyarrow(proxy)
    data = bytes(range(256)) * 4
    with fs.open_output_stream(f"{BUCKET}/thr/ranged.bin") as f:
        f.write(data)
    f = fs.open_input_file(f"{BUCKET}/thr/ranged.bin")  # its HEAD, unthrottled
    proxy.set(throttle=1.0)
    mark = proxy.mark()
    with pytest.raises(OSError) as err:
        f.read_at(8, 100)
    message = str(err.value)
    flush = "Failed to flush response stream" in message
    slowdown = any(s in message for s in ("SLOW_DOWN", "SlowDown", "503"))
    print(f"pyarrow's throttled 8-byte ranged read ({'the SDK flush bug' if flush else 'SlowDown'}): {message}")
    assert flush or slowdown, message
    log = proxy.log(mark)
    assert log and all((e.request.method, e.request.status, e.outcome) == ("GET", 503, "throttle") for e in log)
    print(f"pyarrow sent the ranged GET {len(log)} time(s)")
    proxy.set()
    assert f.read_at(8, 100) == data[100:108]


def _head_statuses(proxy: ThrottlingProxy, n: int) -> list[int]:
    client = _botocore(proxy.endpoint)
    statuses = []
    for _ in range(n):
        try:
            client.head_object(Bucket=BUCKET, Key="share/obj")
            statuses.append(200)
        except botocore.exceptions.ClientError as exc:
            statuses.append(exc.response["ResponseMetadata"]["HTTPStatusCode"])
    return statuses


def test_throttle_share_is_seeded(upstream, tmp_path):
    _botocore(upstream.endpoint).put_object(Bucket=BUCKET, Key="share/obj", Body=b"x")
    seed, share, n = 1234, 0.3, 200
    runs = []
    for run in ("a", "b"):
        with ThrottlingProxy(upstream.endpoint, str(tmp_path / f"{run}.log"), str(tmp_path / f"{run}.json"),
                             seed=seed) as p:
            p.set(throttle=share)
            statuses = _head_statuses(p, n)
            assert [r.status for r in p.requests()] == statuses
            runs.append(statuses)
    assert runs[0] == runs[1]
    rng = random.Random(seed)  # the documented contract: one draw per request, throttled below the share
    assert runs[0] == [503 if rng.random() < share else 200 for _ in range(n)]
    throttled = runs[0].count(503) / n
    print(f"seed {seed}: {throttled:.1%} of {n} HEADs throttled")
    assert 0.15 <= throttled <= 0.45
    assert set(runs[0]) == {200, 503}


def test_reset_is_a_connection_error(proxy):
    client = _botocore(proxy.endpoint)
    client.put_object(Bucket=BUCKET, Key="rst/a", Body=b"abc")
    proxy.set(reset=1.0)
    mark = proxy.mark()
    with pytest.raises(botocore.exceptions.BotoCoreError) as err:
        client.get_object(Bucket=BUCKET, Key="rst/a")
    print(f"botocore on a reset: {type(err.value).__name__}: {err.value}")
    assert isinstance(err.value, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError))
    assert [(e.request.method, e.request.status, e.outcome) for e in proxy.log(mark)] == [("GET", 0, "reset")]

    fs = _pyarrow(proxy)
    with pytest.raises(OSError) as err:
        fs.open_input_stream(f"{BUCKET}/rst/a").read()
    print(f"pyarrow on a reset: {err.value}")
    proxy.set()
    assert client.get_object(Bucket=BUCKET, Key="rst/a")["Body"].read() == b"abc"


def test_down_then_up_on_the_same_port(proxy):
    client = _botocore(proxy.endpoint)
    client.put_object(Bucket=BUCKET, Key="down/a", Body=b"abc")  # botocore now holds a connection
    port = proxy.port
    state = proxy.set(down=True)
    assert state["down"] and not state["listening"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    mark = proxy.mark()
    with pytest.raises(botocore.exceptions.BotoCoreError):  # on the connection it held: reset
        client.get_object(Bucket=BUCKET, Key="down/a")
    with pytest.raises(botocore.exceptions.EndpointConnectionError):  # a new connection: refused
        client.get_object(Bucket=BUCKET, Key="down/a")
    assert [e.outcome for e in proxy.log(mark)] == ["down"]

    state = proxy.set(down=False)
    assert state["listening"] and state["port"] == port and proxy.endpoint == f"http://127.0.0.1:{port}"
    socket.create_connection(("127.0.0.1", port), timeout=10).close()
    assert client.get_object(Bucket=BUCKET, Key="down/a")["Body"].read() == b"abc"
    with _pyarrow(proxy).open_input_stream(f"{BUCKET}/down/a") as f:
        assert f.read() == b"abc"


def test_throttle_until(proxy):
    client = _botocore(proxy.endpoint)
    client.put_object(Bucket=BUCKET, Key="until/a", Body=b"abc")

    def status() -> int:
        try:
            client.head_object(Bucket=BUCKET, Key="until/a")
            return 200
        except botocore.exceptions.ClientError as exc:
            return exc.response["ResponseMetadata"]["HTTPStatusCode"]

    proxy.set(throttle_until=time.time() + 3600)
    assert [status() for _ in range(5)] == [503] * 5
    proxy.set(throttle_until=time.time() - 1)
    assert [status() for _ in range(5)] == [200] * 5

    until = time.time() + 2.0
    proxy.set(throttle_until=until)
    first = status()
    if time.time() < until:  # answered before the deadline, so decided before it
        assert first == 503
    while time.time() <= until:  # waiting for the clock, not for the proxy
        time.sleep(until - time.time() + 0.01)
    assert [status() for _ in range(5)] == [200] * 5  # then the file's share: none


def _fake_upstream(answer: bytes, captured: list[bytes], ready: threading.Event) -> socket.socket:
    """A one-connection upstream that keeps the raw bytes of one request (its chunked body ends
    with the trailer block) and sends ``answer``."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = server.accept()
        with conn:
            data = b""
            while not data.endswith(b"X-Trailer: t\r\n\r\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            captured.append(data)
            conn.sendall(answer)
            ready.set()

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_chunked_bodies_pass_byte_exact(tmp_path):
    request = (b"PUT /bucket/key?x=1 HTTP/1.1\r\nHost: example\r\nX-Custom:  spaced value \r\n"
               b"Transfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nhello\r\n1A\r\n" + bytes(range(65, 91)) + b"\r\n0\r\nX-Trailer: t\r\n\r\n")
    body = b"4\r\nabcd\r\n3;e\r\nxyz\r\n0\r\n\r\n"
    answer = (b"HTTP/1.1 200 OK\r\nX-Up: 1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body)
    captured: list[bytes] = []
    done = threading.Event()
    server = _fake_upstream(answer, captured, done)
    port = server.getsockname()[1]
    try:
        with ThrottlingProxy(f"http://127.0.0.1:{port}", str(tmp_path / "p.log"), str(tmp_path / "c.json")) as p:
            with socket.create_connection(("127.0.0.1", p.port), timeout=30) as conn:
                conn.sendall(request)
                got = b""
                while not got.endswith(b"0\r\n\r\n"):
                    chunk = conn.recv(65536)
                    assert chunk, got
                    got += chunk
            assert done.wait(30)
            assert captured == [request]
            head, _, got_body = got.partition(b"\r\n\r\n")
            assert got_body == body
            # Connection is hop-by-hop: the proxy keeps the client's connection alive.
            assert head.split(b"\r\n") == [b"HTTP/1.1 200 OK", b"X-Up: 1", b"Transfer-Encoding: chunked",
                                           b"Connection: keep-alive"]
            assert [(e.request.method, e.request.bucket, e.request.key, e.request.query, e.request.status, e.outcome)
                    for e in p.log()] == [("PUT", "bucket", "key", {"x": ["1"]}, 200, "forward")]
    finally:
        server.close()

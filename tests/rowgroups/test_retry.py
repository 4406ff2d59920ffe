"""The one storage retry policy (``winnow.rowgroups.retry``): which errors are transient, that a
call rides them out within its deadline and counts them, that everything else fails at once,
that throttling slows the process down, and that a conditional write whose answer was lost is
checked, not repeated blindly. Faults here are injected by functions that raise (named so)."""

from __future__ import annotations

import time

import pytest

from winnow.exceptions import StorageError, StorageUnavailable
from winnow.rowgroups import retry

TRANSIENT = [
    ("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.", "throttled"),
    ("AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body.", "throttled"),
    ("AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush response stream (eof: 0, bad: 1)",
     "transient"),
    ("AWS Error SERVICE_UNAVAILABLE during GetObject operation: Service Unavailable", "throttled"),
    ("An error occurred (SlowDown) when calling the GetObject operation: Please reduce your request rate.",
     "throttled"),
    ("An error occurred (503) when calling the HeadObject operation: Service Unavailable", "throttled"),
    ("An error occurred (TooManyRequests) when calling the PutObject operation: slow", "throttled"),
    ("An error occurred (InternalError) when calling the PutObject operation: We encountered an internal error",
     "transient"),
    ("An error occurred (502) when calling the GetObject operation: Bad Gateway", "transient"),
    ("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 56, Failure when receiving data from the "
     "peer (Connection reset by peer)", "unreachable"),
    ("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Couldn't connect to server",
     "unreachable"),
    ("Could not connect to the endpoint URL: \"http://127.0.0.1:9/b/k\"", "unreachable"),
]
PERMANENT = [
    "AWS Error ACCESS_DENIED during HeadObject operation: No response body.",
    "An error occurred (AccessDenied) when calling the GetObject operation: Access Denied",
    "An error occurred (InvalidAccessKeyId) when calling the PutObject operation: bad key",
    "An error occurred (NoSuchBucket) when calling the PutObject operation: nope",
    "AWS Error NO_SUCH_BUCKET during HeadObject operation: The specified bucket does not exist",
    "An error occurred (PreconditionFailed) when calling the PutObject operation: At least one of the pre-conditions",
    "AWS Error UNKNOWN (HTTP status 403) during HeadObject operation: No response body.",
]


@pytest.mark.parametrize("text,kind", TRANSIENT)
def test_transient_errors_are_classified(text, kind):
    assert retry.classify_transient(OSError(text)) == kind


@pytest.mark.parametrize("text", PERMANENT)
def test_other_errors_fail_at_once(text):
    assert retry.classify_transient(OSError(text)) is None


def test_missing_objects_and_exhausted_calls_are_not_retried_again():
    assert retry.classify_transient(FileNotFoundError("s3://b/k")) is None
    assert retry.classify_transient(StorageUnavailable("SlowDown: still failing")) is None
    assert retry.classify_transient(ConnectionResetError(104, "reset")) == "transient"


def _failing(times: int, text: str, result="ok"):
    """A fake storage call (fault injection): raises ``text`` ``times`` times, then answers."""
    calls = []

    def fn():
        calls.append(time.monotonic())
        if len(calls) <= times:
            raise OSError(text)
        return result

    return fn, calls


FAST = retry.Policy(deadline_s=30.0, base_s=0.001, cap_s=0.01)


def test_a_throttled_call_is_retried_and_counted():
    before = retry.counts()
    fn, calls = _failing(3, "An error occurred (SlowDown) when calling the GetObject operation: reduce")
    assert retry.call(fn, what="GET s3://b/k", target="test-throttled/b", policy=FAST) == "ok"
    assert len(calls) == 4
    assert retry.counts_since(before) == {"storage_retries": 3, "storage_throttled": 3}


def test_a_permanent_error_is_raised_at_once_uncounted():
    before = retry.counts()
    fn, calls = _failing(5, "An error occurred (AccessDenied) when calling the GetObject operation: no")
    with pytest.raises(OSError, match="AccessDenied"):
        retry.call(fn, what="GET s3://b/k", target="test-denied/b", policy=FAST)
    assert len(calls) == 1 and retry.counts_since(before) == {"storage_retries": 0, "storage_throttled": 0}


def test_past_the_deadline_the_error_says_the_store_throttled_and_what_to_do():
    fn, calls = _failing(10**6, "An error occurred (SlowDown) when calling the GetObject operation: reduce")
    policy = retry.Policy(deadline_s=0.2, base_s=0.001, cap_s=0.01)
    with pytest.raises(StorageUnavailable) as err:
        retry.call(fn, what="GET s3://b/k", target="test-deadline/b", policy=policy)
    text = str(err.value)
    assert isinstance(err.value, OSError) and isinstance(err.value, StorageError)
    assert "throttled" in text and "fewer concurrent workers" in text and retry.DEADLINE_ENV in text
    assert "GET s3://b/k" in text and len(calls) > 2


def test_an_endpoint_never_reached_fails_in_seconds_one_reached_before_is_waited_for(monkeypatch):
    monkeypatch.setattr(retry, "UNREACHED_S", 0.1)
    refused = "AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Couldn't connect to server"
    fn, calls = _failing(10**6, refused)
    with pytest.raises(StorageUnavailable):
        retry.call(fn, what="HEAD s3://b/k", target="test-never/b", policy=FAST)
    assert calls[-1] - calls[0] < 5
    ok, _ = _failing(0, "")
    retry.call(ok, what="HEAD s3://b/k", target="test-outage/b", policy=FAST)  # reached once
    fn, calls = _failing(40, refused)
    assert retry.call(fn, what="HEAD s3://b/k", target="test-outage/b", policy=FAST) == "ok"
    assert len(calls) == 41


def test_dense_throttle_answers_turn_pacing_on_and_successes_turn_it_off_again():
    p = retry.Pacer()
    for _ in range(20):
        p.wait()
    for _ in range(5):  # 5 throttle answers among 20 requests: dense
        p.throttled()
    assert p.rate is not None and p.rate <= 10
    for _ in range(3):
        p.succeeded()
    assert p.rate is not None  # raised, still on
    for _ in range(100):
        p.succeeded()
    assert p.rate is None  # back above twice the rate before: off


def test_the_odd_throttled_request_does_not_slow_the_process():
    p = retry.Pacer()
    for _ in range(40):
        p.wait()
    p.throttled()
    p.throttled()  # 2 of 40: a retry answers them, no pacing
    assert p.rate is None


def test_a_paced_process_spaces_its_requests():
    p = retry.Pacer()
    p.rate = 20.0  # as after throttling: 20 requests per second at most
    t0 = time.monotonic()
    for _ in range(6):
        p.wait()
    assert time.monotonic() - t0 >= 5 / 20 - 0.01


def test_on_retry_runs_before_each_new_try():
    seen = []
    fn, calls = _failing(2, "Connection reset by peer")
    retry.call(fn, what="PUT s3://b/k", target="test-onretry/b", policy=FAST, on_retry=seen.append)
    assert len(seen) == 2 and all("reset" in str(e) for e in seen)

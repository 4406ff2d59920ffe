"""What to do when the object store answers badly: which errors are transient, how long to wait
before trying again, how fast to go when the store throttles, and how many times that happened.

Every request winnow sends to an object store goes through :func:`call` (the filesystem of
:func:`winnow.rowgroups.fs.resolve_filesystem` and the botocore client of its conditional writes
both use it), so one policy holds everywhere:

* **Transient** (tried again): throttling (``503 SlowDown``, ``429``, ``TooManyRequests``,
  ``RequestLimitExceeded``), ``500``/``502``/``503``/``504``, connections reset, refused or timed
  out, and the AWS C++ SDK's ``INTERNAL_FAILURE`` "Failed to flush response stream", which is
  how pyarrow's S3 filesystem reports a throttle answer to a small ranged GET (the error body
  overflows the range's buffer). Everything else (403, bad credentials, a missing bucket, a
  missing object) fails at once.
* **Backoff**: exponential with full jitter (a uniform wait in ``[0, min(cap, base * 2^n)]``),
  for as long as the call's deadline allows (:data:`DEADLINE_S`, ``WINNOW_STORAGE_DEADLINE_S``).
* **Pacing**: when throttle answers are dense (a quarter of the recent requests), the request
  rate this process allows itself towards that bucket is halved; each success raises it by 5 %
  until pacing is off again (the idea of botocore's "adaptive" retry mode, applied to every
  client of the process; see :class:`Pacer`). Workers of one run
  that are all throttled thereby slow down instead of retrying at full speed.
* **Counts**: :func:`counts` (``storage_retries``, ``storage_throttled``) since the process
  started; tasks report their difference into the run's summary.

Nothing here imports pyarrow or botocore: errors are classified by their type names and text.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from winnow.exceptions import StorageUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Default time one storage call may spend retrying (seconds).
DEADLINE_S = 120.0
DEADLINE_ENV = "WINNOW_STORAGE_DEADLINE_S"
#: First backoff step and its cap (seconds).
BASE_S = 0.1
CAP_S = 5.0

_THROTTLE_MARKS = (
    "SlowDown", "SLOW_DOWN", "Please reduce your request rate", "TooManyRequests", "TOO_MANY_REQUESTS",
    "RequestLimitExceeded", "REQUEST_LIMIT_EXCEEDED", "Throttl", "THROTTL", "HTTP status 429", "(429)",
    "status code: 429", "rateLimitExceeded",
    # S3 answers 503 for "reduce your request rate" with or without the SlowDown code (a HEAD's
    # answer has no body to say which): every 503 counts as throttling.
    "HTTP status 503", "(503)", "status code: 503", "SERVICE_UNAVAILABLE", "ServiceUnavailable",
)
_TRANSIENT_MARKS = (
    "Failed to flush response stream", "InternalError",
    "HTTP status 500", "HTTP status 502", "HTTP status 504",
    "(500)", "(502)", "(504)", "status code: 500", "status code: 502", "status code: 504",
    "RequestTimeout", "REQUEST_TIMEOUT", "NETWORK_CONNECTION", "curlCode",
    "Connection reset", "connection reset", "Connection refused", "connection refused",
    "Couldn't connect", "Could not connect", "Connection was closed", "Connection aborted",
    "Broken pipe", "timed out", "Timeout was reached", "Recv failure", "Send failure",
    "Empty reply from server", "Server disconnected", "BadDigest", "IncompleteRead",
    "Connection broken", "RemoteDisconnected", "Couldn't resolve host",
)
#: Connection errors that also mean a wrong endpoint: retried as long as the deadline allows
#: once this process has reached the target, and only :data:`UNREACHED_S` before it ever has
#: (a setting to fix fails in seconds, an outage of a store that answered before is ridden out).
_UNREACHABLE_MARKS = (
    "Connection refused", "connection refused", "Couldn't connect", "Could not connect",
    "Couldn't resolve host", "EndpointConnectionError", "ConnectTimeout", "curlCode: 7", "curlCode: 6",
    "curlCode: 28", "NETWORK_CONNECTION",
)
UNREACHED_S = 8.0
_TRANSIENT_TYPES = (
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ConnectionError", "ConnectionResetError", "ConnectionRefusedError", "ConnectionAbortedError",
    "BrokenPipeError", "TimeoutError", "IncompleteReadError", "ResponseStreamingError", "ProtocolError",
)


def classify_transient(exc: BaseException) -> str | None:
    """``"throttled"``, ``"unreachable"`` (no connection), ``"transient"`` or None (fail at
    once) for an error of a storage call.

    >>> classify_transient(OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate."))
    'throttled'
    >>> sdk_bug = "AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush response stream (eof: 0, bad: 1)"
    >>> classify_transient(OSError(sdk_bug))
    'transient'
    >>> classify_transient(OSError("AWS Error ACCESS_DENIED during HeadObject operation: No response body."))
    >>> classify_transient(FileNotFoundError("x"))
    """
    if isinstance(exc, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
                        StorageUnavailable)):
        return None  # (a StorageUnavailable has been retried already, until its deadline)
    text = f"{type(exc).__name__}: {exc}"
    if any(m in text for m in _THROTTLE_MARKS):
        return "throttled"
    if any(m in text for m in _UNREACHABLE_MARKS):
        return "unreachable"
    if any(m in text for m in _TRANSIENT_MARKS):
        return "transient"
    names = {t.__name__ for t in type(exc).__mro__}
    if names & set(_TRANSIENT_TYPES):
        return "transient"
    return None


# ---- counts ----------------------------------------------------------------------------------

_COUNT_LOCK = threading.Lock()
_COUNTS = {"storage_retries": 0, "storage_throttled": 0}
COUNT_NAMES = tuple(_COUNTS)


def counts() -> dict[str, int]:
    """Retried and throttled storage requests of this process so far."""
    with _COUNT_LOCK:
        return dict(_COUNTS)


def counts_since(before: dict[str, int]) -> dict[str, int]:
    """What :func:`counts` grew by since ``before`` (another of its answers)."""
    now = counts()
    return {k: now[k] - before.get(k, 0) for k in now}


def _count(kind: str) -> None:
    with _COUNT_LOCK:
        _COUNTS["storage_retries"] += 1
        if kind == "throttled":
            _COUNTS["storage_throttled"] += 1


# ---- pacing ----------------------------------------------------------------------------------

class Pacer:
    """Client-side rate limit towards one bucket. Off until throttle answers are dense (at
    least :data:`DENSE` of the requests of the last :data:`WINDOW_S` seconds, and 3 of them): a
    store over its request-rate limit, not the odd throttled request, which a retry answers.
    Then the rate this process asked for is halved (at most once per half second while they stay
    dense); each success raises it 5 %, and pacing is off again once it is back above twice the
    rate it had when pacing began."""

    MIN_RATE = 1.0
    WINDOW_S = 2.0
    DENSE = 0.25

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rate: float | None = None
        self._next = 0.0
        self._recent: deque[float] = deque()
        self._throttles: deque[float] = deque()
        self._cut_at = 0.0
        self._unpaced = 0.0
        #: Whether a request of this process ever got an answer from the target.
        self.reached = False

    def _trim(self, now: float) -> None:
        for q in (self._recent, self._throttles):
            while q and q[0] < now - self.WINDOW_S:
                q.popleft()

    def _measured(self, now: float) -> float:
        self._trim(now)
        return max(len(self._recent) / self.WINDOW_S, self.MIN_RATE)

    def wait(self) -> None:
        """Before a request: wait for this process's turn when pacing is on."""
        with self._lock:
            now = time.monotonic()
            self._recent.append(now)
            if self.rate is None:
                return
            slot = max(now, self._next)
            self._next = slot + 1.0 / self.rate
            delay = slot - now
        if delay > 0:
            time.sleep(delay)

    def throttled(self) -> None:
        with self._lock:
            now = time.monotonic()
            self._throttles.append(now)
            measured = self._measured(now)
            dense = len(self._throttles) >= 3 and len(self._throttles) >= self.DENSE * len(self._recent)
            if not dense or now - self._cut_at < self.WINDOW_S / 4:
                return
            self._cut_at = now
            if self.rate is None:
                self._unpaced = measured
            self.rate = max(self.MIN_RATE, min(self.rate or measured, measured) / 2)

    def succeeded(self) -> None:
        self.reached = True
        if self.rate is None:
            return
        with self._lock:
            if self.rate is None:
                return
            self.rate *= 1.05
            if self.rate > 2 * self._unpaced:
                self.rate = None  # back where it was before the store throttled: pacing off


_PACERS: dict[str, Pacer] = {}
_PACER_LOCK = threading.Lock()


def pacer(target: str) -> Pacer:
    """The one :class:`Pacer` of this process for ``target`` (an endpoint and bucket)."""
    with _PACER_LOCK:
        p = _PACERS.get(target)
        if p is None:
            p = _PACERS[target] = Pacer()
        return p


# ---- the call --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Policy:
    deadline_s: float = DEADLINE_S
    base_s: float = BASE_S
    cap_s: float = CAP_S

    @classmethod
    def default(cls) -> Policy:
        raw = os.environ.get(DEADLINE_ENV)
        if not raw:
            return cls()
        try:
            return cls(deadline_s=max(0.0, float(raw)))
        except ValueError:
            logger.warning("%s=%r is not a number of seconds; using %s", DEADLINE_ENV, raw, DEADLINE_S)
            return cls()


def gave_up(what: str, last: BaseException, tries: int, throttled: int, seconds: float) -> StorageUnavailable:
    """The error of a call whose transient errors lasted past its deadline: the last error, how
    many tries it took, whether the store throttled, and what to do."""
    if throttled:
        advice = (f" The store throttled {throttled} of {tries} tries (503 SlowDown / 429): run fewer concurrent "
                  "workers (max_partitions, the Ray cluster's size), put the run root under another prefix, or "
                  f"ask for a higher request-rate limit on the bucket; or allow longer with {DEADLINE_ENV}.")
    else:
        advice = f" Rerun to retry, or allow longer with {DEADLINE_ENV}."
    exc = StorageUnavailable(f"{what}: still failing after {tries} tries in {seconds:.0f} s: "
                             f"{type(last).__name__}: {last}.{advice}")
    exc.throttled = throttled
    return exc


def call(fn: Callable[[], T], *, what: str, target: str = "", policy: Policy | None = None,
         on_retry: Callable[[BaseException], None] | None = None,
         also: Callable[[BaseException], str | None] | None = None) -> T:
    """``fn()``, tried again on transient errors with backoff and pacing towards ``target``
    until the policy's deadline; then :func:`gave_up`'s
    :class:`~winnow.exceptions.StorageUnavailable` (an ``OSError``). Other errors
    pass through at once. ``on_retry(exc)`` runs before each new try (e.g. to check whether a
    write that lost its answer landed); ``also(exc)`` classifies what only this call may retry
    (e.g. a whole-object PUT, which may start its upload afresh)."""
    policy = policy or Policy.default()
    pace = pacer(target) if target else None
    start = time.monotonic()
    tries = throttled = 0
    while True:
        if pace is not None:
            pace.wait()
        tries += 1
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - classified below; the rest re-raised as it was
            kind = classify_transient(exc) or (also(exc) if also is not None else None)
            if kind is None:
                raise
            if kind == "throttled":
                throttled += 1
                if pace is not None:
                    pace.throttled()
            elif pace is not None:
                pace.reached = pace.reached or kind != "unreachable"  # (a 5xx is an answer)
            elapsed = time.monotonic() - start
            wait = random.uniform(0, min(policy.cap_s, policy.base_s * 2 ** min(tries - 1, 20)))
            deadline = policy.deadline_s
            if kind == "unreachable" and not (pace is not None and pace.reached):
                deadline = min(deadline, UNREACHED_S)
            if elapsed + wait > deadline:
                raise gave_up(what, exc, tries, throttled, elapsed) from exc
            _count(kind)
            logger.debug("%s: %s (%s); try %d in %.2f s", what, kind, exc, tries + 1, wait)
            time.sleep(wait)
            if on_retry is not None:
                on_retry(exc)
            continue
        if pace is not None:
            pace.succeeded()
        return result

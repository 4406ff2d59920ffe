"""Where storage lives and how to reach it: local paths and ``s3://``/``gs://`` URIs as
``pyarrow.fs`` filesystems, the object store's settings, conditional writes, and errors that
name the URI and the setting to fix.

Where a run stores is one value, :class:`RunRoot` (its URI and its :class:`StorageOptions`),
built once by the run's entry point (``run_all``, an operator's try from its ``storage_conn_id``,
the Ray Job entry from its environment, a plugin request) and carried to every process that
touches the run: Ray workers get it inside their task arguments. Nothing here holds settings for
a process; :meth:`StorageOptions.from_env` (the standard AWS environment) is the default an entry
point chooses when nothing else is configured. Nothing here logs a secret, and the options never
enter a fingerprint or summary.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from winnow.exceptions import StorageError
from winnow.rowgroups import retry

logger = logging.getLogger(__name__)

#: StorageOptions field -> the standard environment variable it is read from.
ENV_VARS = {
    "endpoint_url": "AWS_ENDPOINT_URL",
    "region": "AWS_REGION",
    "access_key_id": "AWS_ACCESS_KEY_ID",
    "secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "session_token": "AWS_SESSION_TOKEN",
}
#: Names where environment settings came from (set by job mode for its Ray Jobs).
SOURCE_ENV = "WINNOW_STORAGE_SOURCE"
#: An unreachable endpoint fails in seconds, not after the SDK's minutes of default retries.
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class StorageOptions:
    """How to reach an S3-compatible object store. Secrets never show in ``repr``.

    >>> opts = StorageOptions(endpoint_url="http://127.0.0.1:9000", secret_access_key="s3cr3t")
    >>> "s3cr3t" in repr(opts), opts.endpoint
    (False, 'http://127.0.0.1:9000')
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    #: Where the settings came from, for error messages ("the Airflow connection 's3_prod'").
    source: str = "the AWS environment variables"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StorageOptions:
        env = os.environ if environ is None else environ
        values = {name: (env.get(var) or None) for name, var in ENV_VARS.items()}
        values["region"] = values["region"] or env.get("AWS_DEFAULT_REGION") or None
        # A Ray Job of job mode gets its settings as environment variables minted from an
        # Airflow connection: errors then name that connection, not the variables.
        return cls(**values, source=env.get(SOURCE_ENV) or cls.source)

    @property
    def endpoint(self) -> str:
        """The endpoint in words, for messages."""
        return self.endpoint_url or "the default AWS S3 endpoint"

    def secrets(self) -> list[str]:
        return [s for s in (self.secret_access_key, self.session_token) if s]

    def setting_hint(self, what: str) -> str:
        """Which setting to fix, in the words of where the settings came from."""
        env = self.source == StorageOptions.source
        names = {
            "credentials": ("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN for temporary "
                            "credentials), or an Airflow 'aws' connection named by the storage_conn_id param",
                            f"the login (access key id) and password (secret access key) of {self.source}"),
            "endpoint": ("AWS_ENDPOINT_URL (unset for AWS itself), or the endpoint_url extra of the "
                         "Airflow connection named by storage_conn_id",
                         f"the endpoint_url extra of {self.source}"),
        }[what]
        if what == "credentials" and "cluster_credentials" in self.source:
            # Job mode, the cluster's own identity: the fix is on the cluster or the connection.
            return (f"the Ray cluster's own AWS credentials (its environment or instance role), used as "
                    f"{self.source}; or set the storage connection's extra cluster_credentials to 'session' to "
                    "mint short-lived credentials from the connection")
        return names[0] if env else names[1]


@dataclass(frozen=True)
class RunRoot:
    """Where a run stores: the run root's URI (a local path, ``s3://``, ``gs://``) and the
    settings that reach its store (``None``: none given, enough for a local path or a URI that
    carries its own options). Picklable, so it travels with the work to Ray workers; ``str()``
    is the URI, and secrets never show in ``repr``.

    >>> root = RunRoot("s3://bucket/runs/20250101", StorageOptions(secret_access_key="s3cr3t"))
    >>> str(root), "s3cr3t" in repr(root)
    ('s3://bucket/runs/20250101', False)
    """

    uri: str
    storage: StorageOptions | None = None

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def of(cls, run_root: RunRoot | str) -> RunRoot:
        """``run_root`` as a value; a plain string is a root without settings (a local path)."""
        return run_root if isinstance(run_root, RunRoot) else cls(str(run_root))

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """(filesystem, path) of the run root: :func:`resolve_filesystem` with its settings."""
        return resolve_filesystem(self.uri, self.storage)


_FS_CACHE: dict[StorageOptions, pafs.FileSystem] = {}
_FS_LOCK = threading.Lock()


def _s3_filesystem(options: StorageOptions) -> pafs.FileSystem:
    with _FS_LOCK:
        fs = _FS_CACHE.get(options)
        if fs is not None:
            return fs
        kwargs: dict = {
            # One PutObject for objects below the part size instead of create/part/complete:
            # a small commit is one request, and a big one a multipart upload that only
            # becomes an object when it completes.
            "allow_delayed_open": True,
            "connect_timeout": CONNECT_TIMEOUT_S,
            "request_timeout": REQUEST_TIMEOUT_S,
            # No retries inside the SDK: the retrying handler (retry.call) tries again, with its
            # backoff, pacing and counts; the SDK's own waits seconds per throttled try, unseen.
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        }
        if options.endpoint_url:
            parts = urlsplit(options.endpoint_url if "://" in options.endpoint_url else f"https://{options.endpoint_url}")
            kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
            kwargs["scheme"] = parts.scheme
        if options.region:
            kwargs["region"] = options.region
        if options.access_key_id and options.secret_access_key:
            kwargs.update(access_key=options.access_key_id, secret_key=options.secret_access_key,
                          session_token=options.session_token)
        fs = retrying(pafs.S3FileSystem(**kwargs), kwargs.get("endpoint_override") or "aws")
        _FS_CACHE[options] = fs
        return fs


def resolve_filesystem(uri: str, storage: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI such as ``s3://bucket/prefix``.

    ``s3://`` URIs without a query are reached with ``storage``, which the caller must give (an
    entry point builds it once per run: :meth:`StorageOptions.from_env` for the AWS environment);
    a URI with query options (``s3://bucket/x?endpoint_override=...``) is taken as the caller
    wrote it. Other schemes (``gs://``, ``file://``, ``hdfs://``) go to
    ``pyarrow.fs.FileSystem.from_uri``.
    """
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    parts = urlsplit(uri)
    if parts.scheme == "s3" and not parts.query:
        if storage is None:
            raise StorageError(
                f"{uri}: no object-store settings came with this URI. Whoever starts the run builds them "
                "once and passes them along (RunRoot(uri, storage), CurationConfig(storage=...)): "
                "StorageOptions.from_env() for the AWS_* environment, or the Airflow connection named by "
                "storage_conn_id."
            )
        try:
            fs = _s3_filesystem(storage)
        except (OSError, ValueError) as exc:
            raise storage_error(uri, exc, storage) from exc
        return fs, f"{parts.netloc}{parts.path}".rstrip("/")
    if parts.scheme in ("gs", "gcs") and not parts.query and os.environ.get(GCS_EMULATOR_ENV):
        return _gcs_emulator(os.environ[GCS_EMULATOR_ENV]), f"{parts.netloc}{parts.path}".rstrip("/")
    try:
        fs, path = retry.call(lambda: pafs.FileSystem.from_uri(uri), what=f"opening {uri}")
    except (OSError, ValueError) as exc:
        raise storage_error(uri, exc) from exc
    if is_object_store(fs):
        fs = retrying(fs, f"{parts.scheme}://{parts.netloc}")
    return fs, path.rstrip("/")


#: The variable Google's client libraries read to talk to a GCS emulator instead of GCS.
GCS_EMULATOR_ENV = "STORAGE_EMULATOR_HOST"


def _gcs_emulator(host: str) -> pafs.FileSystem:
    """GCS at an emulator (no credentials), e.g. ``STORAGE_EMULATOR_HOST=http://127.0.0.1:9023``."""
    import datetime

    parts = urlsplit(host if "://" in host else f"http://{host}")
    key = StorageOptions(endpoint_url=f"gs+{host}")
    with _FS_LOCK:
        if key not in _FS_CACHE:
            _FS_CACHE[key] = retrying(pafs.GcsFileSystem(
                anonymous=True, scheme=parts.scheme, endpoint_override=parts.netloc,
                retry_time_limit=datetime.timedelta(seconds=REQUEST_TIMEOUT_S),
            ), key.endpoint_url)
        return _FS_CACHE[key]


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def is_s3(fs: pafs.FileSystem) -> bool:
    return isinstance(unwrap(fs), pafs.S3FileSystem)


def is_object_store(fs: pafs.FileSystem) -> bool:
    """S3 or GCS: every read is a request, there is no rename."""
    inner = unwrap(fs)
    return isinstance(inner, pafs.S3FileSystem) or type(inner).__name__ == "GcsFileSystem"


def display_uri(fs: pafs.FileSystem, path: str) -> str:
    """``path`` as the user would write it (``s3://bucket/key`` on S3)."""
    inner = unwrap(fs)
    if isinstance(inner, pafs.S3FileSystem):
        return f"s3://{path}"
    if type(inner).__name__ == "GcsFileSystem":
        return f"gs://{path}"
    return path


# ---- errors ----------------------------------------------------------------------------------

_CREDENTIAL_MARKS = ("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId",
                     "SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch", "EXPIRED_TOKEN", "ExpiredToken",
                     "InvalidToken", "UNRECOGNIZED_CLIENT", "HTTP response code: 403", "Forbidden",
                     "No response body", "NoCredentialsError", "Unable to locate credentials")
_BUCKET_MARKS = ("NO_SUCH_BUCKET", "NoSuchBucket", "bucket does not exist")
_NETWORK_MARKS = ("NETWORK_CONNECTION", "curlCode", "Could not connect", "Couldn't connect",
                  "Connection refused", "timed out", "Timeout", "resolve host")


def classify(exc: BaseException) -> str | None:
    """``"credentials"``, ``"bucket"``, ``"endpoint"`` or None for an object-store error."""
    text = str(exc)
    if any(m in text for m in _NETWORK_MARKS):
        return "endpoint"
    if any(m in text for m in _BUCKET_MARKS):
        return "bucket"
    if any(m in text for m in _CREDENTIAL_MARKS):
        return "credentials"
    return None


def _scrub(text: str, options: StorageOptions) -> str:
    for secret in options.secrets():
        text = text.replace(secret, "***")
    return text


def explain(uri: str, exc: BaseException, options: StorageOptions | None = None) -> str:
    """What went wrong reaching ``uri``, and which setting fixes it; never a secret.
    ``options``: the settings ``uri`` was reached with (None: the standard environment's names)."""
    options = options or StorageOptions()
    kind = classify(exc)
    cause = _scrub(str(exc), options).split(" (Request ID")[0]
    if kind == "credentials":
        return (f"{uri}: the object store at {options.endpoint} refused the credentials ({cause}). "
                f"Check {options.setting_hint('credentials')}; the key also needs read/write "
                "access to that bucket.")
    if kind == "bucket":
        bucket = urlsplit(uri).netloc if "://" in uri else uri.split("/", 1)[0]
        return (f"{uri}: bucket {bucket!r} does not exist at {options.endpoint}. Create the bucket, "
                f"or fix the bucket name in the URI (input_uri / output_root); if the bucket lives on "
                f"another server check {options.setting_hint('endpoint')}.")
    if kind == "endpoint":
        return (f"{uri}: cannot reach the object store at {options.endpoint} ({cause}). Check "
                f"{options.setting_hint('endpoint')}, and that the server is up and reachable.")
    return f"{uri}: {cause}"


def storage_error(uri: str, exc: BaseException, options: StorageOptions | None = None) -> StorageError:
    return StorageError(explain(uri, exc, options))


def fs_error(fs: pafs.FileSystem, path: str, exc: BaseException) -> StorageError:
    """:func:`storage_error` for ``path`` on ``fs``, in the words of the settings ``fs`` was
    made from."""
    return storage_error(display_uri(fs, path), exc, storage_of(fs))


def storage_of(fs: pafs.FileSystem) -> StorageOptions | None:
    """The settings an S3 filesystem of :func:`resolve_filesystem` was made from (None for
    any other filesystem): error messages name the setting to fix in their words."""
    if not is_s3(fs):
        return None
    inner = unwrap(fs)
    with _FS_LOCK:
        return next((options for options, made in _FS_CACHE.items() if unwrap(made) is inner), None)


def check_bucket(fs: pafs.FileSystem, path: str, uri: str) -> None:
    """On an object store, raise a clear error when ``path``'s bucket does not exist (a
    missing prefix and a missing bucket both look like "not found" to a key lookup)."""
    if is_local(fs) or not path:
        return
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        raise storage_error(uri, exc, storage_of(fs)) from exc
    if info.type == pafs.FileType.NotFound:
        raise storage_error(uri, OSError(f"NoSuchBucket: {bucket}"), storage_of(fs))


# ---- conditional writes ------------------------------------------------------------------------

class ConditionalWrites:
    """Create-if-absent (``If-None-Match: *``) and replace-if-unchanged (``If-Match: <etag>``)
    PUTs of small bookkeeping objects (``_stage.json``, the run lease) on S3.

    pyarrow's S3 filesystem cannot send these headers, so they go through botocore with the
    same endpoint, region and credentials as the filesystem. Where botocore is missing, the
    filesystem is not S3, or the store rejects the headers (501/400), :attr:`supported` is false
    and callers fall back to read-then-write, which can race (documented in the README).
    """

    def __init__(self, fs: pafs.FileSystem) -> None:
        self.fs = fs
        self._client = None
        self.supported = is_s3(fs)
        if self.supported:
            try:
                import botocore.session  # noqa: F401
            except ImportError:
                self.supported = False

    def _s3(self):
        if self._client is None:
            import botocore.config
            import botocore.session

            opts = unwrap(self.fs).__reduce__()[1][0]  # the filesystem's own settings, secrets included
            endpoint = opts.get("endpoint_override") or None
            if endpoint and "://" not in endpoint:
                endpoint = f"{opts.get('scheme') or 'https'}://{endpoint}"
            kwargs = {
                "region_name": opts.get("region") or None,
                "endpoint_url": endpoint,
                # One try per call: retry.call retries (with pacing, counts and the check of a
                # conditional write whose answer was lost).
                "config": botocore.config.Config(
                    connect_timeout=CONNECT_TIMEOUT_S, read_timeout=REQUEST_TIMEOUT_S,
                    retries={"total_max_attempts": 1, "mode": "standard"},
                ),
            }
            if opts.get("access_key"):
                kwargs.update(aws_access_key_id=opts["access_key"], aws_secret_access_key=opts["secret_key"],
                              aws_session_token=opts.get("session_token") or None)
            self._client = botocore.session.get_session().create_client("s3", **kwargs)
        return self._client

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        bucket, _, key = path.partition("/")
        return bucket, key

    def _call(self, path: str, method: str, ok_codes: tuple[str, ...] = (), *, landed: bytes | None = None, **kwargs):
        """One botocore call on ``path`` through :func:`retry.call`; the error code when it is in
        ``ok_codes``, else storage errors explained like pyarrow's (URI and setting named).

        ``landed``: the body of a conditional PUT. When a try's answer was lost (a reset, a 5xx)
        and a later try is refused by its condition, the first may have landed: the object is
        read back, and holding exactly ``landed`` counts as success (a write is checked, not
        repeated blindly)."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = self._split(path)
        uri = display_uri(self.fs, path)
        lost = []

        def once():
            try:
                return getattr(self._s3(), method)(Bucket=bucket, Key=key, **kwargs)
            except ClientError as exc:
                error = exc.response.get("Error", {})
                code = str(error.get("Code", ""))
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code in ok_codes or str(status) in ok_codes:
                    return ConditionFailed(code or str(status))
                raise

        try:
            got = retry.call(once, what=f"{method} {uri}", target=self.target(bucket), on_retry=lost.append)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if "If" in "".join(kwargs) and status in (400, 501) and code in (
                    "NotImplemented", "InvalidArgument", "InvalidRequest"):
                logger.warning("%s: the store does not support conditional writes (%s); falling back "
                               "to read-then-write", uri, code)
                self.supported = False
                raise ConditionalWritesUnsupported() from exc
            raise storage_error(uri, OSError(f"{code} ({status}): {error.get('Message', '')}"),
                                storage_of(self.fs)) from exc
        except (BotoCoreError, OSError) as exc:
            raise storage_error(uri, OSError(f"{type(exc).__name__}: {exc}"), storage_of(self.fs)) from exc
        if isinstance(got, ConditionFailed) and lost and landed is not None:
            now = self.read(path)
            if now is not None and now[0] == landed:
                return {"ETag": now[1]}  # our earlier try landed; its answer was lost
        return got

    def target(self, bucket: str) -> str:
        """Whom a request goes to, for pacing: the endpoint and the bucket."""
        opts = unwrap(self.fs).__reduce__()[1][0]
        return f"{opts.get('endpoint_override') or 'aws'}/{bucket}"

    def create(self, path: str, data: bytes) -> bool:
        """Create ``path`` holding ``data`` unless it exists; True when this call created it."""
        got = self._call(path, "put_object", _PRECONDITION, landed=data, Body=data, IfNoneMatch="*")
        return not isinstance(got, ConditionFailed)

    def replace(self, path: str, data: bytes, etag: str) -> bool:
        """Overwrite ``path`` only if it still has ``etag``; True when this call replaced it."""
        got = self._call(path, "put_object", _PRECONDITION, landed=data, Body=data, IfMatch=etag)
        return not isinstance(got, ConditionFailed)

    def read(self, path: str) -> tuple[bytes, str] | None:
        """(body, ETag) of ``path``, or None when it does not exist: one GET."""
        got = self._call(path, "get_object", ("NoSuchKey", "404"))
        if isinstance(got, ConditionFailed):
            return None
        return got["Body"].read(), got["ETag"]

    def read_range(self, path: str, start: int, length: int) -> tuple[bytes, int]:
        """(bytes, the object's size) of ``length`` bytes from ``start``: one ranged GET,
        through botocore, which reads a throttle answer's body whatever the range's size (the
        AWS C++ SDK of pyarrow's filesystem cannot when the range is shorter than the body)."""
        bucket, key = self._split(path)

        def once():
            from botocore.exceptions import ClientError

            try:
                got = self._s3().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in ("NoSuchKey", "404", "NoSuchBucket"):
                    raise FileNotFoundError(f"{display_uri(self.fs, path)}: {code}") from exc
                if code == "InvalidRange":  # an empty object (or start past its end)
                    return b"", start if start else 0
                raise
            # The whole body, read inside the try: a connection dropped mid-body is retried too.
            data = got["Body"].read()
            total = got.get("ContentRange", "").rpartition("/")[2]
            return data, int(total) if total.isdigit() else len(data)

        return retry.call(once, what=f"GET {display_uri(self.fs, path)}", target=self.target(bucket))

    def delete(self, path: str) -> None:
        """Delete one object. (pyarrow's delete_file also PUTs an empty "folder" marker for
        the parent prefix; nothing here wants one.)"""
        self._call(path, "delete_object")


_PRECONDITION = ("PreconditionFailed", "ConditionalRequestConflict", "412")


@dataclass(frozen=True)
class ConditionFailed:
    """A conditional request whose condition did not hold (or a key that is not there)."""

    code: str


class ConditionalWritesUnsupported(Exception):
    """The store rejected a conditional header; the caller falls back."""


def read_small(fs: pafs.FileSystem, path: str) -> bytes | None:
    """A small object's bytes, or None when it does not exist: one GET on S3 (pyarrow's
    stream costs a HEAD and a GET)."""
    cond = conditional_writes(fs)
    if cond.supported:
        got = cond.read(path)
        return None if got is None else got[0]
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def delete_file(fs: pafs.FileSystem, path: str) -> None:
    """Delete ``path`` if it exists."""
    cond = conditional_writes(fs)
    if cond.supported:
        cond.delete(path)
        return
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def create_if_absent(fs: pafs.FileSystem, path: str, data: bytes) -> bool:
    """Write ``path`` only if it does not exist yet; True when this call created it.

    Local disk: ``link(2)`` of a fully written temp file (atomic, fails if the name exists).
    S3: ``If-None-Match: *``. Elsewhere (or a store without conditional writes): look, then
    write, which two racing writers can both pass.
    """
    if is_local(fs):
        import uuid

        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise StorageError(f"could not write {path}: {exc.strerror or exc}. The output root must be "
                               "writable (check the mount, permissions and free space).") from exc
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    cond = conditional_writes(fs)
    if cond.supported:
        try:
            return cond.create(path, data)
        except ConditionalWritesUnsupported:
            pass
    try:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            return False
        with fs.open_output_stream(path) as out:
            out.write(data)
    except OSError as exc:
        raise fs_error(fs, path, exc) from exc
    return True


_COND_CACHE: dict[int, ConditionalWrites] = {}


def conditional_writes(fs: pafs.FileSystem) -> ConditionalWrites:
    """One :class:`ConditionalWrites` (one botocore client) per filesystem object (the same
    for a :func:`retrying` filesystem and the one it wraps)."""
    fs = unwrap(fs)
    cond = _COND_CACHE.get(id(fs))
    if cond is None or cond.fs is not fs:
        cond = _COND_CACHE[id(fs)] = ConditionalWrites(fs)
    return cond


# ---- the one way to the object store: every call retried ---------------------------------------

#: Objects up to this size are read whole, in one GET, when opened (footers, markers, JSON,
#: row-group files): a Parquet read of one costs one request instead of a HEAD and ranged GETs.
SMALL_OBJECT_BYTES = 1 << 20
#: No ranged read is shorter than this (past the end of a small object, it is the whole
#: object): a throttle answer's body (~300 bytes) always fits the range's buffer.
MIN_RANGE_BYTES = 64 << 10
#: Sequential reads grow their read-ahead up to this.
MAX_RANGE_BYTES = 8 << 20
#: A write is kept in memory up to this size, then PUT whole (retried) on close; a bigger one
#: streams as a multipart upload, which fails as a whole (the unit is retried by its stage).
BUFFERED_PUT_BYTES = 8 << 20


def retrying(fs: pafs.FileSystem, endpoint: str) -> pafs.FileSystem:
    """``fs`` (an object store) behind :class:`RetryingHandler`: what :func:`resolve_filesystem`
    hands out, so every call of winnow's on an object store is retried the same way."""
    return pafs.PyFileSystem(RetryingHandler(fs, endpoint))


def read_range(fs: pafs.FileSystem, path: str, start: int, length: int) -> bytes:
    """``length`` bytes of ``path`` from ``start``: on an object store one ranged GET of exactly
    those bytes (retried); elsewhere a positioned read."""
    handler = getattr(fs, "handler", None)
    if isinstance(handler, RetryingHandler):
        return handler.fetch(path, start, length)[0]
    with fs.open_input_file(path) as f:
        return f.read_at(length, start)


def unwrap(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The filesystem :func:`retrying` wrapped (``fs`` itself for any other)."""
    handler = getattr(fs, "handler", None)
    return handler.inner if isinstance(handler, RetryingHandler) else fs


class RetryingHandler(pafs.FileSystemHandler):
    """A ``pyarrow.fs`` filesystem whose every call goes through :func:`retry.call`.

    Reads never go through pyarrow's S3 reads: an object is opened with one ranged GET of its
    first :data:`SMALL_OBJECT_BYTES` through botocore (which learns the size, and is the whole
    object for most of what winnow reads), and later reads are ranged GETs of at least
    :data:`MIN_RANGE_BYTES`. The AWS C++ SDK under pyarrow turns a 503 answer to a range shorter
    than the error body into a non-retryable ``INTERNAL_FAILURE`` ("Failed to flush response
    stream"); botocore reads any error body. (The classifier retries that error too, for any
    call that still meets it.) On GCS the reads go through the wrapped filesystem, retried.
    Writes are kept in memory and PUT whole on close (a retried PUT of a whole object is
    idempotent), up to :data:`BUFFERED_PUT_BYTES`.
    """

    def __init__(self, inner: pafs.FileSystem, endpoint: str) -> None:
        self.inner = inner
        self.endpoint = endpoint

    def __reduce__(self):
        return RetryingHandler, (self.inner, self.endpoint)

    # what each call is, for pacing and messages
    def target(self, path: str) -> str:
        return f"{self.endpoint}/{path.split('/', 1)[0]}"

    def uri(self, path: str) -> str:
        return display_uri(self.inner, path)

    def call(self, what: str, path: str, fn, **options):
        """``fn()`` through :func:`retry.call`, named and paced by ``path`` (``options``: its
        ``on_retry`` and ``also``)."""
        return retry.call(fn, what=f"{what} {self.uri(path)}", target=self.target(path), **options)

    def get_type_name(self) -> str:
        return f"retrying-{self.inner.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def equals(self, other) -> bool:
        return isinstance(other, RetryingHandler) and self.inner.equals(other.inner)

    def get_file_info(self, paths):
        return self.call("HEAD", paths[0] if paths else "", lambda: self.inner.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self.call("LIST", selector.base_dir, lambda: self.inner.get_file_info(selector))

    def create_dir(self, path, recursive):
        self.call("PUT", path, lambda: self.inner.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self.call("DELETE", path, lambda: self.inner.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.call("DELETE", path, lambda: self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        self.call("DELETE", "", lambda: self.inner.delete_dir_contents("", accept_root_dir=True))

    def delete_file(self, path):
        tried = []

        def once():
            try:
                self.inner.delete_file(path)
            except FileNotFoundError:
                if not tried:
                    raise  # (after a lost answer, "not there" is what the lost try did)

        self.call("DELETE", path, once, on_retry=tried.append)

    def move(self, src, dest):
        self.call("MOVE", src, lambda: self.inner.move(src, dest))

    def copy_file(self, src, dest):
        self.call("COPY", src, lambda: self.inner.copy_file(src, dest))

    def open_input_stream(self, path):
        return self._open(path)

    def open_input_file(self, path):
        return self._open(path)

    def _open(self, path: str) -> pa.NativeFile:
        reader = _RangeReader(self, path)
        if reader.size <= len(reader.window):
            return pa.BufferReader(reader.window)  # the whole object came with the first GET
        return pa.PythonFile(reader, mode="r")

    def fetch(self, path: str, start: int, length: int) -> tuple[bytes, int]:
        """(bytes, object size): one ranged read, retried."""
        if is_s3(self.inner):
            return conditional_writes(self.inner).read_range(path, start, length)

        def once():
            with self.inner.open_input_file(path) as f:
                return f.read_at(length, start), f.size()

        return self.call("GET", path, once)

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_BufferedPut(self, path, metadata), mode="w")

    def open_append_stream(self, path, metadata):
        return self.call("OPEN", path, lambda: self.inner.open_append_stream(path, metadata=metadata))


class _PythonFileProtocol:
    """What ``pyarrow.PythonFile`` asks of the object it wraps, besides reading or writing."""

    READABLE = SEEKABLE = WRITABLE = False

    def readable(self) -> bool:
        return self.READABLE

    def seekable(self) -> bool:
        return self.SEEKABLE

    def writable(self) -> bool:
        return self.WRITABLE


class _RangeReader(_PythonFileProtocol):
    """A read-only file over ranged GETs (see :class:`RetryingHandler`): the first window is
    read on open; later reads are served from the last window or fetch at least
    :data:`MIN_RANGE_BYTES`, growing to :data:`MAX_RANGE_BYTES` while reads are sequential."""

    READABLE = SEEKABLE = True

    def __init__(self, handler: RetryingHandler, path: str) -> None:
        self.handler, self.path = handler, path
        self.window, self.size = handler.fetch(path, 0, SMALL_OBJECT_BYTES)
        self.window_at = 0
        self.pos = 0
        self.ahead = MIN_RANGE_BYTES
        self.closed = False

    def _read_at(self, n: int, at: int) -> bytes:
        n = max(0, min(n, self.size - at))
        if n == 0:
            return b""
        lo, hi = self.window_at, self.window_at + len(self.window)
        if lo <= at and at + n <= hi:
            return self.window[at - lo:at - lo + n]
        sequential = lo <= at <= hi
        self.ahead = min(MAX_RANGE_BYTES, self.ahead * 2) if sequential else MIN_RANGE_BYTES
        length = max(n, self.ahead)
        start = at
        if start + length > self.size:  # near the end: never a short range
            start = max(0, self.size - length)
        self.window, _ = self.handler.fetch(self.path, start, min(length, self.size - start))
        self.window_at = start
        return self.window[at - start:at - start + n]

    # the file protocol pyarrow.PythonFile uses
    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else n
        data = self._read_at(n, self.pos)
        self.pos += len(data)
        return data

    def read_at(self, n: int, at: int) -> bytes:
        return self._read_at(n, at)

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        self.closed = True
        self.window = b""


class _BufferedPut(_PythonFileProtocol):
    """A write-only file kept in memory and PUT whole on close (retried: a whole-object PUT is
    idempotent); past :data:`BUFFERED_PUT_BYTES` it streams to the store instead."""

    WRITABLE = True

    def __init__(self, handler: RetryingHandler, path: str, metadata) -> None:
        self.handler, self.path, self.metadata = handler, path, metadata
        self.parts: list[bytes] = []
        self.size = 0
        self.stream = None
        self.closed = False

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if self.stream is None and self.size + n > BUFFERED_PUT_BYTES:
            self.stream = self.handler.call("OPEN", self.path, lambda: self.handler.inner.open_output_stream(
                self.path, metadata=self.metadata))
            for part in self.parts:
                self.stream.write(part)
            self.parts = []
        if self.stream is not None:
            self.stream.write(data)
        else:
            self.parts.append(bytes(data))
        self.size += n
        return n

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.stream is not None:
            self.stream.close()
            return
        body = b"".join(self.parts)
        self.parts = []

        def put():
            with self.handler.inner.open_output_stream(self.path, metadata=self.metadata) as out:
                out.write(body)

        self.handler.call("PUT", self.path, put, also=_upload_session_lost)


def _upload_session_lost(exc: BaseException) -> str | None:
    """GCS's client resumes a resumable upload after a lost answer from the offset the server
    reports; a server that reports it wrongly ends the session with a "permanent" chunk error.
    A whole-object PUT starts a new session: as safe to repeat as the PUT itself."""
    text = str(exc)
    return "transient" if "UploadChunk" in text and "PERMISSION_DENIED" not in text else None

"""S3 requests for the repository: boto3, conditional writes, retries with backoff, a bound on downtime.

boto3 clients are thread-safe and the store's callers are threads already, so one client per
repository with a connection pool as large as the number of requests we allow in flight. botocore
retries each request a little (its "standard" mode: 5xx, throttling, resets, timeouts); around that
we retry with our own jittered backoff until the store has been failing for ``down_limit`` seconds
in a row — then every call fails at once (EIO; one probe every ``PROBE`` s may find it back), so a
store that stays down fails a command within two minutes (design §3.7) instead of each of thousands
of requests waiting its own turn.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as BotoConnectionError

from .errors import NotARepository, RepoError
from .location import S3Location

#: HTTP connections (and so requests in flight) per repository: S3 is latency bound, not CPU bound.
CONNECTIONS = 16
#: Seconds a store may fail without a single success before every call gives up (design: < 2 min:
#: this, plus one last request's botocore attempts, 3 x (5 + 15) s, is under two minutes).
DOWN_LIMIT = 45.0
#: Once given up, a call fails at once, except one probe of the store every PROBE seconds (a daemon recovers).
PROBE = 10.0
#: botocore's own attempts per request; ours come on top, until DOWN_LIMIT.
BOTO_ATTEMPTS = 3
CONNECT_TIMEOUT = 5
READ_TIMEOUT = 15
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 4.0

_RETRY_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
    "502",
    "504",
}
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


_session_lock = threading.Lock()
_sessions: list[Any] = []


def _session() -> Any:
    """One boto3 session per process: it resolves the credential chain and loads the S3 model once."""
    if not _sessions:
        _sessions.append(boto3.session.Session())
    return _sessions[0]


def error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def http_status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_missing(e: ClientError) -> bool:
    return error_code(e) in _MISSING_CODES or http_status(e) == 404


def is_precondition_failed(e: ClientError) -> bool:
    return http_status(e) == 412 or error_code(e) in ("PreconditionFailed", "412")


def _retryable(e: Exception) -> bool:
    """Transient: 5xx, throttling, and the network (resets, timeouts) — not missing credentials or bad input."""
    if isinstance(e, ClientError):
        return error_code(e) in _RETRY_CODES or http_status(e) >= 500 or http_status(e) == 429
    return isinstance(e, HTTPClientError | BotoConnectionError | IncompleteReadError | ConnectionError | TimeoutError)


def server_time(response: dict[str, Any]) -> float:
    """The server's clock (epoch seconds, whole seconds) from a response's ``Date`` header."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not date:
        raise RepoError("the S3 server sent no Date header", errno.EIO)
    return parsedate_to_datetime(date).timestamp()


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # LastModified, epoch seconds (server clock)
    retain_until: float | None = None  # Object Lock retention of the current version (HEAD only)


class S3Client:
    """The requests the repository makes, each retried as the module says; errors are RepoError (errno)."""

    def __init__(self, loc: S3Location, *, connections: int = CONNECTIONS) -> None:
        self.loc = loc
        self.down_limit = DOWN_LIMIT
        config = Config(
            region_name=loc.region,
            retries={"max_attempts": BOTO_ATTEMPTS, "mode": "standard"},
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            max_pool_connections=connections,
            s3={"addressing_style": "path"} if loc.endpoint else None,
            # chunks carry their own SHA-256; skip botocore's extra body checksums (cost, and S3-likes vary)
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        with _session_lock:  # a Session is not thread-safe; its clients are
            self.client: Any = _session().client("s3", endpoint_url=loc.endpoint, config=config)
        self._lock = threading.Lock()
        self._failing_since: float | None = None
        self._probed = 0.0
        self.probe = PROBE
        #: A bucket with Object Lock keeps versions: a delete must remove every version of the key
        #: (a plain DELETE only adds a delete marker), so an Object Lock repository sets this.
        self.versioned = False
        #: Object Lock mode for ``retain_until`` (``objectlock.MODE``).
        self.lock_mode = "COMPLIANCE"

    # -- the retry loop

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        """``client.<op>(**kw)`` retried on transient errors; a ClientError that is an answer is raised."""
        self._check_down(op)
        attempt = 0
        while True:
            try:
                response: dict[str, Any] = getattr(self.client, op)(**kw)
            except (ClientError, BotoCoreError, ConnectionError, TimeoutError) as e:
                if not _retryable(e):
                    if not isinstance(e, ClientError):  # no credentials, a bad parameter: say so in one line
                        raise RepoError(f"{self.loc.url}: S3 {op}: {_short(e)}", errno.EACCES) from None
                    self._succeeded()  # the server answered: it is up
                    raise
                self._backoff(attempt, op, e)
                attempt += 1
                continue
            self._succeeded()
            return response

    def _check_down(self, op: str) -> None:
        """Fail at once while the store is given up for down, but let one call probe it every PROBE s."""
        since = self._failing_since
        if since is None:
            return
        now = time.monotonic()
        with self._lock:
            if now - since < self.down_limit or now - self._probed >= self.probe:
                self._probed = now
                return
        raise RepoError(f"{self.loc.url}: S3 store failing for {now - since:.0f}s, giving up ({op})", errno.EIO)

    def _succeeded(self) -> None:
        if self._failing_since is not None:
            with self._lock:
                self._failing_since = None

    def _backoff(self, attempt: int, op: str, e: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            if self._failing_since is None:
                self._failing_since = now
            since = self._failing_since
        if now - since >= self.down_limit:
            with self._lock:
                self._probed = now  # the next probe in PROBE seconds
            raise RepoError(
                f"{self.loc.url}: S3 store failing for {now - since:.0f}s, giving up ({op}: {_short(e)})", errno.EIO
            ) from None
        delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2**attempt) * random.uniform(0.5, 1.0)
        time.sleep(min(delay, max(0.0, since + self.down_limit - now)))

    def fail(self, op: str, e: ClientError) -> RepoError:
        """A one-line RepoError for an S3 answer that is not one we handle."""
        code = error_code(e)
        if code == "NoSuchBucket":
            return NotARepository(f"{self.loc.url} is not a repository (no bucket {self.loc.bucket})")
        err = errno.EACCES if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") else errno.EIO
        return RepoError(f"{self.loc.url}: S3 {op} failed: {_short(e)}", err)

    # -- requests

    def put(
        self,
        key: str,
        body: bytes,
        *,
        if_absent: bool = False,
        md5: str | None = None,
        retain_until: float | None = None,
    ) -> dict[str, Any] | None:
        """PUT; with ``if_absent`` (``If-None-Match: *``) None if the object exists (412); with
        ``retain_until`` (epoch seconds) the object carries that Object Lock retention."""
        kw: dict[str, Any] = {"Bucket": self.loc.bucket, "Key": key, "Body": body}
        if if_absent:
            kw["IfNoneMatch"] = "*"
        if retain_until is not None:
            kw["ObjectLockMode"] = self.lock_mode
            kw["ObjectLockRetainUntilDate"] = datetime.fromtimestamp(retain_until, UTC)
            md5 = md5 or content_md5(body)  # S3 wants a body checksum on a PUT with retention
        if md5 is not None:
            kw["ContentMD5"] = md5
        try:
            return self.call("put_object", **kw)
        except ClientError as e:
            if if_absent and (is_precondition_failed(e) or error_code(e) == "ConditionalRequestConflict"):
                return None
            raise self.fail("PUT", e) from None

    def get(self, key: str) -> bytes | None:
        """The object's bytes, None if absent. The body is read inside the retry loop."""

        def read() -> dict[str, Any]:
            r = self.client.get_object(Bucket=self.loc.bucket, Key=key)
            return {"Body": r["Body"].read(), "ResponseMetadata": r["ResponseMetadata"]}

        self._check_down("GET")
        attempt = 0
        while True:
            try:
                r = read()
            except ClientError as e:
                if is_missing(e):
                    self._succeeded()
                    return None
                if not _retryable(e):
                    self._succeeded()
                    raise self.fail("GET", e) from None
                self._backoff(attempt, "GET", e)
            except (BotoCoreError, ConnectionError, TimeoutError) as e:
                if not _retryable(e):
                    raise RepoError(f"{self.loc.url}: S3 GET: {_short(e)}", errno.EACCES) from None
                self._backoff(attempt, "GET", e)
            else:
                self._succeeded()
                body: bytes = r["Body"]
                return body
            attempt += 1

    def head(self, key: str) -> ObjectInfo | None:
        try:
            r = self.call("head_object", Bucket=self.loc.bucket, Key=key)
        except ClientError as e:
            if is_missing(e):
                return None
            raise self.fail("HEAD", e) from None
        until = r.get("ObjectLockRetainUntilDate")
        return ObjectInfo(key, int(r["ContentLength"]), r["LastModified"].timestamp(), until and until.timestamp())

    def retain(self, key: str, until: float) -> None:
        """Set (extend) the Object Lock retention of the key's current version."""
        retention = {"Mode": self.lock_mode, "RetainUntilDate": datetime.fromtimestamp(until, UTC)}
        try:
            self.call("put_object_retention", Bucket=self.loc.bucket, Key=key, Retention=retention)
        except ClientError as e:
            raise self.fail("PUT retention", e) from None

    def object_lock_enabled(self) -> bool:
        """Whether the bucket was created with Object Lock (only then can objects carry retention)."""
        try:
            r = self.call("get_object_lock_configuration", Bucket=self.loc.bucket)
        except ClientError as e:
            if error_code(e) in ("ObjectLockConfigurationNotFoundError", "NotImplemented") or is_missing(e):
                return False
            raise self.fail("GET object-lock", e) from None
        return bool(r.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled")

    def touch(self, key: str) -> bool:
        """Refresh LastModified by copying the object onto itself; False if it is gone."""
        try:
            self.call(
                "copy_object",
                Bucket=self.loc.bucket,
                Key=key,
                CopySource={"Bucket": self.loc.bucket, "Key": key},
                MetadataDirective="REPLACE",
            )
        except ClientError as e:
            if is_missing(e) or error_code(e) == "NoSuchKey":
                return False
            raise self.fail("COPY", e) from None
        return True

    def delete(self, key: str) -> None:
        """Remove the object; in a ``versioned`` bucket every version of it (and its delete markers)."""
        versions: list[str | None] = [None]
        if self.versioned:
            versions = []
            kw: dict[str, Any] = {"Bucket": self.loc.bucket, "Prefix": key}
            while True:
                try:
                    r = self.call("list_object_versions", **kw)
                except ClientError as e:
                    raise self.fail("LIST versions", e) from None
                for v in [*r.get("Versions", []), *r.get("DeleteMarkers", [])]:
                    if v["Key"] == key:
                        versions.append(v["VersionId"])
                if not r.get("IsTruncated"):
                    break
                kw["KeyMarker"], kw["VersionIdMarker"] = r["NextKeyMarker"], r.get("NextVersionIdMarker")
        for version in versions:
            kw = {"Bucket": self.loc.bucket, "Key": key}
            if version is not None:
                kw["VersionId"] = version
            try:
                self.call("delete_object", **kw)
            except ClientError as e:
                if not is_missing(e):
                    raise self.fail("DELETE", e) from None

    def list(self, prefix: str, delimiter: str | None = None) -> Iterator[ObjectInfo | str]:
        """Objects under ``prefix`` (ObjectInfo), and with ``delimiter`` the common prefixes (str)."""
        kw: dict[str, Any] = {"Bucket": self.loc.bucket, "Prefix": prefix}
        if delimiter:
            kw["Delimiter"] = delimiter
        while True:
            try:
                r = self.call("list_objects_v2", **kw)
            except ClientError as e:
                raise self.fail("LIST", e) from None
            for p in r.get("CommonPrefixes", []):
                yield p["Prefix"]
            for o in r.get("Contents", []):
                yield ObjectInfo(o["Key"], int(o["Size"]), o["LastModified"].timestamp())
            if not r.get("IsTruncated"):
                return
            kw["ContinuationToken"] = r["NextContinuationToken"]

    def objects(self, prefix: str) -> Iterator[ObjectInfo]:
        for o in self.list(prefix):
            if isinstance(o, ObjectInfo):
                yield o

    def now(self) -> float:
        """The server's clock: the Date of a cheap request (bucket HEAD)."""
        try:
            return server_time(self.call("head_bucket", Bucket=self.loc.bucket))
        except ClientError as e:
            if http_status(e) == 404:
                raise NotARepository(f"{self.loc.url} is not a repository (no bucket {self.loc.bucket})") from None
            raise self.fail("HEAD bucket", e) from None


def content_md5(body: bytes) -> str:
    """The ``Content-MD5`` header of ``body`` (a transfer cut short is never stored)."""
    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:200]

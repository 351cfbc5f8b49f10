"""`s3://bucket/prefix` remote on any S3-compatible store, through boto3.

Why our own retry loop instead of botocore's: we want one policy for every call (jittered
exponential backoff on 429/5xx/SlowDown/timeouts/resets), we want a 412 to mean "condition failed"
and never to be retried, and downloads are retried a level up (install.py) where the digest check
lives, so a truncated or corrupted body costs one more GET instead of a bad file. botocore's own
retries are therefore switched off (total_max_attempts=1).

The connection pool is bounded (`max_pool_connections`) and sized to the download parallelism, so
installing a thousand concepts never opens a thousand sockets.

The endpoint comes from the remote's `endpoint_url`, else botocore's own chain (AWS_ENDPOINT_URL,
AWS_ENDPOINT_URL_S3, config files); credentials from the remote's profile or the standard chain.

Conditional writes, as the capability probe found them (registry/capabilities.py sets the attributes):
* `etag_form`: AWS, moto and s3rver match `If-Match: "<md5>"` (the ETag exactly as returned, quoted);
  Ceph RGW 16 answers 412 to the quoted form and matches only `If-Match: <md5>`. Both spellings are
  conditional where they are honoured; the probe picks the one the store matches *and* checks that a
  stale ETag in that spelling is refused, so a swap is never weakened into an overwrite.
* `conditional_create` / `conditional_swap` False (only in --single-writer mode, only for a store the
  probe recorded as ignoring the header): no header is sent; the write checks first (HEAD), then
  writes. Correct only with one writer, which is what the mode promises.
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from registry.errors import IntegrityError, RemoteError
from registry.remotes.base import CasFailed, Doc, KeyMissing, Remote, read_capped

T = TypeVar("T")

RETRY_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "BadGateway",
    "GatewayTimeout", "ConditionalRequestConflict", "OperationAborted",
    "BadDigest", "XAmzContentChecksumMismatch",  # the body was altered in transit: send it again
}
_PLAIN_MD5 = re.compile(r"[0-9a-f]{32}")


def parse_s3_url(url: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix/") (prefix empty or ending in '/')."""
    if not url.startswith("s3://"):
        raise RemoteError(f"not an s3:// URL: {url!r}")
    rest = url[5:]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise RemoteError(f"{url!r} names no bucket", hint="use s3://bucket/prefix")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")


def etag_core(etag: str) -> str:
    """The ETag without quotes (and without a weak-validator prefix): the form RGW matches."""
    e = etag.strip()
    return e.removeprefix("W/").strip('"')


class S3Remote(Remote):
    etag_forms = ("quoted", "unquoted")
    etag_form = "quoted"

    def __init__(
        self,
        name: str,
        url: str,
        *,
        endpoint_url: str | None = None,
        profile: str | None = None,
        read_only: bool = False,
        single_writer: bool = False,
        max_pool: int = 16,
        attempts: int = 6,
        backoff_base: float = 0.05,
        backoff_cap: float = 2.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 20.0,
    ):
        import boto3
        from botocore.config import Config

        self.name, self.url = name, url
        self.bucket, self.prefix = parse_s3_url(url)
        self.read_only, self.single_writer = read_only, single_writer
        self.attempts, self.backoff_base, self.backoff_cap = attempts, backoff_base, backoff_cap
        from botocore.exceptions import ProfileNotFound

        try:
            session = boto3.session.Session(profile_name=profile) if profile else boto3.session.Session()
        except ProfileNotFound as e:
            raise RemoteError(f"remote '{name}': {e}", hint="define the profile in ~/.aws/config or "
                              "~/.aws/credentials (AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE), or re-add "
                              "the remote without --profile") from None
        import os

        custom = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        cfg = Config(
            max_pool_connections=max_pool,
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            s3={"addressing_style": "path"} if custom else {},
        )
        self.client = session.client("s3", endpoint_url=endpoint_url or None, config=cfg)
        self._lock = threading.Lock()
        self.requests = 0  # HTTP requests sent (retries included): the figure DESIGN.md counts
        self._server: str | None = None
        self.client.meta.events.register("before-send.s3", self._count)
        self.client.meta.events.register("after-call.s3", self._seen)

    def _count(self, **_: Any) -> None:
        with self._lock:
            self.requests += 1

    def _seen(self, http_response: Any = None, **_: Any) -> None:
        server = getattr(http_response, "headers", {}).get("Server") if http_response is not None else None
        if server:
            self._server = str(server)[:200]

    def server(self) -> str | None:
        return self._server

    def _k(self, key: str) -> str:
        return self.prefix + key

    # -- the retry loop --------------------------------------------------------------------------
    @staticmethod
    def _status(e: Exception) -> tuple[int, str]:
        resp = getattr(e, "response", None) or {}
        return (
            int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0),
            str(resp.get("Error", {}).get("Code") or ""),
        )

    def retryable(self, e: BaseException) -> bool:
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            FlexibleChecksumError,
            HTTPClientError,
            IncompleteReadError,
        )

        try:
            from botocore.exceptions import ResponseStreamingError
        except ImportError:  # pragma: no cover - older botocore
            ResponseStreamingError = HTTPClientError
        from urllib3.exceptions import HTTPError as Urllib3Error

        if isinstance(e, ClientError):
            status, code = self._status(e)
            if status == 501 or code == "NotImplemented":  # a feature the store lacks: asking again won't help
                return False
            return status == 429 or status >= 500 or code in RETRY_CODES
        return isinstance(e, (ConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError,
                              FlexibleChecksumError, Urllib3Error, OSError))

    def backoff(self, attempt: int) -> None:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)], so a herd of clients spreads out."""
        time.sleep(random.uniform(0, min(self.backoff_cap, self.backoff_base * (2**attempt))))

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        for attempt in range(self.attempts):
            try:
                return fn()
            except Exception as e:
                if not self.retryable(e) or attempt == self.attempts - 1:
                    if self.retryable(e):
                        raise RemoteError(f"{what} on {self.describe()} failed after {self.attempts} tries: {e}") from e
                    from botocore.exceptions import BotoCoreError

                    if isinstance(e, BotoCoreError):  # e.g. no credentials, bad endpoint: a user problem
                        raise RemoteError(f"{what} on {self.describe()}: {e}",
                                          hint="check AWS credentials / --profile and --endpoint-url") from e
                    raise
                self.backoff(attempt)
        raise AssertionError("unreachable")

    def _client_error(self, e: Exception, key: str) -> Exception:
        from botocore.exceptions import ClientError

        if isinstance(e, ClientError):
            status, code = self._status(e)
            if status == 404 or code in ("NoSuchKey", "NotFound", "404"):
                return KeyMissing(f"{key} not found on {self.describe()}")
            if code == "NoSuchBucket":
                return RemoteError(f"bucket {self.bucket!r} does not exist ({self.describe()})")
            if status in (401, 403):
                return RemoteError(
                    f"access denied to {key} on {self.describe()}",
                    hint="check the credentials (AWS_PROFILE / --profile) and the bucket policy",
                )
        return e

    # -- reads -----------------------------------------------------------------------------------
    def get(self, key: str, *, max_bytes: int) -> bytes:
        def once() -> bytes:
            r = self.client.get_object(Bucket=self.bucket, Key=self._k(key))
            if int(r.get("ContentLength") or 0) > max_bytes:
                r["Body"].close()
                raise IntegrityError(f"{key} on {self.describe()} is over the {max_bytes}-byte limit; refused")
            return read_capped(r["Body"].iter_chunks(1 << 16), max_bytes, key)

        try:
            return self._call(f"GET {key}", once)
        except Exception as e:  # noqa: BLE001
            raise self._client_error(e, key) from None

    def get_doc(self, key: str, *, max_bytes: int, if_none_match: str | None = None) -> Doc | None:
        def once() -> Doc:
            kw = {"IfNoneMatch": if_none_match} if if_none_match else {}
            from botocore.exceptions import ClientError

            try:
                r = self.client.get_object(Bucket=self.bucket, Key=self._k(key), **kw)
            except ClientError as e:
                status, code = self._status(e)
                if status == 304 or code in ("304", "NotModified"):
                    return Doc(b"", if_none_match or "")
                raise
            if int(r.get("ContentLength") or 0) > max_bytes:
                r["Body"].close()
                raise IntegrityError(f"{key} on {self.describe()} is over the {max_bytes}-byte limit; refused")
            return Doc(read_capped(r["Body"].iter_chunks(1 << 16), max_bytes, key), r["ETag"])

        try:
            return self._call(f"GET {key}", once)
        except Exception as e:  # noqa: BLE001
            err = self._client_error(e, key)
            if isinstance(err, KeyMissing):
                return None
            raise err from None

    def open_blob(self, key: str, chunk_size: int = 1 << 16) -> tuple[int | None, Iterator[bytes]]:
        try:
            r = self._call(f"GET {key}", lambda: self.client.get_object(Bucket=self.bucket, Key=self._k(key)))
        except Exception as e:  # noqa: BLE001
            raise self._client_error(e, key) from None
        return int(r.get("ContentLength") or 0) or None, r["Body"].iter_chunks(chunk_size)

    def _head(self, key: str) -> dict | None:
        try:
            return self._call(f"HEAD {key}", lambda: self.client.head_object(Bucket=self.bucket, Key=self._k(key)))
        except Exception as e:  # noqa: BLE001
            err = self._client_error(e, key)
            if isinstance(err, KeyMissing):
                return None
            raise err from None

    def head_size(self, key: str) -> int | None:
        r = self._head(key)
        return None if r is None else int(r["ContentLength"])

    def head_etag(self, key: str) -> str | None:
        r = self._head(key)
        return None if r is None else str(r["ETag"])

    def if_match(self, etag: str) -> str:
        """The If-Match value for `etag` in the spelling this store matches (see the module doc)."""
        core = etag_core(etag)
        return f'"{core}"' if self.etag_form == "quoted" else core

    # -- conditional writes ----------------------------------------------------------------------
    def _put(self, key: str, data: bytes, ctype: str | None = None, **cond: str) -> str:
        ctype = ctype or ("application/json" if key.endswith(".json") or key.startswith("manifests/")
                          else "application/octet-stream")

        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()

        def once() -> tuple[str, bool]:
            r = self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, ContentType=ctype, **cond)
            kms = str(r.get("ServerSideEncryption") or "").startswith("aws:kms") or bool(r.get("SSECustomerAlgorithm"))
            return r["ETag"], not kms

        for attempt in range(self.attempts):
            etag, etag_is_md5 = self._call(f"PUT {key}", once)
            got = etag.strip('"')
            if not etag_is_md5 or got == md5 or not _PLAIN_MD5.fullmatch(got):
                return etag
            # A single-part PUT's ETag is the MD5 of the bytes the store received, so other bytes than
            # ours arrived (altered in transit; a store that checks no checksum keeps them). Replace
            # exactly that object, or an immutable key would hold wrong bytes forever.
            cond = {"IfMatch": self.if_match(etag)} if self.conditional_swap else {}
            self.backoff(attempt)
        raise IntegrityError(f"PUT {key} on {self.describe()}: the store received other bytes than were sent, "
                             f"{self.attempts} times", hint="check the network path to the store (a proxy?)")

    def _is_precondition(self, e: Exception) -> bool:
        status, code = self._status(e)
        return status == 412 or code == "PreconditionFailed"

    def put_if_absent(self, key: str, data: bytes) -> bool:
        self.check_writable()
        from botocore.exceptions import ClientError

        if not self.conditional_create:  # single-writer mode on a store that ignores If-None-Match
            if self._head(key) is not None:
                return False
            self._put(key, data)
            return True
        try:
            self._put(key, data, IfNoneMatch="*")
            return True
        except ClientError as e:
            if self._is_precondition(e):
                return False
            raise self._client_error(e, key) from None

    def put_public(self, key: str, data: bytes) -> None:
        self.check_writable()
        from botocore.exceptions import ClientError

        from registry.remotes.base import content_type

        try:
            self._put(key, data, content_type(key))
        except ClientError as e:
            raise self._client_error(e, key) from None

    def put_doc(self, key: str, data: bytes, *, etag: str | None) -> str:
        self.check_writable()
        from botocore.exceptions import ClientError

        cond: dict[str, str]
        if etag is None and self.conditional_create:
            cond = {"IfNoneMatch": "*"}
        elif etag is not None and self.conditional_swap:
            cond = {"IfMatch": self.if_match(etag)}
        else:  # single-writer mode on a store that ignores the header: check, then write
            current = self.head_etag(key)
            if (current is None) != (etag is None) or (etag and etag_core(current or "") != etag_core(etag)):
                raise CasFailed(f"{key} changed since it was read")
            cond = {}
        try:
            return self._put(key, data, **cond)
        except ClientError as e:
            status, _ = self._status(e)
            if self._is_precondition(e) or (etag is not None and status == 404):
                raise CasFailed(f"{key} changed since it was read") from None
            raise self._client_error(e, key) from None

    # -- admin -----------------------------------------------------------------------------------
    def list_keys(self, prefix: str, start_after: str | None = None) -> Iterator[str]:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._k(prefix)}
        if start_after:
            kw["StartAfter"] = self._k(start_after)
        while True:  # page by page, each through the retry loop (a paginator would not retry)
            page = self._call(f"LIST {prefix}", lambda: self.client.list_objects_v2(**kw))
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self.prefix):]
            if not page.get("IsTruncated") or not page.get("NextContinuationToken"):
                return
            kw["ContinuationToken"] = page["NextContinuationToken"]

    def delete(self, key: str) -> None:
        self.check_writable()
        self._call(f"DELETE {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=self._k(key)))

    def close(self) -> None:
        self.client.close()

"""A real S3 server (moto's WSGI app) on 127.0.0.1, buckets on it, and the test credentials.

The server is single-threaded (werkzeug `make_server(..., threaded=False)`): one request at a time,
so its conditional writes are atomic as on real S3, which the race tests rely on.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Self

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class Endpoint(str):
    """An S3 endpoint URL that also says which server it is (`kind`: "moto" or "rgw")."""

    kind: str

    def __new__(cls, url: str, kind: str) -> Self:
        e = super().__new__(cls, url)
        e.kind = kind
        return e

    def __reduce__(self):  # picklable (multiprocessing passes endpoints to child processes)
        return (Endpoint, (str(self), self.kind))


@contextmanager
def moto_server() -> Iterator[str]:
    """Start moto's S3 app single-threaded on a free port; yield its URL; stop it afterwards."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log_request(self, *a, **k):
            pass

    app = DomainDispatcherApplication(create_backend_app)
    srv = make_server("127.0.0.1", 0, app, threaded=False, request_handler=Quiet)
    t = threading.Thread(target=srv.serve_forever, name="moto-s3", daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=5)


def s3_client(endpoint: str, **config):
    """A boto3 client on `endpoint` with the test credentials (`config`: botocore Config options)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                        region_name="us-east-1", config=Config(**config) if config else None)


def make_bucket(endpoint: str, bucket: str) -> None:
    s3 = s3_client(endpoint)
    s3.create_bucket(Bucket=bucket)
    s3.close()


def new_bucket(endpoint: str, prefix: str = "pfx") -> str:
    """Create a bucket with a fresh random name starting with `prefix`; return its name."""
    bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
    make_bucket(endpoint, bucket)
    return bucket


def isolate_aws_env(monkeypatch, config_file, credentials_file=None) -> None:
    """Point boto3 at the test credentials only: no endpoint, profile or offline setting from outside."""
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "PFX_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    if credentials_file is not None:
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials_file))

"""Fixtures shared by every test (the helpers are in tests/kit/).

toy_base, toy_cov, clean_base: the embedded toy base on CPU (once per session) and its covariance.
s3_url, bucket, aws_env: an S3 server per module (moto; also Ceph RGW in modules that set S3_SERVERS), a fresh
bucket on it, and an environment that points
boto3 at the test credentials only (modules that talk to S3 in-process use it:
`pytestmark = pytest.mark.usefixtures("aws_env")`).
"""

import os

import pytest

from tests.kit.s3 import Endpoint, isolate_aws_env, moto_server, new_bucket

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def toy_base():
    """The embedded toy base on CPU in fp32 (loaded once per test session; tests must leave it clean)."""
    import torch

    from perfusion_hub.bases import load_base

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return load_base("toy", device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def toy_cov(toy_base):
    from perfusion_hub.covariance import packaged_covariance

    return packaged_covariance(toy_base)


@pytest.fixture
def clean_base(toy_base):
    """The toy base, guaranteed free of loaded concepts before and after the test."""
    from perfusion_hub.loaders import unload_concepts

    unload_concepts(toy_base.pipe)
    yield toy_base
    unload_concepts(toy_base.pipe)


def pytest_generate_tests(metafunc):
    """A module that sets `S3_SERVERS = ("moto", "rgw")` runs each test using `s3_url` on every server
    named; other modules get moto alone, unparametrized."""
    servers = getattr(metafunc.module, "S3_SERVERS", None)
    if servers and "s3_url" in metafunc.fixturenames:
        metafunc.parametrize("s3_url", list(servers), indirect=True, scope="module")


@pytest.fixture(scope="module")
def s3_url(request):
    """An S3 endpoint for the module: a moto server, or (param "rgw") the session's Ceph RGW
    (tests/kit/servers.py; skipped with the reason where the Ceph packages are not installed)."""
    kind = getattr(request, "param", "moto")
    if kind == "rgw":
        from tests.kit.servers import rgw_skip_reason, shared_rgw

        if (why := rgw_skip_reason()) is not None:
            pytest.skip(why)
        yield Endpoint(shared_rgw().endpoint, "rgw")
        return
    with moto_server() as url:
        yield Endpoint(url, "moto")


@pytest.fixture
def rgw():
    """The session's Ceph RGW (tests/kit/servers.py); skipped with the reason where Ceph is not installed."""
    from tests.kit.servers import rgw_skip_reason, shared_rgw

    if (why := rgw_skip_reason()) is not None:
        pytest.skip(why)
    return shared_rgw()


@pytest.fixture
def s3rver(monkeypatch):
    """The session's s3rver (a store that ignores conditional headers), with its credentials in the environment."""
    from tests.kit.servers import S3RVER_ENV, s3rver_skip_reason, shared_s3rver

    if (why := s3rver_skip_reason()) is not None:
        pytest.skip(why)
    for k, v in S3RVER_ENV.items():
        monkeypatch.setenv(k, v)
    return shared_s3rver()


@pytest.fixture
def bucket(s3_url):
    """A fresh, empty bucket on the module's server."""
    return new_bucket(s3_url)


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Test credentials only: no AWS config or credentials file, endpoint, profile or PFX_OFFLINE from outside."""
    isolate_aws_env(monkeypatch, tmp_path / "no-aws-config", tmp_path / "no-aws-creds")

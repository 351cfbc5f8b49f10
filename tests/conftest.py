"""Fixtures shared by every test (the helpers are in tests/kit/).

toy_base, toy_cov, clean_base: the embedded toy base on CPU (once per session) and its covariance.
s3_url, bucket, aws_env: a moto S3 server per module, a fresh bucket on it, and an environment that points
boto3 at the test credentials only (modules that talk to S3 in-process use it:
`pytestmark = pytest.mark.usefixtures("aws_env")`).
"""

import os

import pytest

from tests.kit.s3 import isolate_aws_env, moto_server, new_bucket

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


@pytest.fixture(scope="module")
def s3_url():
    """A moto S3 server for the module."""
    with moto_server() as url:
        yield url


@pytest.fixture
def bucket(s3_url):
    """A fresh, empty bucket on the module's server."""
    return new_bucket(s3_url)


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Test credentials only: no AWS config or credentials file, endpoint, profile or PFX_OFFLINE from outside."""
    isolate_aws_env(monkeypatch, tmp_path / "no-aws-config", tmp_path / "no-aws-creds")

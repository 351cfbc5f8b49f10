import os

import pytest

from tests.s3server import bucket, pytest_generate_tests, s3_url  # noqa: F401  (fixtures: a module's S3 server, a fresh bucket; S3_SERVERS)

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

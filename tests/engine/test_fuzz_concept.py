"""Hostile concept files against `read_header_bytes`, `read_header` and `load_concept`.

Structured fuzzing (tests/kit/fuzz.py): start from valid concept files, apply mutations (oversized or lying header sizes,
overlapping / out-of-range / gapped offsets, wrong dtypes and shapes, huge declared shapes, NaN/Inf
values, huge metadata, non-UTF-8, duplicate keys, byte flips, truncations, insertions). Properties:

* every refusal is a ConceptFormatError - never another exception type;
* nothing invalid is accepted: whatever is accepted is re-checked by an independent oracle (the
  safetensors library parses it to the same tensors, the v1 structure holds, values are finite);
* structural refusals happen before any tensor is materialised (safetensors' loader is never called);
* each case takes bounded time, and memory never scales with a size the file declares.

And pickle is never unpickled: a `torch.save` file whose payload would create a marker file when
unpickled is refused as a concept (renamed .safetensors), as a training checkpoint, and as a base.
"""

from __future__ import annotations

import math
import struct
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perfusion_hub.concept import ConceptFormatError, load_concept, read_header, read_header_bytes
from tests.kit.concepts import DEEP, concept_bytes
from tests.kit.fuzz import CASE_SECONDS, LoaderSpy, check_case, join, mutated, seed_file, split

FUZZ_EXAMPLES = 1000


def test_seed_files_are_accepted():
    for s in range(3):
        assert check_case(seed_file(s)) == "accepted"


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(mutated())
def test_fuzzed_concept_files_are_refused_cleanly_or_really_valid(monkeypatch, data):
    check_case(data, LoaderSpy(monkeypatch))


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2048))
def test_random_bytes_are_refused(data):
    with pytest.raises(ConceptFormatError):
        read_header_bytes(data)


@pytest.mark.parametrize("shape", [[2**31 - 1], [2**31 - 1, 2**31 - 1], [65536, 65536, 65536]])
def test_memory_never_scales_with_a_declared_size(tmp_path, shape):
    h, body = split(seed_file(0))
    h["token_embedding"]["shape"] = shape
    h["token_embedding"]["data_offsets"] = [0, math.prod(shape) * 4]
    data = join(h, body)
    lying_size = join(*split(seed_file(0)), declared=2**63)
    for blob in (data, lying_size):
        tracemalloc.start()
        with pytest.raises(ConceptFormatError):
            read_header_bytes(blob)
        with pytest.raises(ConceptFormatError):
            load_concept(blob)
        path = tmp_path / "x.safetensors"
        path.write_bytes(blob)
        with pytest.raises(ConceptFormatError):
            read_header(path)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 4 * len(blob) + (2 << 20), peak


def test_header_size_cap_reads_a_bounded_prefix(tmp_path):
    """A file declaring a 1 GB header is refused after reading at most 8 + cap bytes."""
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 1 << 30))
        f.write(b"{" * 1024)
    t0 = time.perf_counter()
    with pytest.raises(ConceptFormatError, match="limit"):
        read_header(path)
    assert time.perf_counter() - t0 < CASE_SECONDS


def test_concept_with_deeply_nested_training_metadata_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load, save

    good = tmp_path / "c.safetensors"
    good.write_bytes(concept_bytes("cat", "1.0.0"))
    with safe_open(str(good), "np") as f:
        meta = dict(f.metadata())
    meta["training"] = DEEP.decode()
    data = save(load(good.read_bytes()), metadata=meta)
    with pytest.raises(ConceptFormatError, match="nested too deeply"):
        read_header_bytes(data)


# -- pickle -------------------------------------------------------------------------------------------


class Armed:
    """Unpickling this creates `path` (stands in for arbitrary code execution)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def pickle_bomb(tmp_path):
    import torch

    marker = tmp_path / "UNPICKLED"
    bomb = tmp_path / "bomb.pt"
    torch.save({"token_embedding": torch.zeros(8), "payload": Armed(str(marker))}, bomb)
    # The bomb is armed: unpickling it does create the marker.
    torch.load(bomb, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return bomb, marker


def test_pickle_concept_is_refused_without_unpickling(tmp_path, pickle_bomb):
    from registry.home import Home

    bomb, marker = pickle_bomb
    fake = tmp_path / "concept.safetensors"
    fake.write_bytes(bomb.read_bytes())
    with pytest.raises(ConceptFormatError):
        read_header(fake)
    with pytest.raises(ConceptFormatError):
        load_concept(fake)
    with pytest.raises(ConceptFormatError):
        load_concept(fake.read_bytes())
    with pytest.raises(ConceptFormatError):
        Home.open(tmp_path / "home").add_concept_file(fake)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin", ".pth"])
def test_pickle_base_is_refused_without_unpickling(tmp_path, pickle_bomb, suffix):
    from perfusion_hub.bases import load_base
    from tests.kit.runner import clean_error, pfx

    bomb, marker = pickle_bomb
    base = tmp_path / f"model{suffix}"
    base.write_bytes(bomb.read_bytes())
    with pytest.raises(Exception) as e:
        load_base(str(base), device="cpu", dtype="fp32")
    assert "pickle" in str(e.value)
    if suffix == ".ckpt":  # and through the real CLI (one suffix: each run imports torch and diffusers)
        p = pfx(tmp_path / "home", "render", "a photo of a cat", "--base", str(base), "--steps", "1",
                "-o", str(tmp_path / "x.png"))
        assert clean_error(p) and "pickle" in p.stderr
    assert not marker.exists()


def test_pickle_training_checkpoint_is_refused_without_unpickling(tmp_path, pickle_bomb):
    """`pfx train --resume` reads a checkpoint from the home; a pickle planted there is not loaded."""
    from perfusion_hub.train import _load_checkpoint

    bomb, marker = pickle_bomb
    with pytest.raises(Exception):  # noqa: B017 - safetensors refuses the header; nothing is unpickled
        _load_checkpoint(bomb, {}, {}, None, None, None, None)
    assert not marker.exists()

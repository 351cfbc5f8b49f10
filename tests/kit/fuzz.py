"""The structured concept-file fuzzer and its oracle, run by tests/engine/test_fuzz_concept.py and, for
many more cases, bench/hardening.py.

`mutated()` (a hypothesis strategy) starts from valid concept files and applies one mutation: oversized
or lying header sizes, overlapping / out-of-range / gapped offsets, wrong dtypes and shapes, huge declared
shapes, NaN/Inf values, huge metadata, non-UTF-8, duplicate keys, byte flips, truncations, insertions.
`check_case(data)` runs the readers on one file and checks the properties: every refusal is a
ConceptFormatError, whatever is accepted passes an independent oracle, structural refusals happen
before any tensor is materialised, and the case takes bounded time.
"""

from __future__ import annotations

import json
import math
import struct
import time

from hypothesis import strategies as st

from perfusion_hub.concept import (
    MAX_HEADER_BYTES,
    ConceptFormatError,
    load_concept,
    read_header_bytes,
)
from tests.kit.concepts import concept_bytes

CASE_SECONDS = 0.5  # generous for 2 shared cores; typical cases take well under a millisecond


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict | bytes, body: bytes, *, declared: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if declared is None else declared) + text + body


def seed_file(seed: int, dim: int = 8, layers: int = 2) -> bytes:
    return concept_bytes("fuzz", "1.0.0", seed=seed, dim=dim, layers=layers)


# -- mutations: each takes (valid bytes, draw) and returns hostile bytes ------------------------------


def _tensor_keys(h: dict) -> list[str]:
    return sorted(k for k in h if k != "__metadata__")


@st.composite
def mutated(draw) -> bytes:
    data = seed_file(draw(st.integers(0, 5)), dim=draw(st.sampled_from([4, 8, 16])), layers=draw(st.integers(1, 3)))
    h, body = split(data)
    keys = _tensor_keys(h)
    kind = draw(st.sampled_from([
        "declared_size", "offsets", "dtype", "shape", "huge_shape", "nan", "metadata_huge", "metadata_type",
        "non_utf8", "duplicate", "flip", "truncate", "insert", "extra_tensor", "missing", "not_object",
        "trailing", "nested",
    ]))
    k = draw(st.sampled_from(keys))
    if kind == "declared_size":
        n = draw(st.sampled_from([0, 1, 7, MAX_HEADER_BYTES + 1, 2**32, 2**63, 2**64 - 1, len(data)]))
        return struct.pack("<Q", n) + data[8:]
    if kind == "offsets":
        b, e = h[k]["data_offsets"]
        new = draw(st.sampled_from([[b - 1, e], [b, e + 4], [0, e - b], [-4, e], [b, 2**62], [e, b],
                                    [b + 4, e + 4], [b, e - 4], [2**63, 2**63 + e - b], [b, "x"], [b]]))
        h[k]["data_offsets"] = new
        return join(h, body)
    if kind == "dtype":
        h[k]["dtype"] = draw(st.sampled_from(["F64", "I32", "BOOL", "U8", "f32", "F32 ", "", None, 4, "BF16"]))
        return join(h, body)
    if kind == "shape":
        h[k]["shape"] = draw(st.sampled_from([[], [0], [-1], [1.5], ["8"], [True], None, [2, 4], [4, 2, 1]]))
        return join(h, body)
    if kind == "huge_shape":  # declares terabytes; must be refused without allocating them
        h[k]["shape"] = draw(st.sampled_from([[2**31 - 1], [2**31 - 1, 2**31 - 1], [2**40], [10**30]]))
        return join(h, body)
    if kind == "nan":
        b, _ = h[k]["data_offsets"]
        val = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        body = body[:b] + struct.pack("<f", val) + body[b + 4:]
        return join(h, body)
    if kind == "metadata_huge":
        h["__metadata__"]["description"] = "x" * draw(st.sampled_from([MAX_HEADER_BYTES, 3 * MAX_HEADER_BYTES]))
        return join(h, body)
    if kind == "metadata_type":
        field = draw(st.sampled_from(["beta", "tau", "training", "format", "format_version", "name"]))
        h["__metadata__"][field] = draw(st.sampled_from([1, None, [], {}, "nan", "inf", "-1", "{", "2"]))
        return join(h, body)
    if kind == "non_utf8":
        text = json.dumps(h).encode()
        i = draw(st.integers(0, len(text) - 1))
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"]))
        return join(text[:i] + bad + text[i + 1:], body)
    if kind == "duplicate":
        text = json.dumps(h)
        where = draw(st.sampled_from(["top", "meta", "spec"]))
        if where == "top":
            text = text[:-1] + ", " + json.dumps(k) + ": " + json.dumps(h[k]) + "}"
        elif where == "meta":
            text = text.replace('"__metadata__": {', '"__metadata__": {"name": "evil", ', 1)
        else:
            spec = json.dumps(h[k])
            text = text.replace(spec, spec[:-1] + ', "dtype": "F32"}', 1)
        return join(text.encode(), body)
    if kind == "flip":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "insert":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(min_size=1, max_size=16)) + data[i:]
    if kind == "extra_tensor":
        h["evil"] = {"dtype": "F32", "shape": [1], "data_offsets": [len(body), len(body) + 4]}
        return join(h, body + b"\0\0\0\0")
    if kind == "missing":
        spec = h.pop(k)
        b, e = spec["data_offsets"]
        for other in keys:  # keep offsets contiguous so only the missing key is wrong
            if other != k and h[other]["data_offsets"][0] >= e:
                h[other]["data_offsets"] = [o - (e - b) for o in h[other]["data_offsets"]]
        return join(h, body[:b] + body[e:])
    if kind == "not_object":
        return join(draw(st.sampled_from([b"[]", b"1", b'"x"', b"null", b"{", b""])), body)
    if kind == "trailing":
        return data + draw(st.binary(min_size=1, max_size=8))
    # nested: deeply nested JSON in metadata position (parser recursion)
    depth = draw(st.sampled_from([100, 5000, 50000]))
    return join(b'{"__metadata__": ' + b"[" * depth + b"]" * depth + b"}", body)


# -- the oracle ---------------------------------------------------------------------------------------


def oracle_accepts(data: bytes) -> None:
    """An accepted file must really be a valid v1 concept (checked without our parser)."""
    import numpy as np
    from safetensors.numpy import load

    tensors = load(data)  # the reference implementation must agree the file is well formed
    h, _ = split(data)
    meta = h["__metadata__"]
    assert meta["format"] == "pfx.concept" and meta["format_version"] == "1"
    assert set(tensors) == set(_tensor_keys(h))
    vec = {tensors[k].shape for k in ("token_embedding", "target_input", "superclass_input")}
    assert len(vec) == 1 and len(next(iter(vec))) == 1
    assert all(t.ndim == 1 and t.size > 0 and t.dtype in (np.float32, np.float16) for t in tensors.values())
    assert all(k in ("token_embedding", "target_input", "superclass_input") or k.startswith("value_target.")
               for k in tensors)
    assert all(np.isfinite(t).all() for t in tensors.values())
    assert math.isfinite(float(meta["beta"])) and float(meta["tau"]) > 0
    json.loads(meta["training"])


class LoaderSpy:
    """Records whether safetensors' tensor loader was reached."""

    def __init__(self, monkeypatch):
        import safetensors.torch

        self.calls = 0
        real = safetensors.torch.load

        def spy(data):
            self.calls += 1
            return real(data)

        monkeypatch.setattr(safetensors.torch, "load", spy)


def check_case(data: bytes, spy: LoaderSpy | None = None) -> str:
    """Run the readers on `data`; return 'refused' or 'accepted'; raise AssertionError on a violation."""
    t0 = time.perf_counter()
    try:
        read_header_bytes(data)
        header_ok = True
    except ConceptFormatError:
        header_ok = False
    # Any other exception propagates and fails the test.
    before = spy.calls if spy else 0
    try:
        load_concept(data)
        loaded = True
    except ConceptFormatError:
        loaded = False
    if spy is not None and not header_ok:
        assert spy.calls == before, "a tensor was materialised from a structurally invalid file"
    assert time.perf_counter() - t0 < CASE_SECONDS, f"case took {time.perf_counter() - t0:.2f} s"
    if loaded:
        assert header_ok
        oracle_accepts(data)
        return "accepted"
    return "refused"

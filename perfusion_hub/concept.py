"""Concept file format v1: one `.safetensors` file per concept, no pickle anywhere.

The header is parsed by hand (no torch, no safetensors import) so that the registry and the fast CLI
commands can read and check a concept without loading heavy libraries. Every structural property is
checked before any tensor byte is interpreted: header size cap, strict JSON (no duplicate keys),
dtype allowlist, shapes, offsets contiguous and in bounds, and the exact set of keys v1 allows.

Tensors (spec/perfusion.md section 4):
  token_embedding [D], target_input [D], superclass_input [D], value_target.<attn2 path> [d_l]
Metadata (string -> string; JSON where structured) is listed in REQUIRED_METADATA; the optional card keys
(Stability AI ModelSpec `modelspec.*` keys, licence permissions, base family) are perfusion_hub.card's,
checked here too. Files without them (written before the card existed) load as before.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perfusion_hub import card as _card

FORMAT = "pfx.concept"
FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 1 << 20  # a v1 concept header is a few KB; refuse anything near safetensors' 100 MB cap
MAX_CONCEPT_BYTES = 8 << 20  # SD1.5 fp32 is ~60 KB; 8 MB leaves room for wide bases and long metadata
VALUE_PREFIX = "value_target."
VECTOR_KEYS = ("token_embedding", "target_input", "superclass_input")
DTYPE_SIZES = {"F32": 4, "F16": 2}
REQUIRED_METADATA = (
    "format", "format_version", "name", "version", "superclass", "trigger", "base_name", "base_digest",
    "covariance_digest", "corpus_digest", "beta", "tau", "key_lock", "training", "created", "pfx_version",
)


class ConceptFormatError(ValueError):
    """The bytes are not a valid v1 concept file. The message says exactly what is wrong."""


class ConceptMismatchError(ValueError):
    """A valid concept that does not fit the base it is being applied to."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class _Metadata:
    """Read-only views of the header metadata, shared by ConceptHeader and Concept."""

    metadata: dict[str, str]

    @property
    def name(self) -> str:
        return self.metadata["name"]

    @property
    def version(self) -> str:
        return self.metadata["version"]

    @property
    def trigger(self) -> str:
        return self.metadata["trigger"]

    @property
    def superclass(self) -> str:
        return self.metadata["superclass"]

    @property
    def base_digest(self) -> str:
        return self.metadata["base_digest"]

    @property
    def beta(self) -> float:
        return float(self.metadata["beta"])

    @property
    def tau(self) -> float:
        return float(self.metadata["tau"])

    def training(self) -> dict[str, Any]:
        return json.loads(self.metadata["training"])

    def describe(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class ConceptHeader(_Metadata):
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_start: int  # absolute file offset of the data section

    @property
    def dim(self) -> int:
        return self.tensors["token_embedding"].shape[0]

    @property
    def layers(self) -> dict[str, int]:
        """attn2 module path -> output width d_l, in file order."""
        return {k[len(VALUE_PREFIX):]: t.shape[0] for k, t in self.tensors.items() if k.startswith(VALUE_PREFIX)}


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ConceptFormatError(f"header has a duplicate key {k!r}")
        out[k] = v
    return out


def parse_safetensors_header(
    head: bytes, file_size: int, *, max_header: int = MAX_HEADER_BYTES, dtypes=DTYPE_SIZES
) -> tuple[dict[str, str], dict[str, TensorInfo], int]:
    """Parse and check a safetensors header. `head` must hold at least the first 8 + header bytes.

    Returns (metadata, tensors in offset order, data_start). Generic: used for concept and covariance files.
    """
    if file_size < 8 or len(head) < 8:
        raise ConceptFormatError(f"file is {file_size} bytes: too short to be safetensors")
    (n,) = struct.unpack("<Q", head[:8])
    if n > max_header:
        raise ConceptFormatError(f"header declares {n} bytes, over the {max_header}-byte limit")
    if 8 + n > file_size:
        raise ConceptFormatError(f"header declares {n} bytes but the file has only {file_size - 8} after the size")
    if len(head) < 8 + n:
        raise ConceptFormatError("truncated header")
    try:
        text = head[8 : 8 + n].decode("utf-8")
        raw = json.loads(text, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise ConceptFormatError(f"header is not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConceptFormatError(f"header is not valid JSON: {e.msg} at position {e.pos}") from None
    except RecursionError:  # a header of a few KB of '[' fits under the size cap
        raise ConceptFormatError("header JSON is nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConceptFormatError("header is not a JSON object")
    meta = raw.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ConceptFormatError("__metadata__ must map strings to strings")
    data_len = file_size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for key, spec in raw.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise ConceptFormatError(f"tensor {key!r}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offs = spec["dtype"], spec["shape"], spec["data_offsets"]
        if dtype not in dtypes:
            raise ConceptFormatError(f"tensor {key!r}: dtype {dtype!r} not allowed (allowed: {', '.join(dtypes)})")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 1 << 31 for d in shape):
            raise ConceptFormatError(f"tensor {key!r}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise ConceptFormatError(f"tensor {key!r}: data_offsets must be two integers")
        b, e = offs
        if not 0 <= b <= e <= data_len:
            raise ConceptFormatError(f"tensor {key!r}: offsets [{b}, {e}] outside the {data_len}-byte data section")
        if e - b != math.prod(shape) * dtypes[dtype]:
            raise ConceptFormatError(f"tensor {key!r}: {e - b} bytes do not match shape {shape} of {dtype}")
        infos[key] = TensorInfo(dtype, tuple(shape), b, e)
    ordered = sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end))
    pos = 0
    for key, t in ordered:
        if t.begin != pos:
            what = "overlaps the previous tensor" if t.begin < pos else f"leaves a gap at byte {pos}"
            raise ConceptFormatError(f"tensor {key!r} {what}")
        pos = t.end
    if pos != data_len:
        raise ConceptFormatError(f"data section has {data_len - pos} trailing bytes not covered by any tensor")
    return meta, dict(ordered), 8 + n


def _check_concept_structure(meta: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ConceptFormatError(f"metadata lacks {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise ConceptFormatError(f"metadata format is {meta['format']!r}, expected {FORMAT!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ConceptFormatError(
            f"format version {meta['format_version']!r} is not supported by this pfx (reads {FORMAT_VERSION!r})"
        )
    for k in ("beta", "tau"):
        try:
            v = float(meta[k])
        except ValueError:
            raise ConceptFormatError(f"metadata {k}={meta[k]!r} is not a number") from None
        if not math.isfinite(v) or (k == "tau" and v <= 0):
            raise ConceptFormatError(f"metadata {k}={meta[k]!r} is out of range")
    try:
        json.loads(meta["training"])
    except json.JSONDecodeError:
        raise ConceptFormatError("metadata 'training' is not JSON") from None
    except RecursionError:
        raise ConceptFormatError("metadata 'training' JSON is nested too deeply") from None
    try:
        _card.check_card_metadata(meta)
    except _card.CardError as e:
        raise ConceptFormatError(str(e)) from None
    for k in VECTOR_KEYS:
        if k not in tensors:
            raise ConceptFormatError(f"tensor {k!r} is missing")
    dims = {tensors[k].shape for k in VECTOR_KEYS}
    if len(dims) != 1 or len(next(iter(dims))) != 1 or next(iter(dims))[0] == 0:
        raise ConceptFormatError(f"{', '.join(VECTOR_KEYS)} must be vectors of one common length, got {sorted(dims)}")
    values = [k for k in tensors if k.startswith(VALUE_PREFIX)]
    if not values:
        raise ConceptFormatError("no value_target.* tensors")
    extra = [k for k in tensors if k not in VECTOR_KEYS and not k.startswith(VALUE_PREFIX)]
    if extra:
        raise ConceptFormatError(f"unexpected tensors: {', '.join(sorted(extra)[:5])}")
    for k in values:
        if len(tensors[k].shape) != 1 or tensors[k].shape[0] == 0:
            raise ConceptFormatError(f"tensor {k!r} must be a non-empty vector, got shape {list(tensors[k].shape)}")
    if len({t.dtype for t in tensors.values()}) != 1:
        raise ConceptFormatError("all tensors must share one dtype")


def read_header_bytes(data: bytes) -> ConceptHeader:
    """Check a whole concept file held in memory (header and structure; tensor values are not read)."""
    if len(data) > MAX_CONCEPT_BYTES:
        raise ConceptFormatError(f"file is {len(data)} bytes, over the {MAX_CONCEPT_BYTES}-byte concept limit")
    meta, tensors, start = parse_safetensors_header(data, len(data))
    _check_concept_structure(meta, tensors)
    check_tensor_hash(meta, data)
    return ConceptHeader(meta, tensors, start)


def check_tensor_hash(meta: dict[str, str], data: bytes) -> None:
    """A file that states modelspec.hash_sha256 must match it (the data section's sha256, card.py)."""
    want = meta.get("modelspec.hash_sha256")
    if want is not None and _card.tensor_hash(data) != want:
        raise ConceptFormatError(
            f"modelspec.hash_sha256 is {want[:18]}..., but the tensors hash to {_card.tensor_hash(data)[:18]}...: "
            "the tensor data was changed after the header was written (a corrupt or tampered file)")


def read_header(path: str | os.PathLike) -> ConceptHeader:
    """Read and check a concept file's header without importing torch."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONCEPT_BYTES:
            raise ConceptFormatError(f"{path}: {size} bytes, over the {MAX_CONCEPT_BYTES}-byte concept limit")
        with open(path, "rb") as f:
            head = f.read(8 + MAX_HEADER_BYTES)
    except OSError as e:
        raise ConceptFormatError(f"cannot read {path}: {e.strerror}") from None
    try:
        meta, tensors, start = parse_safetensors_header(head, size)
        _check_concept_structure(meta, tensors)
    except ConceptFormatError as e:
        raise ConceptFormatError(f"{path}: {e}") from None
    return ConceptHeader(meta, tensors, start)


# --------------------------------------------------------------------------------------------------
# Tensor side (torch imported lazily)


@dataclass
class Concept(_Metadata):
    """A concept in memory: tensors as fp32 torch tensors plus its metadata."""

    metadata: dict[str, str]
    token_embedding: Any
    target_input: Any
    superclass_input: Any
    value_targets: dict[str, Any] = field(default_factory=dict)  # attn2 path -> [d_l]
    digest: str = ""  # sha256 of the file it was loaded from ("" for one built in memory)

    def tensors(self) -> dict[str, Any]:
        out = {
            "token_embedding": self.token_embedding,
            "target_input": self.target_input,
            "superclass_input": self.superclass_input,
        }
        out.update({VALUE_PREFIX + k: v for k, v in self.value_targets.items()})
        return out


def load_concept(path: str | os.PathLike | bytes) -> Concept:
    """Check the file completely, then load it. Non-finite values are refused."""
    import torch
    from safetensors.torch import load as st_load

    if isinstance(path, bytes | bytearray):
        data = bytes(path)
        where = "concept"
    else:
        header = read_header(path)  # size and structure checked before reading the whole file
        data = Path(path).read_bytes()
        where = str(path)
        del header
    try:
        header = read_header_bytes(data)
    except ConceptFormatError as e:
        raise ConceptFormatError(f"{where}: {e}") from None
    tensors = st_load(data)
    for k, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ConceptFormatError(f"{where}: tensor {k!r} holds NaN or Inf")
    t32 = {k: v.float() for k, v in tensors.items()}
    import hashlib

    return Concept(
        digest="sha256:" + hashlib.sha256(data).hexdigest(),
        metadata=dict(header.metadata),
        token_embedding=t32["token_embedding"],
        target_input=t32["target_input"],
        superclass_input=t32["superclass_input"],
        value_targets={k[len(VALUE_PREFIX):]: t32[k] for k in header.tensors if k.startswith(VALUE_PREFIX)},
    )


def serialize_safetensors(tensors: dict[str, tuple[str, tuple[int, ...], bytes]], metadata: dict[str, str]) -> bytes:
    """Canonical safetensors bytes: tensors in name order, metadata keys sorted, compact JSON.

    The safetensors library orders metadata by hash, so the same concept could get different bytes (and
    digests) from run to run; writing the (simple) format here makes equal concepts byte-identical.
    """
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset, chunks = 0, []
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        chunks.append(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def concept_bytes(concept: Concept, *, dtype: str = "fp32") -> bytes:
    import torch

    torch_dtype, code = {"fp32": (torch.float32, "F32"), "fp16": (torch.float16, "F16")}[dtype]
    meta = dict(concept.metadata)
    meta.setdefault("format", FORMAT)
    meta.setdefault("format_version", FORMAT_VERSION)
    tensors = {}
    for k, v in concept.tensors().items():
        t = v.detach().to("cpu", torch_dtype).contiguous()
        tensors[k] = (code, tuple(t.shape), t.view(torch.uint8).numpy().tobytes())
    # The card's ModelSpec keys (title, trigger phrase, architecture...) and the tensor-content hash.
    meta = _card.apply_card(meta)
    meta = _card.stamp_hash(meta, b"".join(tensors[k][2] for k in sorted(tensors)))
    data = serialize_safetensors(tensors, meta)
    read_header_bytes(data)  # never write a file we would refuse to read
    return data


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are meant to be shared and shipped
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_concept(concept: Concept, path: str | os.PathLike, *, dtype: str = "fp32") -> Path:
    atomic_write_bytes(path, concept_bytes(concept, dtype=dtype))
    return Path(path)


def check_fits_base(header: ConceptHeader | Concept, *, base_name: str, base_digest: str, dim: int,
                    layers: dict[str, int], compatible: set[str] | frozenset = frozenset()) -> None:
    """Raise ConceptMismatchError naming both bases, or the exact key/shape that differs."""
    meta = header.metadata
    who = f"{meta['name']}@{meta['version']}"
    if meta["base_digest"] != base_digest and meta["base_digest"] not in compatible:
        raise ConceptMismatchError(
            f"{who} was trained for base '{meta['base_name']}' ({meta['base_digest'][:19]}), "
            f"but the base in use is '{base_name}' ({base_digest[:19]}); render with --base {meta['base_name']} "
            "or declare the bases compatible"
        )
    if isinstance(header, ConceptHeader):
        cdim, clayers = header.dim, header.layers
    else:
        cdim, clayers = header.token_embedding.shape[0], {k: v.shape[0] for k, v in header.value_targets.items()}
    if cdim != dim:
        raise ConceptMismatchError(f"{who} has {cdim}-d text encodings; the base uses {dim}-d")
    missing = sorted(set(layers) - set(clayers))
    extra = sorted(set(clayers) - set(layers))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks value targets for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"has value targets for layers the base lacks: {', '.join(extra[:3])}")
        raise ConceptMismatchError(f"{who} {'; '.join(parts)}")
    for k, d in layers.items():
        if clayers[k] != d:
            raise ConceptMismatchError(f"{who}: value target for {k} has {clayers[k]} values; the base layer has {d}")

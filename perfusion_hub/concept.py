"""Concept file format: one `.safetensors` file per concept, no pickle anywhere.

The header is parsed by hand (no torch, no safetensors import) so that the registry and the fast CLI
commands can read and check a concept without loading heavy libraries. Every structural property is
checked before any tensor byte is interpreted: header size cap, strict JSON (no duplicate keys),
dtype allowlist, shapes, offsets contiguous and in bounds, and the exact set of keys the version allows.

Format v1 (SD1.x; still what pfx writes for SD1.x bases, byte for byte as before), spec/perfusion.md section 4:
  token_embedding [D], target_input [D], superclass_input [D], value_target.<attn2 path> [d_l]
Format v2 (SD2.x and SDXL) records the base family and its text encoders' widths, holds one token embedding
per text encoder, and packs the value targets into one vector:
  metadata  family ("sd1", "sd2" or "sdxl"), text_dims (JSON list, one width per text encoder, e.g. [768, 1280]),
            text_dim (their sum D, e.g. "2048"), value_layers (JSON list of runs [container, n, d]: the attn2
            modules <container>.transformer_blocks.{0..n-1}.attn2, each of width d, in the order their value
            targets are packed: attn2 paths in natural order, i.e. sorted with digit runs compared as numbers)
  tensors   token_embedding [text_dims[0]], token_embedding_2 [text_dims[1]] (SDXL), target_input [D],
            superclass_input [D], value_targets [sum of the layers' d]
  i*, i_super (and the gates, and the base's covariance C) live in the concatenated D-d text space. Packing matters
  for SDXL: its 70 attn2 paths as 70 tensor entries would take ~9 KB of header, one vector and 11 runs take ~0.4 KB.
  An SDXL concept is 768 + 1280 + 2 x 2048 + 83,200 = 89,344 floats: 357,376 bytes of tensors in fp32 (~352 KiB with
  the header), 178,688 in fp16; pfx writes SDXL concepts in fp16, ~177 KiB with a typical header, under the 180 KB
  goal (the fp16 rounding of the value targets, ~5e-4 relative, is far below what training resolves).
A v1 file's family is sd1 (v1 predates families and was written for single-encoder bases).
Metadata (string -> string; JSON where structured) is listed in REQUIRED_METADATA (and V2_METADATA for v2).
The optional card keys (Stability AI ModelSpec `modelspec.*` keys, licence permissions) are perfusion_hub.card's,
checked here too. Files without them (written before the card existed) load as before.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perfusion_hub import card as _card

FORMAT = "pfx.concept"
FORMAT_VERSION = "1"  # SD1.x concepts (and every concept written before families existed)
FORMAT_VERSION_2 = "2"  # SD2.x and SDXL concepts: family and text dims recorded, one token embedding per encoder
FORMAT_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_2)
FAMILIES = {"sd1": 1, "sd2": 1, "sdxl": 2}  # family -> number of text encoders
V2_METADATA = ("family", "text_dims", "text_dim", "value_layers")
VALUES_KEY = "value_targets"  # v2: every value target, packed
MAX_LAYERS = 4096
FAMILY_WORDS = {
    "sd1": "SD1.x (one CLIP text encoder)",
    "sd2": "SD2.x (one OpenCLIP text encoder)",
    "sdxl": "SDXL (CLIP + OpenCLIP bigG text encoders)",
}
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


def format_version_for(family: str) -> str:
    """v1 for SD1.x (unchanged files and digests), v2 for the families v1 cannot describe."""
    return FORMAT_VERSION if family == "sd1" else FORMAT_VERSION_2


def describe_family(family: str, dims=None) -> str:
    """"sdxl" -> "SDXL (CLIP + OpenCLIP bigG text encoders, 768+1280-d text encodings)" (dims when given)."""
    words = FAMILY_WORDS.get(family, repr(family))
    if dims:
        words = words[:-1] + f", {'+'.join(str(d) for d in dims)}-d text encodings)"
    return words


def embedding_key(k: int) -> str:
    """Tensor name of text encoder k's token embedding: token_embedding, token_embedding_2, ..."""
    return "token_embedding" if k == 0 else f"token_embedding_{k + 1}"


def family_metadata(family: str, text_dims: list[int]) -> dict[str, str]:
    """The metadata a concept for this family carries besides REQUIRED_METADATA (nothing for v1 / sd1;
    `value_layers` is added when the file is written, from the value targets themselves)."""
    if format_version_for(family) == FORMAT_VERSION:
        return {}
    return {"family": family, "text_dims": json.dumps([int(d) for d in text_dims]),
            "text_dim": str(sum(int(d) for d in text_dims))}


_ATTN2 = re.compile(r"(.+)\.transformer_blocks\.(\d+)\.attn2")


def natural_key(path: str) -> list:
    """Sort key comparing digit runs as numbers: transformer_blocks.2 before transformer_blocks.10."""
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", path)]


def encode_value_layers(layers: dict[str, int]) -> str:
    """The v2 `value_layers` metadata for {attn2 path: width}: runs [container, n, width], paths in natural order."""
    runs: list[list] = []
    for path in sorted(layers, key=natural_key):
        m = _ATTN2.fullmatch(path)
        if m is None:
            raise ValueError(f"{path!r} is not a '<container>.transformer_blocks.<i>.attn2' module path")
        prefix, t, w = m[1], int(m[2]), int(layers[path])
        if runs and runs[-1][0] == prefix and runs[-1][1] == t and runs[-1][2] == w:
            runs[-1][1] += 1
        elif t == 0:
            runs.append([prefix, 1, w])
        else:
            raise ValueError(f"{path}: transformer blocks of {prefix} are not numbered 0, 1, ... with one width")
    return json.dumps(runs, separators=(",", ":"))


def decode_value_layers(text: str) -> dict[str, int]:
    """{attn2 path: width} in packing order, from `value_layers` metadata (ConceptFormatError when malformed)."""
    try:
        runs = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise ConceptFormatError("metadata 'value_layers' is not JSON") from None
    if not isinstance(runs, list) or not runs:
        raise ConceptFormatError("metadata 'value_layers' must be a non-empty list of [container, n, width] runs")
    out: dict[str, int] = {}
    for run in runs:
        if (not isinstance(run, list) or len(run) != 3 or not isinstance(run[0], str) or not run[0]
                or not all(type(x) is int and 0 < x < 1 << 20 for x in run[1:])):
            raise ConceptFormatError(f"metadata 'value_layers' has a malformed run {str(run)[:80]}")
        prefix, n, w = run
        if len(out) + n > MAX_LAYERS:
            raise ConceptFormatError(f"metadata 'value_layers' lists more than {MAX_LAYERS} layers")
        for t in range(n):
            path = f"{prefix}.transformer_blocks.{t}.attn2"
            if path in out:
                raise ConceptFormatError(f"metadata 'value_layers' lists {path} twice")
            out[path] = w
    if list(out) != sorted(out, key=natural_key):
        raise ConceptFormatError("metadata 'value_layers' is not in natural path order")
    return out


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

    @property
    def format_version(self) -> str:
        return self.metadata.get("format_version", FORMAT_VERSION)

    @property
    def family(self) -> str:
        """The base family the concept is for; a v1 file's is sd1."""
        return self.metadata["family"] if self.format_version == FORMAT_VERSION_2 else "sd1"

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
        """The text-encoding width D (the concatenated width for SDXL)."""
        return self.tensors["target_input"].shape[0]

    @property
    def text_dims(self) -> list[int]:
        """Width of each text encoder's token embedding, in encoder order."""
        return [self.tensors[embedding_key(k)].shape[0] for k in range(FAMILIES[self.family])]

    @property
    def layers(self) -> dict[str, int]:
        """attn2 module path -> output width d_l, in file order (v2: packing order)."""
        if self.format_version == FORMAT_VERSION_2:
            return decode_value_layers(self.metadata["value_layers"])
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
    if meta["format_version"] not in FORMAT_VERSIONS:
        raise ConceptFormatError(
            f"format version {meta['format_version']!r} is not supported by this pfx (reads "
            f"{', '.join(repr(v) for v in FORMAT_VERSIONS)})"
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
    if meta["format_version"] == FORMAT_VERSION:
        _check_v1_tensors(tensors)
    else:
        _check_v2_tensors(meta, tensors)
    if len({t.dtype for t in tensors.values()}) != 1:
        raise ConceptFormatError("all tensors must share one dtype")


def _check_v1_tensors(tensors: dict[str, TensorInfo]) -> None:
    for k in VECTOR_KEYS:
        if k not in tensors:
            raise ConceptFormatError(f"tensor {k!r} is missing")
    dims = {tensors[k].shape for k in VECTOR_KEYS}
    if len(dims) != 1 or len(next(iter(dims))) != 1 or next(iter(dims))[0] == 0:
        raise ConceptFormatError(f"{', '.join(VECTOR_KEYS)} must be vectors of one common length, got {sorted(dims)}")
    extra = [k for k in tensors if k not in VECTOR_KEYS and not k.startswith(VALUE_PREFIX)]
    if extra:
        raise ConceptFormatError(f"unexpected tensors: {', '.join(sorted(extra)[:5])}")
    values = [k for k in tensors if k.startswith(VALUE_PREFIX)]
    if not values:
        raise ConceptFormatError("no value_target.* tensors")
    for k in values:
        if len(tensors[k].shape) != 1 or tensors[k].shape[0] == 0:
            raise ConceptFormatError(f"tensor {k!r} must be a non-empty vector, got shape {list(tensors[k].shape)}")


def _check_v2_tensors(meta: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    missing = [k for k in V2_METADATA if k not in meta]
    if missing:
        raise ConceptFormatError(f"format v2 metadata lacks {', '.join(missing)}")
    family = meta["family"]
    if family not in FAMILIES:
        raise ConceptFormatError(f"metadata family {family!r} is not one of {', '.join(FAMILIES)}")
    try:
        dims = json.loads(meta["text_dims"])
    except (json.JSONDecodeError, RecursionError):
        raise ConceptFormatError("metadata 'text_dims' is not JSON") from None
    if (not isinstance(dims, list) or len(dims) != FAMILIES[family]
            or not all(type(d) is int and 0 < d < 1 << 20 for d in dims)):
        raise ConceptFormatError(f"metadata text_dims {meta['text_dims']!r} must list {FAMILIES[family]} positive "
                                 f"width(s) for family {family}")
    total = meta["text_dim"]
    if not (total.isascii() and total.isdigit()) or int(total) != sum(dims):
        raise ConceptFormatError(f"metadata text_dim {total!r} is not the sum of text_dims {dims}")
    layers = decode_value_layers(meta["value_layers"])
    expected = {embedding_key(k): d for k, d in enumerate(dims)}
    expected.update({"target_input": sum(dims), "superclass_input": sum(dims), VALUES_KEY: sum(layers.values())})
    for k, d in expected.items():
        if k not in tensors:
            raise ConceptFormatError(f"tensor {k!r} is missing")
        if tensors[k].shape != (d,):
            what = f"text_dims {dims}" if k != VALUES_KEY else f"{len(layers)} layers in value_layers"
            raise ConceptFormatError(f"tensor {k!r} has shape {list(tensors[k].shape)}, expected [{d}] ({what})")
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise ConceptFormatError(f"unexpected tensors: {', '.join(sorted(extra)[:5])}")


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
    # token embeddings of the text encoders after the first (v2, SDXL): {"token_embedding_2": [1280]}
    extra_embeddings: dict[str, Any] = field(default_factory=dict)

    def embeddings(self) -> list[Any]:
        """The concept token's input embedding for every text encoder, in encoder order."""
        return [self.token_embedding] + [self.extra_embeddings[embedding_key(k)]
                                         for k in range(1, 1 + len(self.extra_embeddings))]

    @property
    def text_dims(self) -> list[int]:
        return [int(e.shape[0]) for e in self.embeddings()]

    def tensors(self) -> dict[str, Any]:
        """Every tensor by its name in memory (value targets as value_target.<path>, whatever the file format)."""
        out = {
            "token_embedding": self.token_embedding,
            "target_input": self.target_input,
            "superclass_input": self.superclass_input,
        }
        out.update(self.extra_embeddings)
        out.update({VALUE_PREFIX + k: v for k, v in self.value_targets.items()})
        return out

    def file_tensors(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(tensors, metadata) as the file holds them: v1 as `tensors()`; v2 with the value targets packed in natural
        path order and `value_layers` describing them."""
        meta = dict(self.metadata)
        if meta.get("format_version", FORMAT_VERSION) != FORMAT_VERSION_2:
            return self.tensors(), meta
        import torch

        order = sorted(self.value_targets, key=natural_key)
        meta["value_layers"] = encode_value_layers({p: int(self.value_targets[p].shape[0]) for p in order})
        out = {k: v for k, v in self.tensors().items() if not k.startswith(VALUE_PREFIX)}
        out[VALUES_KEY] = torch.cat([self.value_targets[p].reshape(-1).float().cpu() for p in order])
        return out, meta


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
        # value_layers describes the packing of the file's value_targets, which value_targets (a dict) now holds
        metadata={k: v for k, v in header.metadata.items() if k != "value_layers"},
        token_embedding=t32["token_embedding"],
        target_input=t32["target_input"],
        superclass_input=t32["superclass_input"],
        value_targets=_value_targets(header, t32),
        extra_embeddings={embedding_key(k): t32[embedding_key(k)] for k in range(1, FAMILIES[header.family])},
    )


def _value_targets(header: ConceptHeader, t32: dict) -> dict:
    if header.format_version != FORMAT_VERSION_2:
        return {k[len(VALUE_PREFIX):]: t32[k] for k in header.tensors if k.startswith(VALUE_PREFIX)}
    layers = header.layers
    return dict(zip(layers, (t.clone() for t in t32[VALUES_KEY].split(list(layers.values())))))


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
    items, meta = concept.file_tensors()
    meta.setdefault("format", FORMAT)
    meta.setdefault("format_version", FORMAT_VERSION)
    tensors = {}
    for k, v in items.items():
        t = v.detach().to("cpu", torch_dtype).contiguous()
        tensors[k] = (code, tuple(t.shape), t.view(torch.uint8).numpy().tobytes())
    # A concept with a card (train writes one: perfusion_hub.card) gets the hash of the tensors written here; one
    # without (a file from before cards, re-serialized) stays byte for byte what it was.
    if any(k.startswith("modelspec.") for k in meta):
        meta.pop("modelspec.hash_sha256", None)
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
                    layers: dict[str, int], compatible: set[str] | frozenset = frozenset(),
                    family: str | None = None, text_dims: list[int] | None = None) -> None:
    """Raise ConceptMismatchError naming both bases (and both families when they differ), or the exact key/shape
    that differs. `family`/`text_dims`: the base's family and text-encoder widths (perfusion_hub.text), when known.

    A concept for another family is refused first, with both families named: SD1.x, SD2.x and SDXL concepts live in
    different text spaces (768-d CLIP, 1024-d OpenCLIP, 2048-d CLIP+bigG) and UNets, and no declaration of
    compatibility changes that. One exception keeps old files working: a v1 file (family sd1 by definition) trained
    on an SD2 base before families were recorded loads on that same base (its digest matches)."""
    meta = header.metadata
    who = f"{meta['name']}@{meta['version']}"
    if isinstance(header, ConceptHeader):
        cdim, cdims, clayers = header.dim, header.text_dims, header.layers
    else:
        cdim, cdims = header.target_input.shape[0], header.text_dims
        clayers = {k: v.shape[0] for k, v in header.value_targets.items()}
    same_base = meta["base_digest"] == base_digest or meta["base_digest"] in compatible
    legacy = header.format_version == FORMAT_VERSION and family == "sd2" and meta["base_digest"] == base_digest
    if family is not None and header.family != family and not legacy:
        raise ConceptMismatchError(
            f"{who} is a concept for a {describe_family(header.family, cdims)} base ('{meta['base_name']}'), but the "
            f"base in use, '{base_name}', is {describe_family(family, text_dims)}: a concept only works on the family "
            f"it was trained for; render with --base {meta['base_name']} or train it again on this base"
        )
    if not same_base:
        raise ConceptMismatchError(
            f"{who} was trained for base '{meta['base_name']}' ({meta['base_digest'][:19]}), "
            f"but the base in use is '{base_name}' ({base_digest[:19]}); render with --base {meta['base_name']} "
            "or declare the bases compatible"
        )
    if cdim != dim:
        raise ConceptMismatchError(f"{who} has {cdim}-d text encodings; the base uses {dim}-d")
    if text_dims is not None and list(cdims) != list(text_dims):
        raise ConceptMismatchError(f"{who} has token embeddings of widths {list(cdims)}; the base's text encoders "
                                   f"are {list(text_dims)} wide")
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


def edit_card(path: str | os.PathLike, edits: dict[str, Any]) -> None:
    """Apply card `edits` (perfusion_hub.card.apply_card) to a concept file in place, atomically: same tensors,
    new header. For a file being built (train), never for a stored version (registry.cards.edit_card makes a new
    version)."""
    data = Path(path).read_bytes()
    meta = dict(read_header_bytes(data).metadata)
    meta.pop("modelspec.hash_sha256", None)
    meta = _card.stamp_hash(_card.apply_card(meta, edits), _card.data_section(data))
    new = _card.rewrite_metadata(data, meta)
    read_header_bytes(new)
    atomic_write_bytes(path, new)

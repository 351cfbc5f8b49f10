"""The input covariance C of a base: the uncentered second moment of text-encoder outputs.

The outputs are the UNet's context as the pipeline builds it (perfusion_hub.text): one encoder's last hidden
state for SD1.x / SD2.x, the concatenation of both encoders' penultimate states for SDXL (one joint 2048 x 2048 C).
C is accumulated in fp64 over ALL 77 positions of every caption (padding included: the edit sees every
position). Its identity is (base digest, corpus digest); its file is a small safetensors blob whose
sha256 guards integrity. Concepts reference it by those digests and never embed it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from perfusion_hub.concept import ConceptFormatError, atomic_write_bytes, parse_safetensors_header

FORMAT = "pfx.covariance"
MAX_COVARIANCE_BYTES = 64 << 20  # 4096-d fp32 would be 64 MB; SD1.5 (768-d) is 2.4 MB, SDXL (2048-d) 16.8 MB


class Covariance:
    def __init__(self, matrix: torch.Tensor, *, base_digest: str, corpus_digest: str, count: int):
        self.matrix = matrix
        self.base_digest = base_digest
        self.corpus_digest = corpus_digest
        self.count = count
        self._bytes: bytes | None = None

    @property
    def digest(self) -> str:
        """sha256 of this covariance's file (its bytes are fixed once first serialised or loaded)."""
        import hashlib

        return "sha256:" + hashlib.sha256(self.to_bytes()).hexdigest()

    def to_bytes(self) -> bytes:
        if self._bytes is not None:
            return self._bytes
        from safetensors.torch import save

        from perfusion_hub import __version__

        meta = {
            "format": FORMAT,
            "format_version": "1",
            "base_digest": self.base_digest,
            "corpus_digest": self.corpus_digest,
            "count": str(self.count),
            "created": datetime.now(UTC).replace(microsecond=0).isoformat(),
            "pfx_version": __version__,
        }
        self._bytes = save({"covariance": self.matrix.detach().cpu().float().contiguous()}, metadata=meta)
        return self._bytes

    def save(self, path: str | os.PathLike) -> Path:
        atomic_write_bytes(path, self.to_bytes())
        return Path(path)

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "covariance") -> Covariance:
        from safetensors.torch import load

        if len(data) > MAX_COVARIANCE_BYTES:
            raise ConceptFormatError(f"{where}: {len(data)} bytes is over the covariance size limit")
        try:
            meta, tensors, _ = parse_safetensors_header(data, len(data), dtypes={"F32": 4, "F64": 8})
        except ConceptFormatError as e:
            raise ConceptFormatError(f"{where}: {e}") from None
        if meta.get("format") != FORMAT or set(tensors) != {"covariance"}:
            raise ConceptFormatError(f"{where}: not a pfx covariance file")
        shape = tensors["covariance"].shape
        if len(shape) != 2 or shape[0] != shape[1] or not shape[0]:
            raise ConceptFormatError(f"{where}: covariance must be square, got {list(shape)}")
        m = load(data)["covariance"].double()
        if not torch.isfinite(m).all():
            raise ConceptFormatError(f"{where}: covariance holds NaN or Inf")
        cov = cls(m, base_digest=meta.get("base_digest", ""), corpus_digest=meta.get("corpus_digest", ""),
                  count=int(meta.get("count", "0")))
        cov._bytes = data
        return cov

    @classmethod
    def load(cls, path: str | os.PathLike) -> Covariance:
        path = Path(path)
        if path.stat().st_size > MAX_COVARIANCE_BYTES:
            raise ConceptFormatError(f"{path}: over the covariance size limit")
        return cls.from_bytes(path.read_bytes(), str(path))


def estimate(
    tokenizer,
    text_encoder,
    captions: list[str],
    *,
    base_digest: str,
    corpus_digest: str,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> Covariance:
    """C of one text encoder's last hidden states (what SD1.x / SD2.x pipelines condition on). For any pipeline,
    SDXL included, use `estimate_for(pipe, ...)`."""
    from perfusion_hub.text import TextEncoders

    return estimate_text(TextEncoders.single(tokenizer, text_encoder), captions, base_digest=base_digest,
                         corpus_digest=corpus_digest, batch_size=batch_size, progress=progress)


def estimate_for(pipe, captions: list[str], **kw) -> Covariance:
    """C of a pipeline's text side (perfusion_hub.text.TextEncoders): for SDXL jointly over both encoders, i.e. the
    second moment of the concatenated 2048-d context (768 CLIP + 1280 bigG penultimate states)."""
    from perfusion_hub.text import TextEncoders

    return estimate_text(TextEncoders.of(pipe), captions, **kw)


@torch.no_grad()
def estimate_text(
    text,
    captions: list[str],
    *,
    base_digest: str,
    corpus_digest: str,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> Covariance:
    """C = mean over captions and all 77 positions of e e^T, accumulated in fp64, for e the UNet's context as
    `text` (a TextEncoders) builds it."""
    if not captions:
        raise ValueError("the caption corpus is empty")
    device = text.device
    dim = text.dim
    acc = torch.zeros(dim, dim, dtype=torch.float64, device=device if device.type != "mps" else "cpu")
    count = 0
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        e = text.encode(text.tokenize(chunk, device)).reshape(-1, dim).to(acc.device, torch.float64)
        acc += e.T @ e
        count += e.shape[0]
        if progress:
            progress(min(start + batch_size, len(captions)), len(captions))
    # rounded to fp32 as stored, so a fresh estimate and its reloaded file give the same C^-1
    return Covariance((acc / count).cpu().float().double(), base_digest=base_digest, corpus_digest=corpus_digest,
                      count=count)


PACKAGED_NAME = "covariance.safetensors"


def packaged_covariance(base) -> Covariance | None:
    """The covariance shipped beside an embedded base, if it matches the base and the packaged corpus."""
    from perfusion_hub.captions import corpus_digest, load_captions

    if base.spec.kind != "embedded":
        return None
    path = Path(base.spec.location) / PACKAGED_NAME
    if not path.is_file():
        return None
    cov = Covariance.load(path)
    if cov.base_digest != base.digest or cov.corpus_digest != corpus_digest(load_captions()):
        return None
    return cov

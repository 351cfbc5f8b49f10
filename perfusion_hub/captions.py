"""The caption corpus that a base's covariance C is estimated over (spec/perfusion.md section 5).

The packaged corpus is ``perfusion_hub/data/captions.txt`` (one caption per line, UTF-8, "\\n" line ends),
written by the toy world's generator (``python -m toyworld.corpus``); a user may pass a file of their own.

Corpus identity: ``corpus_digest(captions)`` = "sha256:" + sha256 of ``"\\n".join(captions) + "\\n"`` in UTF-8,
so the same captions give the same digest whatever file they came from.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from perfusion_hub.errors import BadInput

CAPTIONS_PATH = Path(__file__).resolve().parent / "data" / "captions.txt"


def canonical_text(captions: list[str]) -> str:
    return "\n".join(captions) + "\n"


def corpus_digest(captions: list[str]) -> str:
    """'sha256:<hex>' of the canonical corpus text ("\\n".join(captions) + "\\n", UTF-8)."""
    return "sha256:" + hashlib.sha256(canonical_text(list(captions)).encode("utf-8")).hexdigest()


def load_captions(path: str | Path | None = None) -> list[str]:
    """The packaged corpus (path=None) or a user caption file (UTF-8, one caption per line).

    Surrounding whitespace is stripped and blank lines are skipped. Raises `BadInput` naming the file
    when it cannot be read, is not UTF-8, or holds no caption.
    """
    p = Path(path) if path is not None else CAPTIONS_PATH
    try:
        raw = p.read_bytes()
    except OSError as e:
        if path is None:
            raise BadInput(f"packaged caption corpus missing at {p}; reinstall perfusion-hub") from e
        raise BadInput(f"cannot read caption file {p}: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadInput(f"caption file {p} is not UTF-8 text (byte {e.start}: {e.reason})") from e
    captions = [c for c in (line.strip() for line in text.splitlines()) if c]
    if not captions:
        raise BadInput(f"caption file {p} contains no captions (expected one caption per line)")
    return captions

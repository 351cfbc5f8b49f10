"""Training photos: any size or mode, EXIF orientation honoured, centre-cropped square, resized.

Unreadable, truncated, animated-beyond-first-frame or oversized (decompression bomb) files are skipped
with a warning that names them; a folder with no usable photo is refused. Optional soft masks live in
`masks/` beside the photos, matched by file stem (any image format; white = the subject).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

from perfusion_hub.errors import BadInput

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
MAX_PIXELS = 64_000_000  # refuse decompression bombs well before PIL's own (warning-only) threshold
MAX_FILE_BYTES = 64 << 20


@dataclass
class Photo:
    path: Path
    digest: str  # sha256 of the file bytes (recorded in the concept's provenance)
    image: object  # PIL.Image, RGB, resolution x resolution
    mask: object | None  # PIL.Image "L" of the same size, or None


def _open_rgb(path: Path, resolution: int):
    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"file is over {MAX_FILE_BYTES >> 20} MB")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ValueError(f"{im.width}x{im.height} pixels is over the {MAX_PIXELS:,}-pixel limit")
            im.seek(0)
            im = ImageOps.exif_transpose(im)
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, rgba)
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = im.point(lambda v: v / 256).convert("L")
            im = im.convert("RGB")
    return square(im, resolution)


def square(im, resolution: int):
    from PIL import Image

    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.Resampling.BICUBIC)


def _open_mask(path: Path, resolution: int):
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return square(im.convert("L"), resolution)


def load_photos(folder: str | Path, resolution: int, *, warn=None) -> list[Photo]:
    """Load every usable photo in `folder` (not recursive). `warn(msg)` receives one line per skipped file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"{folder} is not a folder of photos")
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
    masks_dir = folder / "masks"
    masks = {}
    if masks_dir.is_dir():
        masks = {p.stem: p for p in sorted(masks_dir.iterdir()) if p.suffix.lower() in EXTENSIONS}
    photos: list[Photo] = []
    for f in files:
        try:
            img = _open_rgb(f, resolution)
            digest = "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()
        except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
            warn(f"skipping {f.name}: {type(e).__name__}: {str(e)[:120] or 'unreadable'}")
            continue
        mask = None
        if f.stem in masks:
            try:
                mask = _open_mask(masks[f.stem], resolution)
            except Exception as e:  # noqa: BLE001
                warn(f"ignoring mask {masks[f.stem].name}: {type(e).__name__}")
        photos.append(Photo(f, digest, img, mask))
    if not photos:
        raise BadInput(
            f"no usable photos in {folder} (looked for {', '.join(sorted(EXTENSIONS))}"
            f"{'; every file failed to decode' if files else ''})"
        )
    return photos

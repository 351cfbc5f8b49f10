"""Hostile training photos (perfusion_hub/photos.py), beyond tests/engine/test_train.py's corrupt/CMYK/16-bit
smoke test: each file is either skipped with a warning that names it and says why, or loaded with
the right pixels. Hostile files are refused before they are decoded: `PilSpy` records, through PIL's own
Image.open and ImageFile.load, which files were opened and which were decoded at what size (no clock, no
process-wide memory figure).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from perfusion_hub.errors import BadInput
from perfusion_hub.photos import load_photos

DECODE_BUDGET = 1 << 20  # pixels; every legitimate test photo is far smaller


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int, *, idat: bytes = b"") -> bytes:
    """A PNG whose header declares width x height (8-bit RGB) and whose data is tiny."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat or zlib.compress(b"\0" * 4096))
            + _chunk(b"IEND", b""))


def good(folder: Path, name: str = "good.png", color=(10, 200, 30)) -> None:
    Image.new("RGB", (32, 32), color).save(folder / name)


def load(folder: Path, resolution: int = 16):
    seen: list[str] = []
    photos = load_photos(folder, resolution, warn=seen.append)
    return {p.path.name: p for p in photos}, seen


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


class PilSpy:
    """The files PIL opened (`opened`) and decoded (`decoded`: path relative to `root` -> (width, height)),
    recorded by wrapping Image.open and every ImageFile `load` (where a decoder runs). A decode of more
    than DECODE_BUDGET pixels is recorded and then refused, so a missing guard fails the test instead of
    allocating the bomb."""

    def __init__(self, monkeypatch, root: Path):
        self.root, self.opened, self.decoded = root, [], {}
        real_open = Image.open

        def spy_open(fp, *a, **k):
            self.opened.append(self._name(fp))
            return real_open(fp, *a, **k)

        monkeypatch.setattr(Image, "open", spy_open)
        for cls in (ImageFile.ImageFile, *_subclasses(ImageFile.ImageFile)):
            if "load" in cls.__dict__:
                monkeypatch.setattr(cls, "load", self._spy_load(cls.__dict__["load"]))

    def _name(self, fp) -> str:
        p = Path(fp if isinstance(fp, str | os.PathLike) else getattr(fp, "name", "?"))
        return p.relative_to(self.root).as_posix() if p.is_relative_to(self.root) else str(p)

    def _spy_load(self, real):
        def load(im):
            w, h = im.size
            self.decoded[self._name(im.filename)] = (w, h)
            if w * h > DECODE_BUDGET:
                raise MemoryError(f"test spy: a {w}x{h} image was about to be decoded")
            return real(im)
        return load


@pytest.fixture
def spy(monkeypatch, tmp_path):
    return PilSpy(monkeypatch, tmp_path)


@pytest.mark.parametrize("w,h", [(100_000, 100_000), (70_000, 1_000), (1, 2**31 - 1), (9_000, 9_000)])
def test_decompression_bombs_are_skipped_before_decoding(tmp_path, spy, w, h):
    (tmp_path / "bomb.png").write_bytes(png_declaring(w, h))
    good(tmp_path)
    photos, seen = load(tmp_path)
    assert list(photos) == ["good.png"]
    (msg,) = seen
    assert "bomb.png" in msg and ("pixel" in msg or "DecompressionBomb" in msg), msg  # refused by the limit
    assert "bomb.png" in spy.opened and spy.decoded == {"good.png": (32, 32)}  # its header read, never decoded


def test_oversized_file_is_skipped_without_reading_it(tmp_path, spy):
    with open(tmp_path / "huge.jpg", "wb") as f:  # sparse: 65 MB declared on disk, nothing read
        f.truncate(65 << 20)
    good(tmp_path)
    photos, seen = load(tmp_path)
    assert list(photos) == ["good.png"] and "huge.jpg" in seen[0] and "MB" in seen[0]
    assert spy.opened == ["good.png"] and spy.decoded == {"good.png": (32, 32)}  # refused by its size alone


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9])
def test_truncated_photos_are_skipped(tmp_path, cut):
    im = Image.effect_noise((64, 64), 60).convert("RGB")
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")):
        im.save(tmp_path / f"full.{ext}", format=fmt)
        data = (tmp_path / f"full.{ext}").read_bytes()
        (tmp_path / f"full.{ext}").unlink()
        (tmp_path / f"cut.{ext}").write_bytes(data[: int(len(data) * cut)])
    good(tmp_path)
    photos, seen = load(tmp_path)
    # A truncated file is never loaded as if it were whole (no grey padding from a partial decode).
    assert list(photos) == ["good.png"], (list(photos), seen)
    assert sorted(m.split(":")[0] for m in seen) == ["skipping cut.jpg", "skipping cut.png", "skipping cut.webp"]


def test_random_garbage_with_image_extensions_is_skipped(tmp_path, spy):
    import random

    rng = random.Random(7)
    names = []
    for i, ext in enumerate(["png", "jpg", "jpeg", "webp"] * 3):
        head = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"RIFF\0\0\0\0WEBP", b""][i % 4]
        (tmp_path / f"g{i}.{ext}").write_bytes(head + rng.randbytes(rng.randrange(0, 3000)))
        names.append(f"g{i}.{ext}")
    good(tmp_path)
    photos, seen = load(tmp_path)
    assert list(photos) == ["good.png"]
    # One warning per file, naming it and the decoder's reason; each refused at its header, once.
    assert sorted(m.split(":")[0] for m in seen) == sorted(f"skipping {n}" for n in names)
    assert all(m.split(": ", 2)[1].endswith("Error") for m in seen), seen
    assert sorted(spy.opened) == sorted([*names, "good.png"]) and spy.decoded == {"good.png": (32, 32)}


def test_no_usable_photo_in_a_hostile_folder_is_refused(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_declaring(100_000, 100_000))
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(BadInput, match="every file failed to decode"):
        load_photos(tmp_path, 16, warn=lambda m: None)


def test_cmyk_and_16bit_photos_load_with_the_right_colours(tmp_path):
    Image.new("CMYK", (32, 32), (255, 0, 0, 0)).save(tmp_path / "cyan.jpg", quality=100)
    Image.new("I;16", (32, 32), 40000).save(tmp_path / "grey16.png")
    rgb16 = Image.new("I;16", (32, 32), 65535)
    rgb16.save(tmp_path / "white16.png")
    photos, seen = load(tmp_path)
    assert seen == []
    r, g, b = photos["cyan.jpg"].image.getpixel((8, 8))
    assert r < 20 and g > 235 and b > 235
    assert photos["grey16.png"].image.getpixel((8, 8)) == (156, 156, 156)  # 40000 / 256
    assert photos["white16.png"].image.getpixel((8, 8)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])  # GIF is not a training-photo extension
def test_animated_photos_use_the_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (32, 32), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    path = tmp_path / f"anim.{ 'png' if fmt == 'PNG' else fmt.lower()}"
    try:
        frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    except (OSError, ValueError, KeyError) as e:  # pragma: no cover - a Pillow without animation writers
        pytest.skip(f"cannot write animated {fmt}: {e}")
    assert getattr(Image.open(path), "n_frames", 1) == 3
    photos, seen = load(tmp_path)
    assert seen == []
    r, g, b = photos[path.name].image.getpixel((8, 8))
    assert r > 200 and g < 40 and b < 40


@pytest.mark.parametrize("orientation,white_at", [(1, "left"), (2, "right"), (3, "right"), (6, "top"), (8, "bottom")])
def test_exif_orientations_are_honoured(tmp_path, orientation, white_at):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 20, 20))  # stored: left half white
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    photos, _ = load(tmp_path, resolution=20)
    px = photos["r.jpg"].image.load()
    probe = {"left": (3, 10), "right": (16, 10), "top": (10, 3), "bottom": (10, 16)}
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
    # The centre-cropped square still holds both halves, split down the middle the way EXIF says.
    assert px[probe[white_at]][0] > 200 and px[probe[opposite[white_at]]][0] < 50


def test_a_bomb_mask_is_ignored_and_the_photo_kept(tmp_path, spy):
    good(tmp_path, "p.png")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "p.png").write_bytes(png_declaring(100_000, 100_000))
    photos, seen = load(tmp_path)
    assert photos["p.png"].mask is None and seen == ["ignoring mask p.png: DecompressionBombError"]
    assert "masks/p.png" in spy.opened and spy.decoded == {"p.png": (32, 32)}  # the mask was never decoded

"""Build the sample registry shipped in registry/sample_registry: `python -m cli.samples`.

The project draws its own sample photos (no downloads): Mittens, an orange cat with white paws and a
blue collar, and an Eames-style two-tone chair, each in a few poses and backgrounds. Both concepts are
trained on the embedded base with the default recipe and published into a file:// registry tree inside
the package, which `pfx install` uses as its fallback remote (read-only to users).
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
from pathlib import Path

SAMPLES = {
    "cat-mittens": ("cat", "Mittens: an orange cat with white paws and a blue collar (sample)"),
    "chair-eames": ("chair", "An Eames-style chair: dark shell seat on light wooden legs (sample)"),
}
BACKGROUNDS = [(70, 110, 190), (60, 150, 90), (200, 190, 160), (150, 60, 70), (90, 90, 100), (230, 220, 120)]


def draw_mittens(size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    d = ImageDraw.Draw(im)
    s = size / 256
    x, y = rng.uniform(40, 110) * s, rng.uniform(60, 110) * s
    orange, white, blue = (235, 130, 40), (250, 250, 245), (40, 80, 220)
    d.ellipse((x, y + 40 * s, x + 120 * s, y + 120 * s), fill=orange)  # body
    d.ellipse((x + 70 * s, y, x + 140 * s, y + 65 * s), fill=orange)  # head
    d.polygon([(x + 75 * s, y + 15 * s), (x + 85 * s, y - 20 * s), (x + 100 * s, y + 8 * s)], fill=orange)
    d.polygon([(x + 110 * s, y + 8 * s), (x + 128 * s, y - 20 * s), (x + 136 * s, y + 18 * s)], fill=orange)
    d.rectangle((x + 78 * s, y + 58 * s, x + 134 * s, y + 68 * s), fill=blue)  # collar
    for px in (x + 15 * s, x + 45 * s, x + 80 * s, x + 100 * s):  # white paws
        d.ellipse((px, y + 110 * s, px + 20 * s, y + 126 * s), fill=white)
    d.ellipse((x + 90 * s, y + 22 * s, x + 98 * s, y + 30 * s), fill=(20, 20, 20))
    d.ellipse((x + 115 * s, y + 22 * s, x + 123 * s, y + 30 * s), fill=(20, 20, 20))
    return im


def draw_eames(size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    d = ImageDraw.Draw(im)
    s = size / 256
    x, y = rng.uniform(40, 100) * s, rng.uniform(50, 90) * s
    shell, wood = (35, 35, 40), (205, 160, 100)
    d.rounded_rectangle((x, y, x + 40 * s, y + 90 * s), radius=int(14 * s), fill=shell)  # backrest
    d.rounded_rectangle((x, y + 70 * s, x + 120 * s, y + 100 * s), radius=int(12 * s), fill=shell)  # seat
    for lx in (x + 15 * s, x + 95 * s):
        d.polygon([(lx, y + 100 * s), (lx + 10 * s, y + 100 * s), (lx + 25 * s, y + 170 * s),
                   (lx + 15 * s, y + 170 * s)], fill=wood)
        d.polygon([(lx, y + 100 * s), (lx + 10 * s, y + 100 * s), (lx - 5 * s, y + 170 * s),
                   (lx - 15 * s, y + 170 * s)], fill=wood)
    return im


def write_photos(folder: Path, name: str, count: int = 6, size: int = 256, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{name}-{seed}")
    draw = draw_mittens if name == "cat-mittens" else draw_eames
    for i in range(count):
        draw(size, rng).save(folder / f"{name}-{i}.png")
    return folder


def build(target: Path, *, steps: int = 400) -> None:
    from cli.cmd_engine import base_covariance, open_base
    from cli.main import Context
    from perfusion_hub.train import TrainConfig, train_concept
    from registry.compact import compact
    from registry.publish import publish_manifest
    from registry.remotes.file import FileRemote

    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(str(Path(tmp) / "home"), offline=True, debug=False)
        base = open_base(ctx, "tiny", device="cpu", dtype="fp32")
        cov = base_covariance(ctx, base)
        if target.exists():
            shutil.rmtree(target)
        remote = FileRemote("sample-build", target)
        for name, (superclass, description) in SAMPLES.items():
            photos = write_photos(Path(tmp) / name, name)
            res = train_concept(base, photos, name=name, superclass=superclass, covariance=cov,
                                out_path=Path(tmp) / f"{name}.safetensors", config=TrainConfig(steps=steps, previews=1),
                                license="CC0-1.0", description=description)
            m = ctx.home.add_concept_file(res.path, previews=res.previews, description=description,
                                          tags=["sample", superclass], license="CC0-1.0",
                                          covariance={"digest": cov.digest, "size": len(cov.to_bytes()),
                                                      "base_digest": base.digest, "corpus_digest": cov.corpus_digest})
            publish_manifest(remote, m, ctx.home.store.read_bytes)
            print(f"{name}@{m.version}: {m.digest} ({res.seconds:.0f} s, final loss {res.losses[-1]:.4f})", flush=True)
        compact(remote)  # search shards, so `pfx search` finds the samples offline


if __name__ == "__main__":
    from registry.home import sample_registry_path

    build(sample_registry_path(), steps=int(sys.argv[1]) if len(sys.argv) > 1 else 400)

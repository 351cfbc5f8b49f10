"""Build the sample registry shipped in registry/sample_registry: `python -m cli.samples`.

The project draws its own sample photos (no downloads): Mittens, an orange cat with white paws and a
blue collar, and an Eames-style chair (teal shell, walnut legs), from the procedural world the embedded
base was trained on. Both concepts are trained on the embedded base with the default recipe and
published into a file:// registry tree inside the package, which `pfx install` uses as its fallback
remote (read-only to users).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

SAMPLES = {
    "cat-mittens": ("cat", "Mittens: an orange cat with white paws and a blue collar (sample)"),
    "chair-eames": ("chair", "An Eames-style chair: teal shell seat on splayed walnut legs (sample)"),
}


# Mittens' photos include small ones: a cat sitting on a chair is drawn small, and a concept trained only on
# medium and large photos lost her collar and paws there (bench/README.md, "photo sizes")
PHOTOS = 8
PHOTO_SIZES = {"cat-mittens": ("small", "medium", "small", "large")}


def write_photos(folder: Path, name: str, count: int = PHOTOS, sizes: tuple[str, ...] | None = None) -> Path:
    """The reserved instances of the project's procedural world (perfusion_hub/world.py), which the
    embedded base never saw in training, in varied places, sizes and backgrounds: the same photos as
    bench/quality.py and bench/spread.py use (their concepts are other draws of the same recipe: float
    rounding differs between machines and thread counts). `sizes` (cycled; default PHOTO_SIZES, else the
    world's own draw) sets each photo's object size."""
    sizes = PHOTO_SIZES.get(name, ()) if sizes is None else sizes
    from PIL import Image

    from perfusion_hub import world

    folder.mkdir(parents=True, exist_ok=True)
    draw = world.render_mittens if name == "cat-mittens" else world.render_eames
    for i in range(count):
        Image.fromarray(draw(seed=i, size=sizes[i % len(sizes)] if sizes else None)).save(folder / f"{name}-{i}.png")
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
        base = open_base(ctx, "toy", device="cpu", dtype="fp32")
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

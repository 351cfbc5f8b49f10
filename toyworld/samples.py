"""Build the sample registry shipped in registry/sample_registry: `python -m toyworld.samples`.

The project draws its own sample photos (no downloads): Mittens, an orange cat with white paws and a
blue collar, and an Eames-style chair (teal shell, walnut legs), from the procedural world the embedded
base was trained on. Both concepts are trained on the embedded base with the default recipe and
published into a file:// registry tree inside the package, which `pfx install` uses as its fallback
remote (read-only to users).

  python -m toyworld.samples                      # train both here (CPU, about 10 min) and publish them
  python -m toyworld.samples --from D/pick.json   # publish the draws toyworld/experiments/sample_pick.py picked instead

The shipped registry is such a pick: Mittens' training seed 12 and the chair's seed 7, the best of 256
pairings of 16 draws on the README's prompt (bench/README.md, "The shipped samples").
"""

from __future__ import annotations

import json
import shutil
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
    toyworld/quality.py and toyworld/experiments/spread.py use (their concepts are other draws of the same recipe: float
    rounding differs between machines and thread counts). `sizes` (cycled; default PHOTO_SIZES, else the
    world's own draw) sets each photo's object size."""
    sizes = PHOTO_SIZES.get(name, ()) if sizes is None else sizes
    from PIL import Image

    from toyworld import world

    folder.mkdir(parents=True, exist_ok=True)
    draw = world.render_mittens if name == "cat-mittens" else world.render_eames
    for i in range(count):
        Image.fromarray(draw(seed=i, size=sizes[i % len(sizes)] if sizes else None)).save(folder / f"{name}-{i}.png")
    return folder


def build(target: Path, *, steps: int = 400, pick: Path | None = None) -> None:
    """Train both samples (or take the files `pick`, a toyworld/experiments/sample_pick.py choice, names) and publish them
    into a fresh file:// registry at `target`."""
    from cli.engine_store import base_covariance, open_base
    from cli.main import Context
    from perfusion_hub.concept import load_concept
    from perfusion_hub.loaders import unload_concepts
    from perfusion_hub.render import render_previews
    from perfusion_hub.train import TrainConfig, train_concept
    from registry.compact import compact
    from registry.publish import publish_manifest
    from registry.remotes.file import FileRemote

    picked = None
    if pick is not None:  # check the whole pick before the old registry is touched
        files = json.loads(pick.read_text()).get("pick", {}).get("files", {})
        picked = {n: pick.parent / files[n] for n in SAMPLES if n in files}
        missing = [n for n in SAMPLES if n not in picked or not picked[n].is_file()]
        if missing:
            raise SystemExit(f"{pick}: no concept file for {', '.join(missing)}")
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(str(Path(tmp) / "home"), offline=True, debug=False)
        base = open_base(ctx, "toy", device="cpu", dtype="fp32")
        cov = base_covariance(ctx, base)
        if target.exists():
            shutil.rmtree(target)
        remote = FileRemote("sample-build", target)
        for name, (superclass, description) in SAMPLES.items():
            if picked is None:
                res = train_concept(base, write_photos(Path(tmp) / name, name), name=name, superclass=superclass,
                                    covariance=cov, out_path=Path(tmp) / f"{name}.safetensors",
                                    config=TrainConfig(steps=steps, previews=1), license="CC0-1.0",
                                    description=description)
                path, previews, note = res.path, res.previews, f"{res.seconds:.0f} s, final loss {res.losses[-1]:.4f}"
            else:
                path = picked[name]
                previews = render_previews(base, load_concept(path), cov, Path(tmp) / name, count=1)
                unload_concepts(base.pipe, [name])
                note = f"from {path.name}"
            m = ctx.home.add_concept_file(path, previews=previews, description=description,
                                          tags=["sample", superclass], license="CC0-1.0",
                                          covariance={"digest": cov.digest, "size": len(cov.to_bytes()),
                                                      "base_digest": base.digest, "corpus_digest": cov.corpus_digest})
            publish_manifest(remote, m, ctx.home.store.read_bytes)
            print(f"{name}@{m.version}: {m.digest} ({note})", flush=True)
        compact(remote)  # search shards, so `pfx search` finds the samples offline


if __name__ == "__main__":
    import argparse

    from registry.home import sample_registry_path

    ap = argparse.ArgumentParser(description="Build the sample registry shipped in registry/sample_registry.")
    ap.add_argument("steps", nargs="?", type=int, default=400, help="training steps per concept")
    ap.add_argument("--from", dest="pick", type=Path, help="a toyworld/experiments/sample_pick.py pick.json: publish its files")
    a = ap.parse_args()
    build(sample_registry_path(), steps=a.steps, pick=a.pick)

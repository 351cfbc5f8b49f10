"""The planted-concept recovery experiment (spec/perfusion.md section 8.5) on the embedded toy base (CPU).

Teacher: a concept at its superclass initialisation (embedding = the superclass word's, i* = i_super,
o*_V = W_V i_super) whose value targets alone are moved along a known random direction d. Images
rendered with the teacher are the only training data of a fresh student (same seed, same superclass).
Figures: cos(student o*_V - init, d) over all layers at once (chance ~ 1/sqrt(sum d_l)), and the
denoising loss on held-out teacher images of the untrained student, the trained student and the
teacher itself (same noise and timesteps for all three).

Goal (the spec's): the student moves its value targets along d well beyond chance, cos(student - control,
d) > 2 / sqrt(sum d_l), where the control student is trained the same way on an unperturbed teacher's
images (what any student learns from rendered images alone cancels), and its held-out loss falls below
the untrained student's; `recovered` in the results says whether both hold. Figures so far: bench/README.md.

    python -m bench.recovery                 # writes bench/results/recovery-toy-<date>.json (minutes)
    python -m bench.recovery --seed 1 --strength 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
from datetime import UTC, date, datetime
from pathlib import Path

import torch

from perfusion_hub.concept import FORMAT, FORMAT_VERSION, Concept
from perfusion_hub.loaders import load_concepts, runtime_of, unload_concepts
from perfusion_hub.photos import load_photos
from perfusion_hub.processor import cross_attention_modules
from perfusion_hub.render import render
from perfusion_hub.train import TEMPLATES, TrainConfig, encode_latents, train_concept
from tests.kit.engine import superclass_encoding

RESULTS = Path(__file__).resolve().parent / "results"


def teacher_concept(base, cov, superclass: str, *, strength: float, seed: int) -> tuple[Concept, torch.Tensor]:
    i_super = superclass_encoding(base.pipe, superclass)
    wid = base.pipe.tokenizer(superclass, add_special_tokens=False).input_ids[0]
    emb = base.pipe.text_encoder.get_input_embeddings().weight[wid].detach().float().cpu()
    layers = cross_attention_modules(base.pipe.unet)
    init = {p: a.to_v.weight.detach().float().cpu() @ i_super for p, a in layers.items()}
    g = torch.Generator().manual_seed(seed)
    total = sum(v.numel() for v in init.values())
    d = torch.randn(total, generator=g)
    d = d / d.norm()
    norm = torch.cat(list(init.values())).norm()
    values, pos = {}, 0
    for p, v in init.items():
        values[p] = v + strength * norm * d[pos : pos + v.numel()]
        pos += v.numel()
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": "teacher", "version": "0.1.0",
        "superclass": superclass, "trigger": "<teacher>", "base_name": base.name, "base_digest": base.digest,
        "covariance_digest": cov.digest, "corpus_digest": cov.corpus_digest, "beta": "0.75", "tau": "0.1",
        "key_lock": "local", "training": "{}", "created": datetime.now(UTC).isoformat(),
        "pfx_version": "test", "license": "", "description": "",
    }
    return Concept(meta, emb, i_super.clone(), i_super, values), d


def render_set(base, cov, concept, folder: Path, seeds, steps: int, guidance: float = 1.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        prompt = TEMPLATES[s % len(TEMPLATES)].format(concept.trigger)
        render(base, prompt, concepts=[concept], covariance=cov, seed=s, steps=steps, guidance=guidance).save(
            folder / f"img{s:03d}.png")
    unload_concepts(base.pipe)
    return folder


@torch.no_grad()
def heldout_loss(base, cov, concept, folder: Path, *, seed: int = 123, draws: int = 8) -> float:
    """Mean epsilon-MSE of `concept` on the images in `folder`: fixed noise, timesteps, prompts."""
    pipe = base.pipe
    photos = load_photos(folder, base.resolution)
    mean, std, _ = encode_latents(pipe.vae, photos, False, base.device, base.dtype)
    load_concepts(pipe, [concept], covariance=cov)
    rt = runtime_of(pipe)
    rt.activate([concept.name])
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    try:
        for _ in range(draws):
            n = mean.shape[0]
            t = torch.randint(50, 950, (n,), generator=g)
            noise = torch.randn(mean.shape, generator=g)
            lat = mean + std * torch.randn(mean.shape, generator=g)
            ids = pipe.tokenizer([TEMPLATES[i % len(TEMPLATES)].format(concept.trigger) for i in range(n)],
                                 padding="max_length", max_length=77, return_tensors="pt").input_ids
            ehs = pipe.text_encoder(ids)[0]
            pred = pipe.unet(pipe.scheduler.add_noise(lat, noise, t), t, ehs).sample
            total += torch.mean((pred - noise) ** 2).item()
    finally:
        unload_concepts(pipe)
    return total / draws


def value_delta(concept, init: dict) -> torch.Tensor:
    return torch.cat([concept.value_targets[p] - init[p] for p in init])


def run(base, cov, workdir: Path, *, superclass="cat", strength=8.0, train_images=12, heldout=6, render_steps=20,
        steps=200, batch_size=8, seed=0, guidance=1.0, control=True) -> dict:
    """`strength`: the planted shift's norm as a multiple of the value targets' norm. Teacher
    images are rendered at `guidance` 1.0 by default (plain conditional sampling, so the teacher
    model is what generated them). With `control`, a second student is trained the same way on images of an
    unperturbed teacher (strength 0, same seeds): what every student learns from rendered images alone
    (renderer bias, the prompt templates) cancels in student - control, and cos(student - control, d) is
    reported as `cos_vs_control_delta_vs_d` (one more render set and training: about twice the time)."""
    teacher, d = teacher_concept(base, cov, superclass, strength=strength, seed=seed + 1)
    train_dir = render_set(base, cov, teacher, workdir / "train", range(train_images), render_steps, guidance)
    held_dir = render_set(base, cov, teacher, workdir / "heldout", range(1000, 1000 + heldout), render_steps, guidance)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, previews=0, seed=seed, flip=False, templates=TEMPLATES)
    student = train_concept(base, train_dir, name="student", superclass=superclass, covariance=cov,
                            out_path=workdir / "student.safetensors", config=cfg).concept
    untrained = train_concept(base, train_dir, name="student", superclass=superclass, covariance=cov,
                              out_path=workdir / "untrained.safetensors",
                              config=TrainConfig(steps=1, batch_size=1, previews=0, seed=seed, flip=False,
                                                 lr_values=0.0, lr_embedding=0.0)).concept
    init = {p: v.clone() for p, v in untrained.value_targets.items()}
    delta = value_delta(student, init)
    cos = float(torch.dot(delta, d) / (delta.norm() * d.norm() + 1e-12))
    cos_control = None
    if control:
        plain, _ = teacher_concept(base, cov, superclass, strength=0.0, seed=seed + 1)
        ctrl_dir = render_set(base, cov, plain, workdir / "control", range(train_images), render_steps, guidance)
        ctrl = train_concept(base, ctrl_dir, name="student", superclass=superclass, covariance=cov,
                             out_path=workdir / "control.safetensors", config=cfg).concept
        diff = delta - value_delta(ctrl, init)
        cos_control = round(float(torch.dot(diff, d) / (diff.norm() * d.norm() + 1e-12)), 4)
    figures = {
        "cos_student_delta_vs_d": round(cos, 4),
        "cos_vs_control_delta_vs_d": cos_control,
        "chance_cos": round(1 / math.sqrt(d.numel()), 4),
        "loss_untrained_student": heldout_loss(base, cov, untrained, held_dir),
        "loss_trained_student": heldout_loss(base, cov, student, held_dir),
        "loss_teacher": heldout_loss(base, cov, teacher, held_dir),
        "settings": {"strength": strength, "train_images": train_images, "heldout_images": heldout, "steps": steps,
                     "batch_size": batch_size, "seed": seed, "render_steps": render_steps,
                     "guidance": guidance, "control": control},
    }
    gap = figures["loss_untrained_student"] - figures["loss_teacher"]
    figures["loss_gap_closed"] = round((figures["loss_untrained_student"] - figures["loss_trained_student"]) / gap, 4) \
        if gap > 0 else None
    (workdir / "figures.json").write_text(json.dumps(figures, indent=2))
    return figures


def recovered(figures: dict) -> bool:
    """The spec's criterion: beyond twice chance along d (against the control), and a lower held-out loss."""
    cos = figures["cos_vs_control_delta_vs_d"]
    if cos is None:
        cos = figures["cos_student_delta_vs_d"]
    return cos > 2 * figures["chance_cos"] and figures["loss_trained_student"] < figures["loss_untrained_student"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strength", type=float, default=8.0, help="planted shift, times the value targets' norm")
    ap.add_argument("--steps", type=int, default=200, help="student training steps")
    ap.add_argument("--train-images", type=int, default=12)
    ap.add_argument("--heldout", type=int, default=6)
    ap.add_argument("--render-steps", type=int, default=20)
    ap.add_argument("--no-control", action="store_true", help="skip the control student (about half the time)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/recovery-toy-<date>.json")
    args = ap.parse_args(argv)
    from perfusion_hub.bases import load_base
    from perfusion_hub.covariance import packaged_covariance

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    base = load_base("toy", device="cpu", dtype="fp32")
    cov = packaged_covariance(base)
    with tempfile.TemporaryDirectory(prefix="pfx-recovery-") as tmp:
        figures = run(base, cov, Path(tmp), strength=args.strength, train_images=args.train_images,
                      heldout=args.heldout, render_steps=args.render_steps, steps=args.steps, seed=args.seed,
                      control=not args.no_control)
    doc = {"date": date.today().isoformat(), "base": base.name, "base_digest": base.digest,
           "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                       "threads": args.threads, "processor": platform.processor() or platform.machine()},
           "figures": figures, "recovered": recovered(figures)}
    out = args.out or RESULTS / f"recovery-toy-{doc['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

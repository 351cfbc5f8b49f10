"""Render speed on the embedded `toy` base on this machine's CPU (issue 6: <= 2 s for 25 steps at 64x64).

In one process, interleaved round by round so that the machine's drift hits every row alike:
  baseline   a plain diffusers StableDiffusionPipeline loaded from the same folder (DDIM, 25 steps, CFG 7.5)
  pfx 0/1/2  perfusion_hub.render.render with no concept, cat-mittens, and cat-mittens on chair-eames (the
             sample registry's concepts, loaded once beforehand)
Then, as a new user sees it, the whole `pfx render` command in fresh processes (its wall time, and the render
time it reports), and the floor under it: a process that only imports torch, diffusers and transformers.

  python -m bench.render_toy              # writes bench/results/render-toy-<date>.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = {"pfx 0 concepts": "a red cat on a blue background",
           "pfx 1 concept": "a photo of <cat-mittens> on a green background",
           "pfx 2 concepts": "a photo of <cat-mittens> on <chair-eames>"}
STEPS, GUIDANCE = 25, 7.5
NAMES = ("cat-mittens", "chair-eames")
IMPORTS = "import torch, diffusers, transformers; from diffusers import StableDiffusionPipeline"


def installed_samples(home: str):
    """Install the sample concepts into a fresh `home`: (its Context, the installed rows and manifests), for
    `cli.engine_store.concepts_for` to load as `pfx render` does (verified, checked against the base)."""
    from cli.engine_store import installed_concepts
    from cli.main import Context
    from registry.install import install

    ctx = Context(home, offline=True, debug=False)
    install(ctx.home, list(NAMES))
    return ctx, installed_concepts(ctx, list(NAMES), install_missing=False)


def stats(ts: list[float]) -> dict:
    return {"median": round(statistics.median(ts), 3), "min": round(min(ts), 3), "max": round(max(ts), 3),
            "n": len(ts)}


def in_process(args, ctx, pairs) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from cli.engine_store import concepts_for
    from perfusion_hub.bases import load_base
    from perfusion_hub.render import render
    from toyworld.build import TOY_DIR

    base = load_base("toy", device="cpu", dtype="fp32")
    plain = StableDiffusionPipeline.from_pretrained(str(TOY_DIR), safety_checker=None, requires_safety_checker=False,
                                                    local_files_only=True, dtype=torch.float32)
    plain.scheduler = DDIMScheduler.from_config(plain.scheduler.config)
    plain.set_progress_bar_config(disable=True)
    concepts, cov = concepts_for(ctx, base, pairs)

    def pfx(prompt):
        return lambda s: render(base, prompt, concepts=concepts, covariance=cov, seed=s, steps=STEPS, guidance=GUIDANCE)

    runs = {"baseline": lambda s: plain(PROMPTS["pfx 0 concepts"], num_inference_steps=STEPS,
                                        guidance_scale=GUIDANCE, height=64, width=64,
                                        generator=torch.Generator().manual_seed(s))}
    runs.update({label: pfx(prompt) for label, prompt in PROMPTS.items()})
    times: dict[str, list[float]] = {k: [] for k in runs}
    for f in runs.values():
        f(0)  # warm-up (and the concepts' load)
    for r in range(args.rounds):
        for label, f in runs.items():
            t0 = time.perf_counter()
            f(r)
            times[label].append(time.perf_counter() - t0)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in times.items()), flush=True)
    out = {k: stats(v) for k, v in times.items()}
    for k in PROMPTS:
        out[k]["ratio_to_baseline"] = round(out[k]["median"] / out["baseline"]["median"], 3)
        out[k]["paired_ratio_median"] = round(statistics.median(
            a / b for a, b in zip(times[k], times["baseline"])), 3)
    return out


def command(args, home: str) -> dict:
    env = dict(os.environ, PFX_HOME=home, PFX_OFFLINE="1")
    pfx = [sys.executable, "-m", "cli.main"]
    rows = {"import torch + diffusers + transformers": [], "pfx render (whole command)": [],
            "pfx render (render inside the command)": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.commands):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", IMPORTS], env=env, check=True)
            rows["import torch + diffusers + transformers"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            done = subprocess.run(pfx + ["render", PROMPTS["pfx 2 concepts"].replace("<", "").replace(">", ""),
                                         "-o", f"{tmp}/r.png", "--json", "--seed", str(r)],
                                  env=env, cwd=ROOT, check=True, capture_output=True, text=True)
            rows["pfx render (whole command)"].append(time.perf_counter() - t0)
            rows["pfx render (render inside the command)"].append(json.loads(done.stdout)["seconds"])
            print(f"command {r}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), flush=True)
    return {k: stats(v) for k, v in rows.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--commands", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import diffusers
    import transformers

    result = {"date": date.today().isoformat(), "what": __doc__.split("\n\n")[0],
              "machine": f"{platform.processor() or platform.machine()}, {args.threads} CPU threads, "
                         f"{os.cpu_count()} cores seen",
              "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
              "transformers": transformers.__version__, "steps": STEPS, "guidance": GUIDANCE, "size": 64,
              "prompts": PROMPTS}
    with tempfile.TemporaryDirectory(prefix="pfx-bench-") as home:
        ctx, pairs = installed_samples(home)
        result["in_process"] = in_process(args, ctx, pairs)
        result["command"] = command(args, home)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"render-toy-{result['date']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["in_process"], indent=1))
    print(json.dumps(result["command"], indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

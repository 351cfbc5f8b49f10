"""The default recipe's training step (SD1.5 architecture, random weights, batch 16, 512x512, bf16) under settings
that may change its speed: eager or compiled (`fast`), cuDNN's autotuner (`bench`), channels-last in eager (`cl`),
inductor's 1x1 convolutions as matrix products (`1x1mm`). Each variant's steady ms per step and its distance to the
first eager run (same seed), and (--profile) a kernel profile by kind of the first compiled variant.

    bash bench/gpu_setup.sh && python3 -u -m bench.train_settings --profile

Results: results/train-settings-<device>-<date>.json (rewritten after every variant). `--toy` runs it on CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor.config

from bench import engine

VARIANTS = "eager,eager_bench,eager_cl_bench,fast,fast_bench,fast_1x1mm"


def kernel_kinds(events, steps: int) -> tuple[float, dict]:
    """GPU kernel ms per step, in total and by kind, from torch.profiler's key averages."""
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    kinds: dict[str, float] = {}
    for e in kernels:
        n = e.key.lower()
        kind = ("attention" if any(x in n for x in ("sdpa", "flash", "fmha", "attention", "dot_do_o")) else
                "convolution" if any(x in n for x in ("xmma", "conv", "implicit", "nhwc", "nchw")) else
                "matrix product" if any(x in n for x in ("nvjet", "gemm", "cutlass", "sm90")) else
                "fused elementwise/norm (triton)" if "triton" in n else "other")
        kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total / 1000 / steps
    total = sum(kinds.values())
    return round(total, 1), {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--toy", action="store_true", help="CPU smoke run on the toy configs")
    ap.add_argument("--steps", type=int, default=40, help="steps per measured run")
    ap.add_argument("--variants", default=VARIANTS)
    ap.add_argument("--profile", action="store_true", help="then profile 20 compiled steps (GPU kernels by kind)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out, res = engine.results_file(args.out, "train-settings", steps=args.steps, recipe=(
        "400 steps, batch 16, 512x512, bf16, 8 photos; ms per step steady (between loss reports)"))
    t0 = time.perf_counter()

    def log(*a):
        print(f"[{time.perf_counter() - t0:6.1f}s]", *a, flush=True)

    base = engine.build_base(args.toy, dev, torch.bfloat16 if dev == "cuda" else torch.float32)
    cov = engine.covariance(base, 64 if args.toy else 512)
    tmp = Path(tempfile.mkdtemp())
    photos = engine.make_photos(tmp / "photos", 8, base.resolution)
    unet = base.pipe.unet
    ref = None

    def measure(label, fast, steps):
        nonlocal ref
        marks = []
        total, run = engine.train_once(base, cov, photos, tmp / f"{label}.safetensors", steps, fast, marks=marks)
        ex = engine.extrapolate(marks, total, steps)
        entry = {"total_s": round(total, 2)}
        if ex:
            entry.update(ms_per_step=round(1000 * ex["per_step_s"], 1), steps_400_s=ex["extrapolated_400_steps_s"])
        if ref is None and not fast and steps == args.steps:
            ref = run
        elif ref is not None and len(ref.losses) == len(run.losses):
            entry["vs_first_eager"] = engine.compare_runs(ref, run)
        res[label] = entry
        log(label, entry)
        out.write_text(json.dumps(res, indent=1))

    def profile_step(v):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            wall, _ = engine.train_once(base, cov, photos, tmp / "profile.safetensors", 20, True)
        total, kinds = kernel_kinds(prof.key_averages(), 20)
        res["profile"] = {"variant": v, "gpu_kernel_ms_per_step": total, "by_kind": kinds,
                          "wall_ms_per_step_under_profiler": round(1000 * wall / 20, 1)}
        log("profile", res["profile"])
        out.write_text(json.dumps(res, indent=1))

    variants = args.variants.split(",")
    for v in variants:
        torch.backends.cudnn.benchmark = "bench" in v
        if v.startswith("eager"):
            unet.to(memory_format=torch.channels_last if "_cl" in v else torch.contiguous_format)
            if v == variants[0]:
                measure(v + "_warmup", False, 3)
            measure(v, False, args.steps)
        else:
            if "1x1mm" in v:
                torch._inductor.config.conv_1x1_as_mm = True
                torch._dynamo.reset()
            measure(v + "_first_compile", True, 3)
            measure(v, True, args.steps)
            if args.profile and "profile" not in res:
                profile_step(v)
    unet.to(memory_format=torch.contiguous_format)


if __name__ == "__main__":
    main()

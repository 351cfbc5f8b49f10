"""Where an SDXL render with concepts spends more than the plain pipeline (random-weight SDXL from data/sdxl, 1024,
bf16, DDIM, CFG 7.5). Five concepts stay loaded; interleaved rounds time the plain `pipe(prompt)`, `render()` of a
prompt with 0, 1 and 5 concepts, and the plain pipeline without VAE decode; then, per variant, how often the edited
K/V are computed (the cache should make it once per layer and render), host-device synchronisations, and GPU kernel
time by kernel (torch.profiler) with the kernels that differ most between the plain pipeline and 5 concepts.

    bash bench/gpu_setup.sh && python3 -u -m bench.sdxl_render --steps 25 --rounds 6

Results: results/sdxl-render-<device>-<date>.json (rewritten as it goes). `--toy`: toy-sized configs on CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from bench import engine
from perfusion_hub import processor
from perfusion_hub.loaders import load_concepts, runtime_of
from perfusion_hub.render import render


def count_edits(fn) -> dict:
    """How many times one call of `fn` computes edited projections and asks for K/V (instrumented by wrapping)."""
    counts = {"edited_projection": 0, "key_value": 0}
    edited, key_value = processor.edited_projection, processor.PerfusionRuntime.key_value

    def counting_edited(*a, **k):
        counts["edited_projection"] += 1
        return edited(*a, **k)

    def counting_key_value(self, *a, **k):
        counts["key_value"] += 1
        return key_value(self, *a, **k)

    processor.edited_projection, processor.PerfusionRuntime.key_value = counting_edited, counting_key_value
    try:
        fn()
    finally:
        processor.edited_projection, processor.PerfusionRuntime.key_value = edited, key_value
    return counts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out, res = engine.results_file(args.out, "sdxl-render", steps=args.steps)
    save = lambda: out.write_text(json.dumps(res, indent=1))

    base = engine.build_base(args.toy, dev, torch.bfloat16 if dev == "cuda" else torch.float32, "sdxl")
    cov = engine.covariance(base, 512)
    pipe, size, steps = base.pipe, base.resolution, args.steps
    load_concepts(pipe, engine.synthetic_concepts(base, cov, 5), covariance=cov)
    res["gate_positions"] = runtime_of(pipe).gate_positions
    prompt = "a photo of a cat on a chair"
    plain = {"num_inference_steps": steps, "guidance_scale": 7.5, "height": size, "width": size}
    gen = lambda: torch.Generator("cpu").manual_seed(0)
    variants = {
        "baseline": lambda: pipe(prompt, generator=gen(), **plain),
        "render_0": lambda: render(base, prompt, steps=steps, guidance=7.5, seed=0),
        "render_1": lambda: render(base, "a photo of <c0>", steps=steps, guidance=7.5, seed=0),
        "render_5": lambda: render(base, "a photo of " + " and ".join(f"<c{i}>" for i in range(5)), steps=steps,
                                   guidance=7.5, seed=0),
        "baseline_latent": lambda: pipe(prompt, generator=gen(), output_type="latent", **plain),
    }
    res["edits_per_call"] = {k: count_edits(fn) for k, fn in variants.items()}  # also the warm-up
    print("edits", res["edits_per_call"], flush=True)
    save()

    gc.disable()
    times = {k: [] for k in variants}
    for r in range(args.rounds):
        for k, fn in variants.items():
            engine.sync()
            t = time.perf_counter()
            fn()
            engine.sync()
            times[k].append(round(time.perf_counter() - t, 4))
        res["times_s"] = times
        print("round", r + 1, {k: v[-1] for k, v in times.items()}, flush=True)
        save()
    gc.enable()
    base_s = statistics.median(times["baseline"])
    res["ratio_median"] = {k: round(statistics.median(v) / base_s, 4) for k, v in times.items()}
    res["ratio_paired"] = {k: round(statistics.median(a / b for a, b in zip(v, times["baseline"])), 4)
                           for k, v in times.items()}
    print("ratios", res["ratio_median"], res["ratio_paired"], flush=True)
    save()

    if dev == "cuda":
        res["syncs"] = {}
        for k in ("baseline", "render_5"):
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                variants[k]()
            torch.cuda.set_sync_debug_mode(0)
            res["syncs"][k] = sum("synchroniz" in str(w.message) for w in caught)
        print("syncs", res["syncs"], flush=True)
        save()

        kernels = {k: engine.device_ms(variants[k]) for k in ("baseline", "render_5")}
        res["gpu_kernel_ms"] = {k: round(sum(v.values()), 1) for k, v in kernels.items()}
        a, b = kernels["baseline"], kernels["render_5"]
        diff = {n: round(b.get(n, 0) - a.get(n, 0), 2) for n in set(a) | set(b)}
        res["kernel_ms_differences"] = engine.shortened(sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:15], 90)
        print("gpu kernel ms", res["gpu_kernel_ms"], "\n", res["kernel_ms_differences"], flush=True)
        save()


if __name__ == "__main__":
    main()

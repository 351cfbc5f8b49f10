#!/usr/bin/env python
"""Many concepts in one batch (issue 21): throughput of per-image concept sets, direct and through `pfx serve`.

Measured in one process, on one model, the baseline in the same run:
  1. batch: 8 images with 8 distinct concepts in one render_batch call vs a plain diffusers batch of 8 (the same
     pipeline with no concept loaded, the same prompts with each concept token replaced by its superclass word,
     the same starting noise); rounds interleave the two. Images/s of each and the ratio (goal >= 0.9x).
  2. serve: `pfx serve`'s app (cli/serve.py: uvicorn on 127.0.0.1 in this process, the model worker on its
     thread, PNG responses) under 16 concurrent HTTP clients, each with its own concept, each sending requests
     back to back, vs the same requests rendered directly with render_batch in batches of --serve-batch.
     Images/s of each and the ratio (goal >= 0.8x).
  3. equality: a request rendered in the batch vs rendered alone (batch of one): max and mean pixel difference.

  python -m bench.batch            # GPU: SD1.5 architecture, random weights (bench/engine.py's build_base),
                                   # 512x512, 50 DDIM steps, guidance 7.5, fp16 (bf16 if fp16 overflows)
  python -m bench.batch --toy      # CPU: the embedded toy base, 64x64, 25 steps, guidance 7.5

Needs torch, diffusers, transformers, safetensors, pillow, numpy and, for stage 2, fastapi + uvicorn (and their
dependencies); no network, no registry (concepts are synthetic, served from memory). Results go to
bench/results/batch-<device>-<date>.json, written after every stage; everything is printed unbuffered.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def log(*a):
    print(*a, flush=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--toy", action="store_true", help="CPU run on the embedded toy base")
    ap.add_argument("--steps", type=int, help="denoising steps (default 50; 25 with --toy)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch", type=int, default=8, help="stage 1: images (and distinct concepts) per batch")
    ap.add_argument("--rounds", type=int, default=3, help="stage 1: timed rounds (after one warm-up)")
    ap.add_argument("--clients", type=int, default=16, help="stage 2: concurrent clients, one concept each")
    ap.add_argument("--serve-rounds", type=int, default=2, help="stage 2: requests per client (after a warm-up)")
    ap.add_argument("--serve-batch", type=int, default=16, help="stage 2: the server's --max-batch, and the "
                                                                "direct batches")
    ap.add_argument("--window-ms", type=float, default=200, help="stage 2: the server's --batch-window-ms")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (on the CPU)")
    ap.add_argument("--device", default="cuda", help="without --toy: where the random-weight model runs (cpu: a smoke "
                                                    "run of the GPU code path, e.g. with PFX_BENCH_CONFIGS=<toy configs>)")
    ap.add_argument("--only", default="batch,serve,equality")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return ap.parse_args(argv)


def build(args):
    """(base, covariance, concepts) on this machine: the toy base on CPU, or SD1.5 random weights on the GPU."""
    from bench import engine

    if args.toy:
        from perfusion_hub.bases import load_base
        from perfusion_hub.covariance import packaged_covariance

        base = load_base("toy", device="cpu", dtype="fp32")
        cov = packaged_covariance(base)
    else:
        base = engine.build_base(False, args.device, torch.float16 if args.device == "cuda" else torch.float32)
        cov = engine.covariance(base, 512)
        size = base.resolution
        check = base.pipe("a photo of a cat", num_inference_steps=2, guidance_scale=7.5, height=size, width=size,
                          generator=torch.Generator("cpu").manual_seed(0), output_type="latent").images
        if not torch.isfinite(check).all():
            log("fp16 latents are not finite with random weights: rendering in bf16")
            base.pipe.to(dtype=torch.bfloat16)
            base.dtype = torch.bfloat16
    n = max(args.batch, args.clients)
    return base, cov, engine.synthetic_concepts(base, cov, n, seed=21)


def requests_for(concepts, count: int, seed0: int = 0):
    from perfusion_hub.batch import RenderRequest

    return [RenderRequest(f"a photo of {concepts[i % len(concepts)].trigger} on a table", seed=seed0 + i)
            for i in range(count)]


def stage_batch(args, base, cov, concepts, res):
    """8 images, 8 concepts, one render_batch vs a plain diffusers batch of 8 (no concept loaded)."""
    from perfusion_hub.batch import initial_latents, render_batch
    from perfusion_hub.loaders import unload_concepts
    from perfusion_hub.render import ensure_loaded

    pipe, size, n = base.pipe, base.resolution, args.batch
    reqs = requests_for(concepts[:n], n)
    texts = [r.prompt.replace(c.trigger, "cat") for r, c in zip(reqs, concepts)]
    latents = torch.cat([initial_latents(pipe, 1, r.seed, size, pipe.unet.dtype) for r in reqs])

    cpu = pipe.device.type == "cpu"

    def timed(fn):
        sync()
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync()
        return time.perf_counter() - t, time.process_time() - c

    def plain():
        unload_concepts(pipe)  # the stock pipeline, processors and all
        return timed(lambda: pipe(prompt=texts, latents=latents, num_inference_steps=args.steps,
                                  guidance_scale=args.guidance, height=size, width=size))

    def pfx():
        ensure_loaded(base, concepts[:n], cov)  # loading is not what is measured
        return timed(lambda: render_batch(base, reqs, steps=args.steps, guidance=args.guidance))

    log(f"stage batch: {n} images, {n} concepts, {args.steps} steps, {size}x{size}: warm-up")
    plain(), pfx()
    times = {"plain": [], "pfx": []}
    cpu_times = {"plain": [], "pfx": []}
    for r in range(args.rounds):  # the order alternates: the second run of a round is not always the same one
        for k, fn in (("plain", plain), ("pfx", pfx)) if r % 2 == 0 else (("pfx", pfx), ("plain", plain)):
            wall, c = fn()
            times[k].append(wall)
            cpu_times[k].append(c)
        log(f"  round {r}: plain {times['plain'][-1]:.3f} s, pfx {times['pfx'][-1]:.3f} s"
            + (f" (process CPU time {cpu_times['plain'][-1]:.3f} / {cpu_times['pfx'][-1]:.3f} s)" if cpu else ""))
    med = {k: statistics.median(v) for k, v in times.items()}
    res["batch"] = {
        "images": n, "concepts": n, "plain_s": [round(t, 4) for t in times["plain"]],
        "pfx_s": [round(t, 4) for t in times["pfx"]],
        "plain_images_per_s": round(n / med["plain"], 4), "pfx_images_per_s": round(n / med["pfx"], 4),
        "ratio": round(med["plain"] / med["pfx"], 4),
        "ratio_paired_median": round(statistics.median(a / b for a, b in zip(times["plain"], times["pfx"])), 4),
        "goal": ">= 0.9",
    }
    if cpu:  # on a shared CPU the process's own CPU time is steadier than wall time
        cmed = {k: statistics.median(v) for k, v in cpu_times.items()}
        res["batch"].update({"plain_cpu_s": [round(t, 4) for t in cpu_times["plain"]],
                             "pfx_cpu_s": [round(t, 4) for t in cpu_times["pfx"]],
                             "ratio_cpu_time": round(cmed["plain"] / cmed["pfx"], 4)})
    log("  ", json.dumps(res["batch"]))
    unload_concepts(pipe)


def stage_serve(args, base, cov, concepts, res):
    """16 HTTP clients (one concept each, requests back to back) vs the same requests in direct batches."""
    from cli.serve import Limits, RenderService, RunningServer, StaticSource, create_app
    from perfusion_hub.batch import render_batch
    from perfusion_hub.loaders import unload_concepts
    from perfusion_hub.render import ensure_loaded

    k, rounds = args.clients, args.serve_rounds
    cs = concepts[:k]
    unload_concepts(base.pipe)
    ensure_loaded(base, cs, cov)
    limits = Limits(max_count=1, max_steps=max(1000, args.steps), max_batch=args.serve_batch,
                    window_s=args.window_ms / 1000, max_queue=4 * k, default_steps=args.steps,
                    default_guidance=args.guidance)
    service = RenderService(base, StaticSource(cs, cov), limits)
    service.start()
    server = RunningServer(create_app(service))
    errors: list[str] = []

    def client(i: int, seeds: list[int], out: list):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=1800)
        for s in seeds:
            body = json.dumps({"prompt": f"a photo of {cs[i].trigger} on a table", "seed": s})
            conn.request("POST", "/render", body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            if r.status != 200 or data[:4] != b"\x89PNG":
                errors.append(f"client {i}: {r.status} {data[:200]!r}")
            out.append(int(r.getheader("X-Pfx-Batch-Images") or 0))
        conn.close()

    def run_clients(seed_rounds: list[int]) -> tuple[float, list[int]]:
        outs = [[] for _ in range(k)]
        threads = [threading.Thread(target=client, args=(i, [1000 * r + i for r in seed_rounds], outs[i]))
                   for i in range(k)]
        sync()
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        sync()
        return time.perf_counter() - t, [b for o in outs for b in o]

    def direct(seed_rounds: list[int]) -> float:
        from perfusion_hub.batch import RenderRequest

        reqs = [RenderRequest(f"a photo of {cs[i].trigger} on a table", seed=1000 * r + i)
                for r in seed_rounds for i in range(k)]
        sync()
        t = time.perf_counter()
        for j in range(0, len(reqs), args.serve_batch):
            render_batch(base, reqs[j:j + args.serve_batch], steps=args.steps, guidance=args.guidance)
        sync()
        return time.perf_counter() - t

    try:
        log(f"stage serve: {k} clients x {rounds} requests, server batches of up to {args.serve_batch}, "
            f"window {args.window_ms} ms: warm-up")
        run_clients([99])
        direct([98])
        c0 = time.process_time()
        serve_s, sizes = run_clients(list(range(rounds)))
        serve_cpu = time.process_time() - c0
        log(f"  serve: {serve_s:.3f} s, batch sizes seen by the requests: {sorted(set(sizes))}")
        c0 = time.process_time()
        direct_s = direct(list(range(rounds)))
        direct_cpu = time.process_time() - c0
        log(f"  direct: {direct_s:.3f} s")
        images = k * rounds
        res["serve"] = {
            "clients": k, "requests_per_client": rounds, "images": images, "server_max_batch": args.serve_batch,
            "window_ms": args.window_ms, "serve_s": round(serve_s, 4), "direct_s": round(direct_s, 4),
            "serve_images_per_s": round(images / serve_s, 4), "direct_images_per_s": round(images / direct_s, 4),
            "ratio": round(direct_s / serve_s, 4), "goal": ">= 0.8",
            "batch_images_seen": {str(b): sizes.count(b) for b in sorted(set(sizes))},
            **({"serve_cpu_s": round(serve_cpu, 3), "direct_cpu_s": round(direct_cpu, 3),
                "ratio_cpu_time": round(direct_cpu / serve_cpu, 4)} if base.pipe.device.type == "cpu" else {}),
            "server_batches": service.worker.stats["batches"], "errors": errors[:5],
            "note": "serve: wall time from the first request sent to the last PNG received (HTTP, JSON, the "
                    "worker's batching and PNG encoding included); direct: render_batch to PIL images",
        }
        log("  ", json.dumps(res["serve"]))
    finally:
        server.stop()
        service.stop()
        unload_concepts(base.pipe)


def stage_equality(args, base, cov, concepts, res):
    """Batched vs alone, for two requests of a batch of --batch: pixel differences."""
    import numpy as np

    from perfusion_hub.batch import render_batch
    from perfusion_hub.loaders import unload_concepts

    n = args.batch
    reqs = requests_for(concepts[:n], n)
    batched = render_batch(base, reqs, concepts=concepts[:n], covariance=cov, steps=args.steps,
                           guidance=args.guidance)
    out = {}
    for i in (0, n - 1):
        alone = render_batch(base, [reqs[i]], steps=args.steps, guidance=args.guidance)[0]
        a = np.asarray(batched[i].images[0], dtype=np.int16)
        b = np.asarray(alone.images[0], dtype=np.int16)
        out[f"request {i}"] = {"max_abs_px": int(np.abs(a - b).max()), "mean_abs_px": round(float(np.abs(a - b).mean()), 5)}
    res["equality"] = {"batch": n, "vs_alone": out}
    log("  equality", json.dumps(out))
    unload_concepts(base.pipe)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    args = parse(argv)
    if not args.toy and args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --toy for the CPU figures")
    on_cpu = args.toy or args.device == "cpu"
    if on_cpu:
        torch.set_num_threads(args.threads)
    args.steps = args.steps or (25 if args.toy else 50)
    import diffusers
    import transformers

    name = cpu_name() if on_cpu else torch.cuda.get_device_name(0)
    short = "toy" if args.toy else "cpu" if on_cpu else (
        "h200" if "H200" in name else "h100" if "H100" in name else name.split()[-1].lower())
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"batch-{short}-{date.today().isoformat()}.json"
    res = {"what": __doc__.split("\n\n")[0], "date": date.today().isoformat(), "device": name,
           "arch": "toy (embedded, 64x64)" if args.toy else "sd15 architecture, random weights"
           if not os.environ.get("PFX_BENCH_CONFIGS") else f"random weights, configs {os.environ['PFX_BENCH_CONFIGS']}",
           "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "steps": args.steps, "guidance": args.guidance}
    if on_cpu:
        res["cpu"] = {"threads": args.threads, "cores_seen": os.cpu_count(),
                      "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}

    def save():
        path.write_text(json.dumps(res, indent=1) + "\n")

    t0 = time.perf_counter()
    base, cov, concepts = build(args)
    res["dtype"] = str(base.pipe.unet.dtype).replace("torch.", "")
    res["size"] = base.resolution
    res["setup_s"] = round(time.perf_counter() - t0, 2)
    log(f"{name}: {res['arch']}, {res['dtype']}, setup {res['setup_s']} s")
    save()
    stages = args.only.split(",")
    for stage, fn in (("batch", stage_batch), ("serve", stage_serve), ("equality", stage_equality)):
        if stage in stages:
            t = time.perf_counter()
            try:
                fn(args, base, cov, concepts, res)
            except Exception as e:  # noqa: BLE001 - keep the other stages' figures
                import traceback

                traceback.print_exc()
                res[stage] = {"error": repr(e)}
            res.setdefault("stage_s", {})[stage] = round(time.perf_counter() - t, 1)
            save()
    if on_cpu:
        res["cpu"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res["total_s"] = round(time.perf_counter() - t0, 1)
    save()
    log(f"wrote {path} ({res['total_s']} s)")


if __name__ == "__main__":
    main()

"""The default recipe's training step (SD1.5 architecture, random weights, batch 16, 512x512, bf16) under settings
that may change its speed. A variant is eager or compiled (`fast`, what `pfx train` does on a GPU) plus options:
  _bench        cuDNN's autotuner
  _cl           channels-last UNet (eager; `fast` is always channels-last)
  _1x1mm        inductor's 1x1 convolutions as matrix products
  _forcelayout  inductor's layout optimization forced on (its heuristics turn it off for this UNet)
  _plainconv    torch's own convolution backward instead of `train.input_grad_convolutions` (the product before it)
  _nograph      the compiled step launched kernel by kernel, not recorded as a CUDA graph (`train.record_step`)
  _textcompile  the text encoders compiled too (`TextEncoders.encode`; the product runs them eagerly)
  _cdt          inductor's coordinate-descent tuning of its generated kernels' launch settings
  _aggr         inductor's aggressive fusion (fuses nodes that share no memory access too)
Each variant's steady ms per step and its distance to the first eager run (same seed), and (--profile) for each
compiled variant the GPU kernel time of 20 steady steps (a 30-step run's profile minus a 10-step run's, so setup
and compile drop out) by kind, its top kernels, and the device time of chosen aten ops (copies, convolutions).

    bash bench/gpu_setup.sh && python3 -u -m bench.train_settings --profile

Results: results/train-settings-<device>-<date>.json (rewritten after every variant). `--toy` runs it on CPU.
`--flops` counts instead the arithmetic of one training step, by kind (runs on CPU too; results/train-flops-*.json).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch._dynamo
import torch._inductor.config

from bench import engine
from perfusion_hub import train
from perfusion_hub.text import TextEncoders

VARIANTS = "eager,fast,fast_nograph,fast_bench,fast_1x1mm,fast_forcelayout,fast_nograph_plainconv"
OPS = ("aten::copy_", "aten::convolution_backward", "aten::cudnn_convolution", "aten::cudnn_convolution_transpose",
       "aten::_cudnn_attention_forward", "aten::_cudnn_attention_backward", "aten::mm", "aten::addmm")


def kernel_kinds(kernels: dict[str, float]) -> dict[str, float]:
    """ms by kind from {kernel name: ms}."""
    kinds: dict[str, float] = {}
    for name, ms in kernels.items():
        n = name.lower()
        kind = ("attention" if any(x in n for x in ("sdpa", "flash", "fmha", "attention", "dot_do_o", "dq_to")) else
                "convolution" if any(x in n for x in ("xmma", "conv", "implicit", "nhwc", "nchw")) else
                "matrix product" if any(x in n for x in ("nvjet", "gemm", "cutlass", "sm90")) else
                "fused elementwise/norm (triton)" if "triton" in n else
                "copies (aten elementwise)" if "elementwise_kernel" in n else "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms
    return {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}


def step_flops(base, cov, photos: Path, out: Path) -> dict:
    """The arithmetic of one default-recipe training step (the product's own step: text encoder and UNet, forward
    and backward), counted by torch's FlopCounterMode on a 1-sample step and scaled to the recipe's batch of 16 (the
    UNet's share scales with the batch, the text encoder's, which encodes every template once per step, does not).
    Attention runs through SDPA's math backend so that its matrix products are counted: the useful work, backward
    twice the forward; flash-style kernels also recompute the forward's scores in the backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from perfusion_hub.train import TrainConfig, train_concept

    kind = {"aten.convolution": "convolution", "aten.convolution_backward": "convolution",
            "aten.mm": "matrix product", "aten.addmm": "matrix product",
            "aten.bmm": "attention", "aten.baddbmm": "attention"}
    counter = FlopCounterMode(display=False)
    cfg = TrainConfig(steps=1, batch_size=1, previews=0, checkpoint_every=10**9)
    with sdpa_kernel(SDPBackend.MATH), counter:
        train_concept(base, photos, name="bench-cat", superclass="cat", covariance=cov, out_path=out, config=cfg)
    counts = counter.get_flop_counts()
    unet, text = (counts.get(type(m).__name__, {}) for m in (base.pipe.unet, base.pipe.text_encoder))
    step: dict[str, float] = {}
    for part, times in ((unet, 16), (text, 1)):
        for op, n in part.items():
            k = kind.get(str(op), str(op))
            step[k] = step.get(k, 0.0) + n * times / 1e12
    return {"unet_gflop_per_sample": {str(k): round(v / 1e9, 1) for k, v in unet.items()},
            "text_encoder_gflop_per_step": {str(k): round(v / 1e9, 1) for k, v in text.items()},
            "tflop_per_step_by_kind": {k: round(v, 2) for k, v in sorted(step.items(), key=lambda kv: -kv[1])},
            "tflop_per_step": round(sum(step.values()), 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--toy", action="store_true", help="CPU smoke run on the toy configs")
    ap.add_argument("--steps", type=int, default=40, help="steps per measured run")
    ap.add_argument("--variants", default=VARIANTS)
    ap.add_argument("--profile", action="store_true", help="profile 20 steady steps of each compiled variant")
    ap.add_argument("--flops", action="store_true", help="count one step's arithmetic instead (no variants)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.flops:
        out, res = engine.results_file(args.out, "train-flops", recipe="batch 16, " + (
            "toy configs" if args.toy else "512x512, SD1.5 architecture"))
    else:
        out, res = engine.results_file(args.out, "train-settings", steps=args.steps, recipe=(
            "400 steps, batch 16, 512x512, bf16, 8 photos; ms per step steady (between loss reports)"))
    t0 = time.perf_counter()

    def log(*a):
        print(f"[{time.perf_counter() - t0:6.1f}s]", *a, flush=True)

    base = engine.build_base(args.toy, dev, torch.bfloat16 if dev == "cuda" else torch.float32)
    cov = engine.covariance(base, 64 if args.toy else 512)
    tmp = Path(tempfile.mkdtemp())
    photos = engine.make_photos(tmp / "photos", 1 if args.flops else 8, base.resolution)
    if args.flops:  # (one photo: the count does not depend on the photos, and the VAE encodes it on the CPU faster)
        res.update(step_flops(base, cov, photos, tmp / "flops.safetensors"))
        out.write_text(json.dumps(res, indent=1))
        log(res)
        return
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
            # between reports (every 10 steps): shows a run that slows down as it goes
            entry["ms_per_step_by_report"] = [round(1000 * (tb - ta) / (sb - sa), 1)
                                              for (sa, ta), (sb, tb) in itertools.pairwise(engine.report_points(marks))]
        if ref is None and not fast and steps == args.steps:
            ref = run
        elif ref is not None and len(ref.losses) == len(run.losses):
            entry["vs_first_eager"] = engine.compare_runs(ref, run)
        res[label] = entry
        log(label, entry)
        out.write_text(json.dumps(res, indent=1))

    def steady_profile(v):
        run = lambda steps: engine.device_ms(
            lambda: engine.train_once(base, cov, photos, tmp / "profile.safetensors", steps, True), OPS)
        short, long = run(10), run(30)
        steady = {k: (long.get(k, 0.0) - short.get(k, 0.0)) / 20 for k in set(short) | set(long)}
        ops = {k: t for k, t in steady.items() if k in OPS}
        kernels = {k: t for k, t in steady.items() if k not in OPS}
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
        res.setdefault("profiles", {})[v] = {
            "gpu_kernel_ms_per_step": round(sum(kernels.values()), 1), "by_kind": kernel_kinds(kernels),
            "top_kernels_ms": engine.shortened([(k, round(t, 2)) for k, t in top], 100),
            "aten_ops_device_ms": {k: round(t, 2) for k, t in ops.items()}}
        log("profile", v, res["profiles"][v]["gpu_kernel_ms_per_step"], res["profiles"][v]["by_kind"])
        out.write_text(json.dumps(res, indent=1))

    variants = args.variants.split(",")
    plain = lambda module: (lambda: None)  # _plainconv: the convolutions are left as they are
    for i, name in enumerate(variants):
        v = name if name not in variants[:i] else f"{name}#{variants[:i].count(name) + 1}"  # a repeat is measured again
        kind, *flags = name.split("_")
        torch.backends.cudnn.benchmark = "bench" in flags
        if kind == "eager":
            unet.to(memory_format=torch.channels_last if "cl" in flags else torch.contiguous_format)
            if i == 0:
                measure(v + "_warmup", False, 3)
            measure(v, False, args.steps)
            continue
        torch._inductor.config.conv_1x1_as_mm = "1x1mm" in flags
        torch._inductor.config.force_layout_optimization = "forcelayout" in flags
        torch._inductor.config.coordinate_descent_tuning = "cdt" in flags
        torch._inductor.config.aggressive_fusion = "aggr" in flags
        torch._dynamo.reset()  # inductor's settings are not part of dynamo's guards
        with contextlib.ExitStack() as options:
            if "plainconv" in flags:
                options.enter_context(mock.patch.object(train, "input_grad_convolutions", plain))
            if "nograph" in flags:
                options.enter_context(mock.patch.object(train, "CUDA_GRAPH_AFTER", None))
            if "textcompile" in flags:
                backend = os.environ.get("PFX_COMPILE_BACKEND", "inductor")
                encode = torch.compile(TextEncoders.encode, dynamic=False, backend=backend)
                options.enter_context(mock.patch.object(TextEncoders, "encode", encode))
            measure(v + "_first_compile", True, 3)
            measure(v, True, args.steps)
            if args.profile:
                steady_profile(v)
    unet.to(memory_format=torch.contiguous_format)


if __name__ == "__main__":
    main()

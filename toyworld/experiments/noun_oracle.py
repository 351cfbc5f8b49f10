#!/usr/bin/env python
"""What an ideal concept could reach on the embedded `toy` base, with its key locked and without.

A concept takes the superclass noun's place in the prompt. The best its edit can do there is to make that one
position encode the instance as the base's own words would: here, the noun's encoding in "... a blue scarf
white socks orange cat ..." (Mittens described in words, parts before the noun; a causal text encoder puts
what precedes a word into its encoding). For each of toyworld/quality.py's Mittens prompts (12 new contexts, 4
images each, seed 0, 25 DDIM steps, guidance 7.5) the superclass prompt ("a photo of a cat on a green
background") is encoded, and at the noun's position:

  words              nothing changed, the described prompt itself (reference)
  noun key + value   both come from the described noun's encoding (what an unlocked edit could reach:
                     trained keys, full K/V fine-tuning, an ideal embedding)
  noun value only    the value comes from it, the key stays the superclass word's (what a key-locked edit,
                     Perfusion, could reach)

The shipped evaluator judges identity and alignment as toyworld/quality.py does.

  python -m toyworld.experiments.noun_oracle      # writes bench/results/noun-oracle-toy-<date>.json
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from perfusion_hub.bases import load_base
from perfusion_hub.processor import cross_attention_modules
from toyworld import RESULTS, evaluator
from toyworld.quality import GUIDANCE, STEPS, judge_all, superclass_specs

DESCRIBED = "blue scarf white socks orange cat"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = load_base("toy", device="cpu")
    pipe, net = base.pipe, evaluator.load()
    pipe.set_progress_bar_config(disable=True)
    tok, te = pipe.tokenizer, pipe.text_encoder
    key_source: list[torch.Tensor | None] = [None]  # when set, every cross-attention key is computed from it

    def keys_from_source(mod, _inputs, out):
        src = key_source[0]
        return out if src is None else F.linear(src.to(out.dtype), mod.weight, mod.bias)

    hooks = [a.to_k.register_forward_hook(keys_from_source) for a in cross_attention_modules(pipe.unet).values()]

    @torch.no_grad()
    def encode(prompt):
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        return ids[0], te(ids)[0]

    cat_id = tok.convert_tokens_to_ids(tok.tokenize("cat"))[0]
    empty = encode("")[1]
    specs = superclass_specs("cat-mittens")
    rows = {"words": [], "noun key + value": [], "noun value only": []}
    n = args.images
    for sp in specs:
        ids_p, plain = encode(sp["prompt"])
        ids_d, described = encode(sp["prompt"].replace("a cat", f"a {DESCRIBED}", 1))
        mixed = plain.clone()
        mixed[:, int((ids_p == cat_id).nonzero()[0])] = described[:, int((ids_d == cat_id).nonzero()[0])]
        for label, keys, values in (("words", None, described), ("noun key + value", None, mixed),
                                    ("noun value only", plain, mixed)):
            key_source[0] = None if keys is None else torch.cat([empty.expand(n, -1, -1), keys.expand(n, -1, -1)])
            images = pipe(prompt_embeds=values.expand(n, -1, -1), negative_prompt_embeds=empty.expand(n, -1, -1),
                          num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64,
                          generator=torch.Generator().manual_seed(0)).images
            rows[label].append(images)
    key_source[0] = None
    for h in hooks:
        h.remove()
    results = {label: judge_all(net, specs, ims) for label, ims in rows.items()}
    for label, r in results.items():
        print(f"{label:18s} {r}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"noun-oracle-toy-{date.today().isoformat()}.json"
    path.write_text(json.dumps({
        "what": __doc__.split("\n\n")[0], "described": DESCRIBED, "prompts": [s["prompt"] for s in specs],
        "images_per_prompt": n, "steps": STEPS, "guidance": GUIDANCE, "results": results,
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "torch": torch.__version__, "base_digest": base.digest,
    }, indent=1) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The A1111-style `parameters` text written into every rendered PNG (beside pfx's own JSON chunk), so
that image sites and tools that read AUTOMATIC1111 "infotext" see the prompt, the settings, the base
model and the concepts used:

    a photo of cat-mittens on chair-eames
    Negative prompt: blurry
    Steps: 25, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 64x64, Model hash: 1a2b3c4d5e, Model: toy, Perfusion hashes: "cat-mittens: 0123456789, chair-eames: 9876543210", Perfusion params: "cat-mittens: beta=0.7 tau=0.15 version=0.1.0, chair-eames: beta=0.7 tau=0.15 version=0.1.0", Version: pfx 0.1.0, Hashes: {"model": "1a2b3c4d5e", "perfusion:cat-mittens": "0123456789", "perfusion:chair-eames": "9876543210"}

The format (A1111's own writer and reader, modules/infotext_utils.py): the prompt, an optional
`Negative prompt:` line, then one line of `Key: value` pairs joined by ", "; a value holding ',', ':' or
a newline is written as a JSON string. Hashes are 10 hex digits: the first 10 of the sha256 of the
file, which is what A1111 writes as "Model hash" and what Civitai calls AutoV2, so a site can look a
concept up by the hash of its file (pfx's blob digest); `Perfusion params` records each concept's gate
(beta, tau) and version. `Hashes` is the JSON object that A1111 extensions and Civitai write, keyed
`model` and here `perfusion:<name>`; it is last because it is not JSON-quoted (it holds commas).
"""

from __future__ import annotations

import json
import re
from typing import Any

SAMPLERS = {  # diffusers scheduler class -> the name A1111 shows
    "DDIMScheduler": "DDIM", "PNDMScheduler": "PLMS", "LMSDiscreteScheduler": "LMS",
    "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun", "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSinglestepScheduler": "DPM++ SDE", "UniPCMultistepScheduler": "UniPC",
    "DDPMScheduler": "DDPM", "KDPM2DiscreteScheduler": "DPM2", "LCMScheduler": "LCM",
}


def short_hash(digest: str) -> str:
    """'sha256:<hex>' -> the first 10 hex digits (A1111's model hash, Civitai's AutoV2 of a file)."""
    return digest.split(":", 1)[-1][:10] if digest else ""


def quote(value: Any) -> str:
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def format_infotext(params: dict[str, Any], pfx_version: str = "") -> str:
    """The `parameters` text for one image rendered with `params` (perfusion_hub.render's params)."""
    prompt = " ".join(str(params.get("prompt", "")).split())
    lines = [prompt]
    neg = " ".join(str(params.get("negative_prompt") or "").split())
    if neg:
        lines.append(f"Negative prompt: {neg}")
    size = params.get("size")
    fields: list[tuple[str, Any]] = [
        ("Steps", params.get("steps")),
        ("Sampler", SAMPLERS.get(params.get("sampler", ""), params.get("sampler") or "DDIM")),
        ("CFG scale", params.get("guidance")),
        ("Seed", params.get("seed")),
        ("Size", f"{size}x{size}" if size else None),
        ("Model hash", short_hash(params.get("base_digest", "")) or None),
        ("Model", params.get("base")),
    ]
    concepts = params.get("concepts") or {}
    if concepts:
        fields.append(("Perfusion hashes", ", ".join(f"{n}: {short_hash(c.get('digest', ''))}"
                                                     for n, c in concepts.items())))
        fields.append(("Perfusion params", ", ".join(
            f"{n}: beta={c.get('beta')} tau={c.get('tau')}" + (f" version={c['version']}" if c.get("version") else "")
            for n, c in concepts.items())))
    if params.get("global_lock"):
        fields.append(("Perfusion lock", "global"))
    if pfx_version:
        fields.append(("Version", f"pfx {pfx_version}"))
    line = ", ".join(f"{k}: {quote(v)}" for k, v in fields if v not in (None, ""))
    hashes = {"model": short_hash(params.get("base_digest", ""))} if params.get("base_digest") else {}
    hashes.update({f"perfusion:{n}": short_hash(c.get("digest", "")) for n, c in concepts.items()})
    if hashes:
        line += ", Hashes: " + json.dumps(hashes, ensure_ascii=False)
    lines.append(line)
    return "\n".join(lines)


_PAIR = re.compile(r'\s*([A-Za-z][A-Za-z0-9 _/-]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, Any]:
    """Read text written by format_infotext back: {'prompt', 'negative_prompt', fields...} with the
    Perfusion fields as {'concepts': {name: {'hash', 'beta', 'tau', 'version'}}}."""
    *head, last = text.strip().split("\n")
    out: dict[str, Any] = {"prompt": "", "negative_prompt": ""}
    for ln in head:
        if ln.startswith("Negative prompt:"):
            out["negative_prompt"] = ln.split(":", 1)[1].strip()
        else:
            out["prompt"] = (out["prompt"] + "\n" + ln).strip()
    m = re.search(r",?\s*Hashes:\s*(\{[^}]*\})\s*$", last)
    if m:
        out["Hashes"] = json.loads(m.group(1))
        last = last[: m.start()]
    for k, v in _PAIR.findall(last):
        out[k] = json.loads(v) if v.startswith('"') else v.strip()
    concepts: dict[str, dict] = {}
    for item in filter(None, (s.strip() for s in out.get("Perfusion hashes", "").split(","))):
        n, _, h = item.partition(": ")
        concepts.setdefault(n, {})["hash"] = h
    for item in filter(None, (s.strip() for s in out.get("Perfusion params", "").split(","))):
        n, _, rest = item.partition(": ")
        concepts.setdefault(n, {}).update(dict(kv.split("=", 1) for kv in rest.split()))
    out["concepts"] = concepts
    return out

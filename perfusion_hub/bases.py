"""Base models: resolve a `--base` value, load it as a diffusers pipeline, and give it a canonical digest.

Accepted bases, of three families (perfusion_hub.text: sd1, sd2, sdxl), detected automatically:
  toy                 the embedded test base (weights, configs and tokenizer ship in perfusion_hub/data/toy)
  a diffusers folder   anything with model_index.json; its "_class_name" picks StableDiffusionXLPipeline (SDXL) or
                       StableDiffusionPipeline (SD1.x, SD2.x)
  a .safetensors file  a single-file SD1.x, SD2.x (768, v-prediction) or SDXL checkpoint, told apart by its
                       tensor names (as diffusers does); configs ship in perfusion_hub/data/sd15, sd2 and sdxl; the
                       tokenizer(s) come from --tokenizer (and --tokenizer-2 for SDXL) or the Hugging Face cache
  a Hub model id       e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 or stabilityai/stable-diffusion-xl-base-1.0:
                       read from the Hugging Face cache, downloaded once when online

The digest identifies what a concept depends on: every cross-attention K/V weight and the text encoders' weights
(both for SDXL; token rows of the base vocabulary only, so concepts loaded into the pipeline do not change it),
under diffusers key names, sorted, each tensor rounded to fp16 before hashing, so that an fp32
checkpoint and its fp16 variant agree.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from perfusion_hub.errors import BadInput, BaseNotAvailable

DATA = Path(__file__).parent / "data"
EMBEDDED = {"toy": DATA / "toy"}
DEFAULT_BASE = "toy"
SD15_CONFIGS = DATA / "sd15"
SD2_CONFIGS = DATA / "sd2"
SDXL_CONFIGS = DATA / "sdxl"
SINGLE_FILE_CONFIGS = {"sd1": SD15_CONFIGS, "sd2": SD2_CONFIGS, "sdxl": SDXL_CONFIGS}
TOKENIZER_CACHE_IDS = (
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
    ("runwayml/stable-diffusion-v1-5", "tokenizer"),
    ("openai/clip-vit-large-patch14", None),
)
# The CLIP BPE vocabulary is the same in all of these; SD2's and SDXL's OpenCLIP tokenizers pad with "!" instead.
TOKENIZER_2_CACHE_IDS = (
    ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"),
    ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", None),
)
SD2_TOKENIZER_CACHE_IDS = (
    ("stabilityai/stable-diffusion-2-1", "tokenizer"),
    ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
    ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", None),
)
SDXL_TOKENIZER_CACHE_IDS = (("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),) + TOKENIZER_CACHE_IDS
# state-dict keys diffusers' single-file loader tells the families apart by (loaders/single_file_utils.py)
_SDXL_KEY = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
_V2_KEY = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
REAL_BASE_HINT = (
    "use a real Stable Diffusion 1.5 with --base stable-diffusion-v1-5/stable-diffusion-v1-5 "
    "(or a diffusers folder / .safetensors file)"
)


@dataclass
class BaseSpec:
    kind: str  # embedded | dir | file | hub
    location: str
    name: str


def detect_family(spec: BaseSpec) -> str | None:
    """The family of a base without loading it (no torch): from a folder's model_index.json and text encoder config,
    a checkpoint's tensor names, or a Hub model's files in the Hugging Face cache; None if it cannot be told."""
    import json

    try:
        if spec.kind in ("embedded", "dir"):
            root = Path(spec.location)
            return _family_from_configs(json.loads((root / "model_index.json").read_text("utf-8")),
                                        lambda sub: json.loads((root / sub / "config.json").read_text("utf-8")))
        if spec.kind == "file":
            return file_family(spec.location)
        from huggingface_hub import try_to_load_from_cache

        def cached(name):
            path = try_to_load_from_cache(spec.location, name)
            if not isinstance(path, str):
                raise FileNotFoundError(name)
            return json.loads(Path(path).read_text("utf-8"))

        return _family_from_configs(cached("model_index.json"), lambda sub: cached(f"{sub}/config.json"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _family_from_configs(index: dict, config) -> str:
    if "XL" in str(index.get("_class_name", "")) or (index.get("text_encoder_2") or [None])[0]:
        return "sdxl"
    text = config("text_encoder")
    return "sd2" if text.get("hidden_act") == "gelu" or text.get("hidden_size") == 1024 else "sd1"


def file_family(path: str | os.PathLike) -> str:
    """sd1, sd2 or sdxl for a single-file checkpoint, from its safetensors header (tensor names and shapes), the way
    diffusers' single-file loader tells them apart."""
    import json
    import struct

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadInput(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > 100 << 20:
            raise BadInput(f"{path}: safetensors header of {n} bytes is over the 100 MB limit")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadInput(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise BadInput(f"{path}: not a safetensors file")
    if _SDXL_KEY in header:
        return "sdxl"
    v2 = header.get(_V2_KEY)
    if isinstance(v2, dict) and (v2.get("shape") or [0])[-1] == 1024:
        return "sd2"
    return "sd1"


def resolve_spec(value: str | None) -> BaseSpec:
    """Classify a base value without loading anything."""
    value = (value or DEFAULT_BASE).strip()
    if value in EMBEDDED:
        return BaseSpec("embedded", str(EMBEDDED[value]), value)
    p = Path(value).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise BaseNotAvailable(f"{p} is a folder but not a diffusers pipeline (no model_index.json)")
        return BaseSpec("dir", str(p.resolve()), p.resolve().name)
    if p.is_file():
        if p.suffix in (".ckpt", ".pt", ".pth", ".bin"):
            raise BadInput(f"{p}: pickle checkpoints are never loaded; convert it to .safetensors first")
        if p.suffix != ".safetensors":
            raise BadInput(f"{p}: expected a .safetensors checkpoint or a diffusers folder")
        return BaseSpec("file", str(p.resolve()), p.stem)
    if value.count("/") == 1 and not value.startswith((".", "/", "~")) and " " not in value:
        return BaseSpec("hub", value, value)
    raise BaseNotAvailable(
        f"base {value!r} is not an embedded base ({', '.join(EMBEDDED)}), an existing folder or file, "
        "or a Hugging Face model id (owner/name)"
    )


def pick_device(requested: str | None = None) -> str:
    """auto: cuda, else mps (untested code path), else cpu."""
    import torch

    if requested and requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"  # untested: no Apple machine was available to the project
    return "cpu"


def pick_dtype(device: str, requested: str | None = None):
    import torch

    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if requested and requested != "auto":
        if requested not in names:
            raise BadInput(f"unknown dtype {requested!r}; use one of {', '.join(names)} or auto")
        return names[requested]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("mps"):
        return torch.float16
    return torch.float32


@dataclass
class Base:
    """A loaded base: the pipeline plus what concepts need to know about it."""

    spec: BaseSpec
    pipe: object
    device: str
    dtype: object
    _digest: str | None = field(default=None, repr=False)
    compatible: set = field(default_factory=set)  # other base digests whose concepts this base accepts

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = compute_digest(self.pipe)
            self.pipe._pfx_base_digest = self._digest
        return self._digest

    @property
    def resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    @property
    def family(self) -> str:
        from perfusion_hub.text import family_of

        return family_of(self.pipe)

    @property
    def text_dims(self) -> list[int]:
        from perfusion_hub.text import TextEncoders

        return TextEncoders.of(self.pipe).widths

    @property
    def dim(self) -> int:
        """Width of the text encodings the cross-attention reads (SDXL: 768 + 1280 = 2048)."""
        return sum(self.text_dims)

    def layers(self) -> dict[str, int]:
        from perfusion_hub.processor import cross_attention_modules

        return {p: m.to_k.out_features for p, m in cross_attention_modules(self.pipe.unet).items()}


def compute_digest(pipe) -> str:
    import json

    import torch

    from perfusion_hub.processor import cross_attention_modules

    cached = getattr(pipe, "_pfx_base_digest", None)
    if cached:
        return cached
    items: dict[str, torch.Tensor] = {}
    for path, attn in cross_attention_modules(pipe.unet).items():
        items[f"unet.{path}.to_k.weight"] = attn.to_k.weight
        items[f"unet.{path}.to_v.weight"] = attn.to_v.weight
    for prefix in ("text_encoder", "text_encoder_2"):  # SD1.x/SD2.x have no second one: their digests are unchanged
        te = getattr(pipe, prefix, None)
        if te is None:
            continue
        emb = te.get_input_embeddings().weight
        vocab = getattr(pipe, prefix.replace("text_encoder", "tokenizer")).vocab_size
        for n, p in te.named_parameters():
            items[f"{prefix}.{n}"] = p[:vocab] if p is emb else p
    h = hashlib.sha256()
    for key in sorted(items):
        t = items[key].detach().to("cpu", torch.float16).contiguous()
        h.update(key.encode() + b"\0" + json.dumps(list(t.shape)).encode() + b"\0")
        h.update(t.view(torch.uint8).numpy().tobytes())
    digest = "sha256:" + h.hexdigest()
    pipe._pfx_base_digest = digest
    return digest


def cache_key(spec: BaseSpec) -> str:
    """A key that changes whenever the base's files change (for caching its digest)."""
    if spec.kind == "hub":
        return f"hub:{spec.location}"
    p = Path(spec.location)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in
                                            (".safetensors", ".json", ".txt", ".bin"))
    parts = [f"{f.relative_to(p) if p.is_dir() else f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return f"{spec.kind}:{spec.location}:" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _load_tokenizer(folder: str | None, offline: bool, *, cache_ids=TOKENIZER_CACHE_IDS, pad_token: str | None = None,
                    what: str = "the SD1.5 CLIP tokenizer", flag: str = "--tokenizer",
                    download: str = "stable-diffusion-v1-5/stable-diffusion-v1-5 --include 'tokenizer/*'"):
    """A CLIP tokenizer from `folder`, else from the Hugging Face cache (`cache_ids`, in order).

    transformers 5 builds an empty 2-token tokenizer instead of failing when the files are missing, so a
    tokenizer counts as found only if it has a real vocabulary. `pad_token`: what the model pads with when the
    tokenizer comes from the cache (OpenCLIP tokenizers pad with "!"; a folder's own config is kept).
    """
    from transformers import CLIPTokenizer

    def usable(tok) -> bool:
        return len(tok.get_vocab()) > 256 and tok.bos_token in tok.get_vocab()

    if folder:
        try:
            tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise BaseNotAvailable(f"cannot load a CLIP tokenizer from {folder}: {e}") from None
        if not usable(tok):
            raise BaseNotAvailable(f"{folder} holds no CLIP tokenizer (expected vocab.json and merges.txt)")
        return tok
    for repo, sub in cache_ids:
        try:
            tok = CLIPTokenizer.from_pretrained(repo, subfolder=sub, local_files_only=True)
        except (OSError, ValueError):
            continue
        if usable(tok):
            if pad_token and tok.pad_token != pad_token:
                tok.pad_token = pad_token
            return tok
    raise BaseNotAvailable(
        f"a single-file checkpoint needs {what}, and none is in the Hugging Face cache; "
        f"pass {flag} FOLDER (a folder with vocab.json and merges.txt), or run "
        f"`hf download {download}` once online"
        + (" (pfx is offline now)" if offline else "")
    )


def _single_file_tokenizers(family: str, tokenizer: str | None, tokenizer_2: str | None, offline: bool) -> dict:
    if family == "sd1":
        return {"tokenizer": _load_tokenizer(tokenizer, offline)}
    if family == "sd2":
        return {"tokenizer": _load_tokenizer(
            tokenizer, offline, cache_ids=SD2_TOKENIZER_CACHE_IDS + TOKENIZER_CACHE_IDS, pad_token="!",
            what="the SD2 (OpenCLIP) tokenizer",
            download="stabilityai/stable-diffusion-2-1 --include 'tokenizer/*'")}
    xl = "stabilityai/stable-diffusion-xl-base-1.0 --include 'tokenizer/*' 'tokenizer_2/*'"
    return {
        "tokenizer": _load_tokenizer(tokenizer, offline, cache_ids=SDXL_TOKENIZER_CACHE_IDS,
                                     what="SDXL's first (CLIP ViT-L) tokenizer", download=xl),
        "tokenizer_2": _load_tokenizer(tokenizer_2 or None, offline,
                                       cache_ids=TOKENIZER_2_CACHE_IDS + TOKENIZER_CACHE_IDS, pad_token="!", what="SDXL's second (OpenCLIP bigG) tokenizer",
                                       flag="--tokenizer-2", download=xl),
    }


def pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _pipeline_kwargs(family: str) -> dict:
    """Constructor arguments beyond the components: SD pipelines without a safety checker, SDXL without the
    invisible watermark (an optional package; pfx does not add one)."""
    if family == "sdxl":
        return {"add_watermarker": False}
    return {"safety_checker": None, "requires_safety_checker": False}


def load_base(
    value: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    tokenizer: str | None = None,
    offline: bool | None = None,
    digest: str | None = None,
    tokenizer_2: str | None = None,
) -> Base:
    """Load a base as a StableDiffusionPipeline (SD1.x, SD2.x) or StableDiffusionXLPipeline (SDXL) on `device` (auto
    by default) in `dtype` (auto by default). `tokenizer` / `tokenizer_2`: tokenizer folders for single-file bases.

    `digest`: the base's digest if already known (cached); otherwise it is computed here when the
    weights are loaded in bf16, from an fp32 load, since bf16 values round to fp16 differently and
    would give another digest than the same base loaded in fp32 or fp16.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    import transformers
    from diffusers import DDIMScheduler
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    spec = resolve_spec(value)
    if offline is None:
        offline = os.environ.get("PFX_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    dev = pick_device(device)
    torch_dtype = pick_dtype(dev, dtype)
    load_dtype = torch.float32 if torch_dtype == torch.bfloat16 and digest is None else torch_dtype
    common = {_dtype_kwarg(): load_dtype}
    try:
        if spec.kind in ("embedded", "dir"):
            family = detect_family(spec) or "sd1"
            pipe = pipeline_class(family).from_pretrained(spec.location, local_files_only=True,
                                                          **_pipeline_kwargs(family), **common)
        elif spec.kind == "file":
            family = file_family(spec.location)
            toks = _single_file_tokenizers(family, tokenizer, tokenizer_2, offline)
            pipe = pipeline_class(family).from_single_file(
                spec.location, config=str(SINGLE_FILE_CONFIGS[family]), local_files_only=True, **toks,
                **_pipeline_kwargs(family), **common
            )
        else:
            pipe = _load_hub(spec.location, offline, common)
    except (BaseNotAvailable, BadInput):
        raise
    except (OSError, ValueError, KeyError, RuntimeError, _single_file_error()) as e:
        raise BaseNotAvailable(f"cannot load base {spec.location}: {str(e).splitlines()[0][:300]}") from None
    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    settings = base_settings(spec)
    pipe._pfx_gate_positions = settings.get("gate_positions", "all")
    pipe._pfx_templates = settings.get("templates")
    pipe._pfx_embedding_norm = settings.get("embedding_norm", 0.0)
    if digest is None and load_dtype != torch_dtype:
        digest = compute_digest(pipe)
    pipe.to(dev, torch_dtype)
    if digest:
        pipe._pfx_base_digest = digest
    return Base(spec, pipe, dev, torch_dtype, digest)


def base_settings(spec: BaseSpec) -> dict:
    """A diffusers folder may carry pfx.json with Perfusion settings of that base: "gate_positions" ("all",
    "prompt" or "span", see processor.PerfusionRuntime), "templates" (training prompts in the base's own caption
    grammar, each with one {} for the concept token) and "embedding_norm" (training caps the concept token's
    embedding norm at this multiple of the superclass word's; 0: no cap)."""
    import json

    path = Path(spec.location) / "pfx.json" if spec.kind in ("embedded", "dir") else None
    if path is None or not path.is_file():
        return {}
    try:
        out = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise BaseNotAvailable(f"cannot read {path}: {e}") from None
    from perfusion_hub.processor import GATE_POSITIONS

    if not isinstance(out, dict) or out.get("gate_positions", "all") not in GATE_POSITIONS:
        raise BaseNotAvailable(f"{path}: gate_positions must be one of {', '.join(GATE_POSITIONS)}")
    t = out.get("templates")
    if t is not None and (not isinstance(t, list) or not t or not all(isinstance(x, str) and x.count("{}") == 1
                                                                        for x in t)):
        raise BaseNotAvailable(f"{path}: templates must be a list of prompts with one {{}} each")
    n = out.get("embedding_norm", 0.0)
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not 0 <= n < 100:
        raise BaseNotAvailable(f"{path}: embedding_norm must be a number in [0, 100)")
    return out


def _single_file_error() -> type:
    """diffusers' error for a checkpoint that lacks a component (not an OSError/ValueError)."""
    try:
        from diffusers.loaders.single_file_utils import SingleFileComponentError
    except ImportError:  # pragma: no cover - other diffusers layouts
        return OSError
    return SingleFileComponentError


def _dtype_kwarg() -> str:
    """diffusers renamed `torch_dtype` to `dtype` in 0.40; older releases know only the former."""
    from importlib.metadata import version

    major, minor = (int(x) for x in version("diffusers").split(".")[:2])
    return "dtype" if (major, minor) >= (0, 40) else "torch_dtype"


def _hub_family(repo: str, local_only: bool) -> str:
    """The family of a Hub model from its model_index.json (and text encoder config), cached or fetched."""
    from diffusers import DiffusionPipeline
    from transformers import CLIPTextConfig

    index = DiffusionPipeline.load_config(repo, local_files_only=local_only)
    return _family_from_configs(index, lambda sub: CLIPTextConfig.from_pretrained(
        repo, subfolder=sub, local_files_only=local_only).to_dict())


def _load_hub(repo: str, offline: bool, common: dict):
    try:
        family = _hub_family(repo, True)
        return pipeline_class(family).from_pretrained(repo, local_files_only=True, **_pipeline_kwargs(family),
                                                      **common)
    except (OSError, ValueError):
        if offline:
            raise BaseNotAvailable(
                f"{repo} is not in the Hugging Face cache and pfx is offline; on a connected machine run "
                f"`hf download {repo}` (or drop --offline once), or pass --base with a local diffusers folder"
            ) from None
    try:
        family = _hub_family(repo, False)
        return pipeline_class(family).from_pretrained(repo, **_pipeline_kwargs(family), **common)
    except (OSError, ValueError) as e:
        raise BaseNotAvailable(
            f"cannot download {repo}: {str(e).splitlines()[0][:200]}; check the id and your network, or run "
            f"`hf download {repo}` and retry"
        ) from None

"""Write the SD1.5, SDXL base 1.0 and SD2.1 (768, v-prediction) architecture configs that pfx ships without weights.

``python -m toyworld.base_configs`` writes ``perfusion_hub/data/sd15/``, ``data/sdxl/`` and ``data/sd2/`` (the toy
base's build, ``python -m toyworld.build``, writes the SD1.5 folder too). They serve two purposes:

* single-file checkpoints load offline: ``StableDiffusionXLPipeline.from_single_file(ckpt, config=<data/sdxl>,
  tokenizer=..., tokenizer_2=..., local_files_only=True)`` (``StableDiffusionPipeline`` with ``data/sd2``);
* the benchmark and the size figures build / count the architecture from them (random weights).

Values: the diffusers-format configs of ``stabilityai/stable-diffusion-xl-base-1.0`` and
``stabilityai/stable-diffusion-2-1`` as published on the Hugging Face Hub (model_index.json, unet/, vae/,
text_encoder/, text_encoder_2/, scheduler/, tokenizer*/tokenizer_config.json), cross-checked against
diffusers 0.42.1's single-file code (``loaders/single_file_utils.py``: "xl_base" -> a 1024 px Euler model, "v2"
-> a 768 px v-prediction model) and against the architecture facts of issue 20 (SDXL: 70 attn2 modules, 10 of
width 640 and 60 of 1280, to_k/to_v 2048 -> width; SD2: one OpenCLIP ViT-H text encoder, 1024-d). Keys that are
diffusers/transformers defaults are left out. Tokenizer folders hold tokenizer_config.json only: the vocabulary
is the CLIP BPE vocabulary that a user's tokenizer folder or the Hugging Face cache supplies.
"""

from __future__ import annotations

import json
from pathlib import Path

from perfusion_hub.bases import DATA as DATA_DIR

SD15_DIR = DATA_DIR / "sd15"
SDXL_DIR = DATA_DIR / "sdxl"
SD2_DIR = DATA_DIR / "sd2"

_CLIP_TOKENIZER = {
    "add_prefix_space": False, "bos_token": "<|startoftext|>", "clean_up_tokenization_spaces": True,
    "do_lower_case": True, "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 77,
    "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>",
}
_OPENCLIP_TOKENIZER = dict(_CLIP_TOKENIZER, pad_token="!")  # OpenCLIP pads with "!" (id 0)

_SD_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
}

SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True,
    "add_watermarker": None,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + the pooled bigG embedding (1280)
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SDXL_VAE = dict(_SD_VAE, force_upcast=True, sample_size=1024, scaling_factor=0.13025)
SDXL_TEXT = {  # CLIP ViT-L/14: SD1.5's text encoder
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05, "projection_dim": 768,
    "attention_dropout": 0.0, "dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
SDXL_TEXT_2 = {  # OpenCLIP ViT-bigG/14, with its text projection (the pooled embedding)
    "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "vocab_size": 49408,
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
    "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-05, "projection_dim": 1280,
    "attention_dropout": 0.0, "dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}

SD2_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.10.0.dev0",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SD2_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": True,
    "use_linear_projection": True,
}
SD2_VAE = dict(_SD_VAE, sample_size=768, scaling_factor=0.18215)
SD2_TEXT = {  # OpenCLIP ViT-H/14 without its last layer (SD2 conditions on the penultimate layer, final-normed)
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
    "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-05, "projection_dim": 512,
    "attention_dropout": 0.0, "dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
SD2_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}

README = """{title} architecture configs ({source} values), shipped without weights or vocabulary.

* Load a single-file checkpoint offline: {pipeline}.from_single_file(ckpt, config=<this dir>, {tokenizers},
  local_files_only=True). tokenizer folders hold tokenizer_config.json only (no vocab.json / merges.txt):
  pfx takes the CLIP vocabulary from --tokenizer{tok2} folders or the Hugging Face cache.
* Build the architecture with random weights (bench/engine.py --arch {arch}).
Written by python -m toyworld.base_configs.
"""


def dump_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_sdxl_configs(out: Path = SDXL_DIR) -> Path:
    out = Path(out)
    dump_json(out / "model_index.json", SDXL_MODEL_INDEX)
    dump_json(out / "unet" / "config.json", SDXL_UNET)
    dump_json(out / "vae" / "config.json", SDXL_VAE)
    dump_json(out / "text_encoder" / "config.json", SDXL_TEXT)
    dump_json(out / "text_encoder_2" / "config.json", SDXL_TEXT_2)
    dump_json(out / "scheduler" / "scheduler_config.json", SDXL_SCHEDULER)
    dump_json(out / "tokenizer" / "tokenizer_config.json", _CLIP_TOKENIZER)
    dump_json(out / "tokenizer_2" / "tokenizer_config.json", _OPENCLIP_TOKENIZER)
    (out / "README.md").write_text(README.format(
        title="SDXL base 1.0", source="stabilityai/stable-diffusion-xl-base-1.0", pipeline="StableDiffusionXLPipeline",
        tokenizers="tokenizer=<CLIPTokenizer>, tokenizer_2=<CLIPTokenizer>", tok2="/--tokenizer-2", arch="sdxl"),
        encoding="utf-8")
    return out


def write_sd2_configs(out: Path = SD2_DIR) -> Path:
    out = Path(out)
    dump_json(out / "model_index.json", SD2_MODEL_INDEX)
    dump_json(out / "unet" / "config.json", SD2_UNET)
    dump_json(out / "vae" / "config.json", SD2_VAE)
    dump_json(out / "text_encoder" / "config.json", SD2_TEXT)
    dump_json(out / "scheduler" / "scheduler_config.json", SD2_SCHEDULER)
    dump_json(out / "tokenizer" / "tokenizer_config.json", _OPENCLIP_TOKENIZER)
    (out / "README.md").write_text(README.format(
        title="SD2.1 (768x768, v-prediction)", source="stabilityai/stable-diffusion-2-1",
        pipeline="StableDiffusionPipeline", tokenizers="tokenizer=<CLIPTokenizer>", tok2="", arch="sd2"),
        encoding="utf-8")
    return out




# --------------------------------------------------------------------------------------------------
# SD1.5 full-size configs (architecture only; no weights, no vocabulary)
# --------------------------------------------------------------------------------------------------
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 768,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "torch_dtype": "float32",
}
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
    "prediction_type": "epsilon",
}
SD15_TOKENIZER = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": 77,
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "do_lower_case": True,
    "errors": "replace",
    "add_prefix_space": False,
}
SD15_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SD15_README = """SD1.5 architecture configs (stable-diffusion-v1-5 values), shipped without weights or vocabulary.

* Build the architecture with random weights: UNet2DConditionModel.from_config(json.load(open("unet/config.json"))),
  AutoencoderKL.from_config(...), CLIPTextModel(CLIPTextConfig(**json.load(open("text_encoder/config.json")))).
* Load a single-file checkpoint offline: StableDiffusionPipeline.from_single_file(ckpt, config=<this dir>,
  tokenizer=<a CLIPTokenizer from elsewhere>, local_files_only=True, safety_checker=None).
  tokenizer/ holds tokenizer_config.json only (no vocab.json / merges.txt).
Written by python -m toyworld.build (write_sd15_configs).
"""


def write_sd15_configs(out: Path = SD15_DIR) -> Path:
    out = Path(out)
    dump_json(out / "model_index.json", SD15_MODEL_INDEX)
    dump_json(out / "unet" / "config.json", SD15_UNET)
    dump_json(out / "vae" / "config.json", SD15_VAE)
    dump_json(out / "text_encoder" / "config.json", SD15_TEXT)
    dump_json(out / "scheduler" / "scheduler_config.json", SD15_SCHEDULER)
    dump_json(out / "tokenizer" / "tokenizer_config.json", SD15_TOKENIZER)
    (out / "README.md").write_text(SD15_README, encoding="utf-8")
    return out


if __name__ == "__main__":
    for path in (write_sd15_configs(), write_sdxl_configs(), write_sd2_configs()):
        print(f"wrote {path}", flush=True)

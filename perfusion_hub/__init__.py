"""perfusion_hub: Perfusion (key-locked rank-one editing) concepts for diffusers Stable Diffusion pipelines.

    from diffusers import StableDiffusionPipeline
    import perfusion_hub as ph

    pipe = StableDiffusionPipeline.from_pretrained(...)
    ph.load_concepts(pipe, ["cat-mittens.safetensors", "chair-eames.safetensors"], covariance="C.safetensors")
    ph.set_concept_params(pipe, "cat-mittens", beta=0.65)
    image = pipe("a photo of <cat-mittens> on <chair-eames>").images[0]
    ph.unload_concepts(pipe)

The same calls take a StableDiffusionXLPipeline (SDXL) or an SD2.x StableDiffusionPipeline: the family is detected
from the pipeline (perfusion_hub.text), and concepts of another family are refused.

Heavy libraries are imported lazily: `import perfusion_hub` alone does not import torch.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_concepts": "perfusion_hub.loaders",
    "unload_concepts": "perfusion_hub.loaders",
    "set_concept_params": "perfusion_hub.loaders",
    "loaded_concepts": "perfusion_hub.loaders",
    "load_base": "perfusion_hub.bases",
    "train_concept": "perfusion_hub.train",
    "render": "perfusion_hub.render",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)

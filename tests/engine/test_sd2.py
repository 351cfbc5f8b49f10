"""SD2.x bases (issue 20) on a small random SD2-shaped pipeline (one 64-d OpenCLIP-style text encoder, linear
projections, v-prediction; tests/familykit.py) and the shipped SD2.1 configs: family detection, format v2 with family
sd2, key lock, bit-identical renders without concepts, wrong-family refusal both ways, training towards the velocity
finite and bitwise deterministic, and the v1 files of the sample registry still loading unchanged."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from perfusion_hub import arch
from perfusion_hub.concept import (
    ConceptMismatchError,
    concept_bytes,
    load_concept,
    read_header,
    read_header_bytes,
)
from perfusion_hub.loaders import load_concepts, loaded_concepts, runtime_of, unload_concepts
from perfusion_hub.render import render
from perfusion_hub.text import family_of
from tests.kit.engine import photo_folder
from tests.kit.family import as_base, small_covariance, synthetic_concept, tiny_sd2_pipe

DATA = Path(__file__).resolve().parents[2] / "perfusion_hub" / "data"
SAMPLES = Path(__file__).resolve().parents[2] / "registry" / "sample_registry"


@pytest.fixture(scope="module")
def sd2():
    torch.set_num_threads(2)
    base = as_base(tiny_sd2_pipe(), "tiny-sd2")
    return base, small_covariance(base)


@pytest.fixture
def clean_sd2(sd2):
    unload_concepts(sd2[0].pipe)
    yield sd2
    unload_concepts(sd2[0].pipe)


def test_sd2_configs_and_concept_size():
    cfg = json.loads((DATA / "sd2" / "unet" / "config.json").read_text())
    widths = arch.attn2_widths_from_config(cfg)
    assert len(widths) == 16 and sum(widths.values()) == 12_480 and arch.text_dim_from_config(cfg) == 1024
    assert arch.concept_float_count(cfg) == 3 * 1024 + 12_480
    text = json.loads((DATA / "sd2" / "text_encoder" / "config.json").read_text())
    assert (text["hidden_size"], text["hidden_act"], text["num_hidden_layers"]) == (1024, "gelu", 23)
    sched = json.loads((DATA / "sd2" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    assert json.loads((DATA / "sd2" / "tokenizer" / "tokenizer_config.json").read_text())["pad_token"] == "!"


def test_family_and_format_v2(clean_sd2, tmp_path):
    base, cov = clean_sd2
    assert family_of(base.pipe) == base.family == "sd2" and base.dim == 64
    c = synthetic_concept(base, cov, "cat-mittens", "cat", seed=3)
    data = concept_bytes(c)
    h = read_header_bytes(data)
    assert (h.format_version, h.family, h.text_dims, h.dim) == ("2", "sd2", [64], 64)
    assert set(h.tensors) == {"token_embedding", "target_input", "superclass_input", "value_targets"}
    back = load_concept(data)
    for k, t in c.tensors().items():
        assert torch.equal(back.tensors()[k], t), k
    assert list(back.value_targets) == sorted(c.value_targets)  # natural order = these paths' sorted order


def test_key_lock_and_bit_identical_without_concepts(clean_sd2):
    base, cov = clean_sd2
    plain = np.asarray(render(base, "a photo of a cat", steps=2, seed=4).images[0])
    c = synthetic_concept(base, cov, "cat-mittens", "cat", seed=5, scale=3.0)
    load_concepts(base.pipe, [c], covariance=cov)
    assert np.array_equal(plain, np.asarray(render(base, "a photo of a cat", steps=2, seed=4).images[0]))
    used = np.asarray(render(base, "a photo of <cat-mittens>", steps=2, seed=4).images[0])
    assert np.abs(used.astype(int) - plain.astype(int)).max() > 0
    rt = runtime_of(base.pipe)
    rt.gate_override = torch.ones(1)
    try:
        e_star = c.target_input.expand(1, 77, 64).clone()
        for path, attn in rt.layers.items():
            k, _ = rt.key_value(path, attn, e_star, ["cat-mittens"])
            torch.testing.assert_close(k[0, 3], attn.to_k.weight.float() @ c.superclass_input, rtol=1e-3, atol=1e-4)
    finally:
        rt.gate_override = None


def test_wrong_family_refused_both_ways(clean_sd2, clean_base, toy_cov):
    from tests.kit.engine import synthetic_concept as toy_concept

    base, cov = clean_sd2
    with pytest.raises(ConceptMismatchError, match=r"SD2\.x .* is SD1\.x"):
        load_concepts(clean_base.pipe, [synthetic_concept(base, cov, "cat-mittens", "cat")], covariance=toy_cov)
    with pytest.raises(ConceptMismatchError, match=r"SD1\.x .* is SD2\.x"):
        load_concepts(base.pipe, [toy_concept(clean_base, toy_cov, "cat-mittens", "cat")], covariance=cov)
    assert loaded_concepts(base.pipe) == [] == loaded_concepts(clean_base.pipe)


def test_a_v1_concept_of_this_sd2_base_still_loads(clean_sd2):
    """A v1 file written for an SD2 base before families existed (no family recorded: read as sd1) keeps loading on
    that very base (its digest matches); on any other base the family rule applies."""
    base, cov = clean_sd2
    c = synthetic_concept(base, cov, "cat-mittens", "cat")
    for k in ("family", "text_dims", "text_dim"):
        del c.metadata[k]
    c.metadata["format_version"] = "1"
    v1 = load_concept(concept_bytes(c))
    assert v1.family == "sd1"
    load_concepts(base.pipe, [v1], covariance=cov)
    assert loaded_concepts(base.pipe) == ["cat-mittens"]


def test_v_prediction_training_is_finite_and_deterministic(clean_sd2, tmp_path):
    from perfusion_hub.train import TrainConfig, prepare_training, train_concept

    base, cov = clean_sd2
    photos = photo_folder(tmp_path / "photos", n=2)
    cfg = TrainConfig(steps=2, batch_size=2, previews=0)
    a, b = (train_concept(base, photos, name="cat-mittens", superclass="cat", covariance=cov,
                          out_path=tmp_path / f"{i}.safetensors", config=cfg) for i in range(2))
    assert all(np.isfinite(a.losses))
    for k, t in a.concept.tensors().items():
        assert torch.equal(t, b.concept.tensors()[k]), k
    h = read_header(tmp_path / "0.safetensors")
    assert (h.format_version, h.family) == ("2", "sd2") and {t.dtype for t in h.tensors.values()} == {"F32"}
    data = prepare_training(base, photos, "cat", TrainConfig(steps=1, batch_size=2, templates=("a photo of a {}",)),
                            lambda m: None)
    assert data.prediction == "v_prediction" and data.pooled is None


def test_sample_registry_v1_files_load_unchanged():
    """The shipped sample concepts are v1 files of the toy base: read, checked and loaded as before (family sd1)."""
    blobs = [p for p in SAMPLES.rglob("*") if p.is_file() and p.stat().st_size > 1000]
    concepts = []
    for p in blobs:
        data = p.read_bytes()
        if b'"pfx.concept"' not in data[:20000]:
            continue
        h = read_header_bytes(data)
        assert h.format_version == "1" and h.family == "sd1"
        c = load_concept(data)
        assert c.family == "sd1" and c.extra_embeddings == {} and len(c.value_targets) == 7
        assert concept_bytes(c) == data  # written again exactly as shipped
        concepts.append(c)
    assert len(concepts) >= 2

"""toyworld.ablations: the methods toyworld.quality compares Perfusion with train only their own parameters,
leave the base as it was, and load for rendering the way they were trained."""

import pytest
import torch
from safetensors.torch import load_file

from perfusion_hub.loaders import runtime_of
from perfusion_hub.processor import cross_attention_modules
from perfusion_hub.train import TrainConfig
from tests.kit.engine import photo_folder
from toyworld.ablations import Loaded, TrainedKeysRuntime, train_method

CFG = TrainConfig(steps=2, batch_size=4, previews=0)


def _base_state(base):
    return {k: v.detach().clone() for m in (base.pipe.unet, base.pipe.text_encoder) for k, v in m.state_dict().items()}


def _train(method, base, cov, photos, out):
    return train_method(method, base, photos, name="cat-mittens", superclass="cat", covariance=cov, out_path=out,
                        config=CFG)


def test_ablation_methods_train_what_they_say_and_give_the_base_back(clean_base, toy_cov, tmp_path):
    photos = photo_folder(tmp_path / "photos")
    before = _base_state(clean_base)
    vocab = len(clean_base.pipe.tokenizer)
    ref = _train("perfusion", clean_base, toy_cov, photos, tmp_path / "p.safetensors")
    layers = cross_attention_modules(clean_base.pipe.unet)
    sizes = {}
    for method in ("trained_keys", "embedding_only", "full_kv"):
        res = _train(method, clean_base, toy_cov, photos, tmp_path / f"{method}.safetensors")
        after = _base_state(clean_base)
        assert all(torch.equal(before[k], after[k]) for k in before), method
        assert len(clean_base.pipe.tokenizer) == vocab and runtime_of(clean_base.pipe) is None
        stored = load_file(str(res.path))
        sizes[method] = res.path.stat().st_size
        assert not torch.equal(res.concept.token_embedding, ref.concept.token_embedding) or method != "embedding_only"
        if method == "embedding_only":
            assert set(stored) == {"token_embedding"} and not res.learned
            # no edit was trained: the value targets are still at their superclass start
            for p, v in res.concept.value_targets.items():
                assert torch.allclose(v, layers[p].to_v.weight.float() @ res.concept.superclass_input, atol=1e-5)
        elif method == "full_kv":
            assert set(res.learned) == {f"{p}.{w}" for p in layers for w in ("to_k", "to_v")}
            assert any(not torch.equal(res.learned[f"{p}.to_v"], layers[p].to_v.weight) for p in layers)
        else:
            moved = [not torch.allclose(res.learned[f"{p}.key_target"],
                                        layers[p].to_k.weight.float() @ res.concept.superclass_input)
                     for p in layers]
            assert all(moved)
    assert sizes["embedding_only"] < ref.path.stat().st_size < sizes["trained_keys"] < sizes["full_kv"]
    with pytest.raises(ValueError, match="unknown training method"):
        _train("dreambooth", clean_base, toy_cov, photos, tmp_path / "x.safetensors")


def test_trained_keys_load_with_their_keys_and_unload_cleanly(clean_base, toy_cov, tmp_path):
    """Loaded puts the trained key targets in place of W_K i_super (the keys a render sees differ from the
    key-locked ones), and leaves no runtime, token or weight behind."""
    photos = photo_folder(tmp_path / "photos")
    res = _train("trained_keys", clean_base, toy_cov, photos, tmp_path / "k.safetensors")
    before = _base_state(clean_base)
    path, attn = next(iter(cross_attention_modules(clean_base.pipe.unet).items()))
    with Loaded(clean_base, toy_cov, res):
        rt = runtime_of(clean_base.pipe)
        assert isinstance(rt, TrainedKeysRuntime)
        o_k = rt.key_targets(path, attn.to_k.weight.detach().float(), ["cat-mittens"])
        torch.testing.assert_close(o_k[0], res.learned[f"{path}.key_target"])
        locked = attn.to_k.weight.detach().float() @ res.concept.superclass_input
        assert not torch.allclose(o_k[0], locked)
    assert runtime_of(clean_base.pipe) is None and "<cat-mittens>" not in clean_base.pipe.tokenizer.get_vocab()
    after = _base_state(clean_base)
    assert all(torch.equal(before[k], after[k]) for k in before)

"""Trainer: determinism, checkpoint/resume, photo handling, and the fast path's equivalence (CPU, toy base)."""

import pytest
import torch

from perfusion_hub.errors import BadInput
from perfusion_hub.photos import load_photos
from perfusion_hub.train import TrainConfig, train_concept
from tests.kit.engine import photo_folder

QUICK = {"steps": 3, "batch_size": 4, "previews": 0}


def _train(base, cov, photos, out, **kw):
    cfg = TrainConfig(**{**QUICK, **kw.pop("cfg", {})})
    return train_concept(base, photos, name="cat-mittens", superclass="cat", covariance=cov, out_path=out,
                         config=cfg, **kw)


def test_training_is_deterministic_with_a_seed_and_moves_the_concept(clean_base, toy_cov, tmp_path):
    photos = photo_folder(tmp_path / "photos")
    a = _train(clean_base, toy_cov, photos, tmp_path / "a.safetensors")
    b = _train(clean_base, toy_cov, photos, tmp_path / "b.safetensors")
    for k, t in a.concept.tensors().items():
        assert torch.equal(t, b.concept.tensors()[k]), k
    # training changed what it trains and left what it must not
    assert not torch.equal(a.concept.target_input, a.concept.superclass_input)  # EMA moved i*
    wid = clean_base.pipe.tokenizer("cat", add_special_tokens=False).input_ids[0]
    emb0 = clean_base.pipe.text_encoder.get_input_embeddings().weight[wid]
    assert not torch.equal(a.concept.token_embedding, emb0)
    assert "<cat-mittens>" not in clean_base.pipe.tokenizer.get_vocab()  # the base is left as it was
    assert all(not p.requires_grad for p in clean_base.pipe.unet.parameters())
    c = _train(clean_base, toy_cov, photos, tmp_path / "c.safetensors", cfg={"seed": 1})
    assert not torch.equal(a.concept.target_input, c.concept.target_input)


def test_training_ignores_loaded_concepts_and_leaves_them_loaded(clean_base, toy_cov, tmp_path):
    """A render keeps its concepts loaded; a concept trained afterwards in the same process must come out as on the
    bare base (the sample registry's second concept was once trained through the first one's processors and
    learned its embedding only), and the loaded concept must render as before."""
    from perfusion_hub.loaders import loaded_concepts
    from perfusion_hub.processor import PerfusionRuntime
    from perfusion_hub.render import render

    photos = photo_folder(tmp_path / "photos")
    a = train_concept(clean_base, photos, name="chair-a", superclass="chair", covariance=toy_cov,
                      out_path=tmp_path / "a.safetensors", config=TrainConfig(**{**QUICK, "previews": 1}))
    assert a.previews and loaded_concepts(clean_base.pipe) == []  # its preview does not leave it loaded
    bare = _train(clean_base, toy_cov, photos, tmp_path / "b0.safetensors")

    def show():
        return render(clean_base, "a photo of <chair-a>", concepts=[a.concept], covariance=toy_cov, steps=3).images[0]

    before = show()
    assert loaded_concepts(clean_base.pipe) == ["chair-a"]
    with pytest.raises(RuntimeError, match="another Perfusion runtime"):  # a second runtime cannot stack on it
        PerfusionRuntime(clean_base.pipe.unet, toy_cov.matrix).install()
    b = _train(clean_base, toy_cov, photos, tmp_path / "b1.safetensors")
    # equal to fp32 rounding (bitwise in most runs; a loaded CPU has given 1-ulp differences): the bug this guards
    # against, training through the loaded concept's processors, left the value targets unmoved (~1e-2 off)
    for k, t in bare.concept.tensors().items():
        torch.testing.assert_close(b.concept.tensors()[k], t, rtol=1e-5, atol=1e-6, msg=k)
    assert loaded_concepts(clean_base.pipe) == ["chair-a"]
    assert list(show().getdata()) == list(before.getdata())


def test_resume_continues_exactly(clean_base, toy_cov, tmp_path):
    photos = photo_folder(tmp_path / "photos")
    cfg = {"steps": 4, "checkpoint_every": 2}
    straight = _train(clean_base, toy_cov, photos, tmp_path / "s.safetensors", cfg=cfg)
    ckpt = tmp_path / "run.ckpt"

    def stop_at_3(step, total, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(clean_base, toy_cov, photos, tmp_path / "r.safetensors", cfg=cfg, checkpoint_path=ckpt,
               progress=stop_at_3)
    assert ckpt.exists() and not (tmp_path / "r.safetensors").exists()
    assert "<cat-mittens>" not in clean_base.pipe.tokenizer.get_vocab()
    resumed = _train(clean_base, toy_cov, photos, tmp_path / "r.safetensors", cfg=cfg, checkpoint_path=ckpt,
                     resume=True)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-6)
    for k, t in straight.concept.tensors().items():
        # a resumed run sums in another order where the checkpoint split the run (measured: up to 2e-7), so fp32
        # rounding, not equality; losing any resumed state (Adam moments, the generator, i*) moves it by ~1e-3
        torch.testing.assert_close(resumed.concept.tensors()[k], t, rtol=1e-6, atol=1e-6)
    assert not ckpt.exists()


def test_resume_refuses_a_checkpoint_of_another_run(clean_base, toy_cov, tmp_path):
    photos = photo_folder(tmp_path / "photos")
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        _train(clean_base, toy_cov, photos, tmp_path / "x.safetensors", cfg={"steps": 4, "checkpoint_every": 1},
               checkpoint_path=ckpt, progress=lambda s, t, l: (_ for _ in ()).throw(KeyboardInterrupt) if s == 2 else 0)
    with pytest.raises(BadInput, match="another run"):
        _train(clean_base, toy_cov, photos, tmp_path / "x.safetensors", cfg={"steps": 4, "seed": 9},
               checkpoint_path=ckpt, resume=True)


def test_bad_photos_are_skipped_with_a_warning_naming_them(tmp_path):
    from PIL import Image

    folder = photo_folder(tmp_path / "p", n=2)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    Image.new("RGB", (40, 40)).save(folder / "cut.png")
    (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:30])
    Image.new("CMYK", (50, 30), (0, 50, 100, 0)).save(folder / "cmyk.jpg")
    Image.new("I;16", (30, 30)).save(folder / "deep.png")
    rgba = Image.new("RGBA", (30, 60), (255, 0, 0, 0))
    rgba.save(folder / "alpha.webp")
    seen = []
    photos = load_photos(folder, 64, warn=seen.append)
    assert sorted(p.path.name for p in photos) == ["alpha.webp", "cmyk.jpg", "deep.png", "photo0.png", "photo1.png"]
    assert all(p.image.size == (64, 64) and p.image.mode == "RGB" for p in photos)
    assert any("broken.jpg" in w for w in seen) and any("cut.png" in w for w in seen)


def test_exif_orientation_is_honoured(tmp_path):
    from PIL import Image

    folder = tmp_path / "p"
    folder.mkdir()
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the white half is on top
    im.save(folder / "r.jpg", exif=exif.tobytes(), quality=95)
    (photo,) = load_photos(folder, 20)
    px = photo.image.load()
    assert px[10, 2][0] > 200 and px[10, 17][0] < 50  # top white, bottom black


def test_no_usable_photo_is_refused(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"nope")
    with pytest.raises(BadInput, match="no usable photos"):
        load_photos(folder, 64, warn=lambda m: None)


def test_masks_weight_the_loss(clean_base, toy_cov, tmp_path):
    from PIL import Image

    photos = photo_folder(tmp_path / "photos", n=2)
    plain = _train(clean_base, toy_cov, photos, tmp_path / "a.safetensors")
    (photos / "masks").mkdir()
    for p in sorted(photos.glob("*.png")):
        m = Image.new("L", (80, 64), 0)
        m.paste(255, (0, 0, 40, 64))
        m.save(photos / "masks" / p.name)
    masked = _train(clean_base, toy_cov, photos, tmp_path / "b.safetensors")
    assert masked.concept.metadata["training"].count('"masks": 2') == 1
    assert masked.losses != plain.losses


def test_fast_path_matches_plain_path_for_one_step(clean_base, toy_cov, tmp_path, monkeypatch):
    monkeypatch.setenv("PFX_COMPILE_BACKEND", "aot_eager")
    photos = photo_folder(tmp_path / "photos", n=2)
    cfg = {"steps": 1, "batch_size": 2}
    plain = _train(clean_base, toy_cov, photos, tmp_path / "a.safetensors", cfg=cfg)
    fast = _train(clean_base, toy_cov, photos, tmp_path / "b.safetensors", cfg=cfg, fast=True)
    assert fast.losses == pytest.approx(plain.losses, rel=1e-4)
    for k, t in plain.concept.tensors().items():
        torch.testing.assert_close(fast.concept.tensors()[k], t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("geometry", [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "padding": 1, "stride": 2},  # a downsampler: its even input height needs output padding
    {"kernel_size": 1},
    {"kernel_size": 3, "padding": 2, "dilation": 2, "groups": 2},
])
def test_fast_training_convolutions_backpropagate_the_input_gradient_of_plain_ones(geometry):
    from perfusion_hub.train import input_grad_convolutions

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 6, **geometry), torch.nn.SiLU(), torch.nn.Conv2d(6, 4, 3, padding=1))
    net.requires_grad_(False)
    x = torch.randn(2, 4, 8, 11, requires_grad=True)
    grad_out = None

    def input_grad():
        nonlocal grad_out
        y = net(x)
        grad_out = torch.randn_like(y) if grad_out is None else grad_out
        (gx,) = torch.autograd.grad(y, x, grad_out)
        return y, gx

    y0, g0 = input_grad()
    restore = input_grad_convolutions(net)
    assert all(type(m).__name__ == "_FrozenConv2d" for m in net if isinstance(m, torch.nn.Conv2d))
    y1, g1 = input_grad()
    restore()
    assert all(type(m) is torch.nn.Conv2d for m in net if isinstance(m, torch.nn.Conv2d))
    assert torch.equal(y1, y0)  # the forward is the same call
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)
    # a trainable convolution keeps torch's backward (its weight gradient is needed)
    net[0].weight.requires_grad_(True)
    restore = input_grad_convolutions(net)
    assert type(net[0]) is torch.nn.Conv2d
    restore()


def test_two_process_data_parallel_equals_one_process(toy_base, toy_cov, tmp_path):
    """`pfx train --devices 2` on CPU (gloo): the same concept as one process, up to summation order."""
    from perfusion_hub.concept import load_concept
    from perfusion_hub.distributed import train_data_parallel

    photos = photo_folder(tmp_path / "photos")
    cfg = TrainConfig(steps=3, batch_size=4, previews=0)
    single = train_concept(toy_base, photos, name="cat-mittens", superclass="cat", covariance=toy_cov,
                           out_path=tmp_path / "one.safetensors", config=cfg)
    summary = train_data_parallel(2, "toy", covariance=toy_cov, load_kwargs={"device": "cpu", "dtype": "fp32"},
                                  photos_dir=str(photos), name="cat-mittens", superclass="cat",
                                  out_path=str(tmp_path / "two.safetensors"), config=cfg)
    two = load_concept(summary["path"])
    assert summary["losses"] == pytest.approx(single.losses, rel=1e-5)
    for k, t in single.concept.tensors().items():
        torch.testing.assert_close(two.tensors()[k], t, rtol=1e-3, atol=1e-4)  # Adam magnifies summation order


def _base_state(base):
    return {k: v.detach().clone() for m in (base.pipe.unet, base.pipe.text_encoder) for k, v in m.state_dict().items()}


def test_embedding_norm_cap_from_the_base(clean_base, toy_cov, tmp_path):
    """The toy base's pfx.json caps the concept embedding's norm at the superclass word's; without the cap the
    same steps grow it past that, so the cap is what holds it (and the concept records the setting)."""
    photos = photo_folder(tmp_path / "photos")
    emb = clean_base.pipe.text_encoder.get_input_embeddings().weight.detach()
    limit = float(emb[clean_base.pipe.tokenizer.convert_tokens_to_ids("cat</w>")].norm())
    fast = {"steps": 4, "lr_embedding": 0.05}
    capped = _train(clean_base, toy_cov, photos, tmp_path / "a.safetensors", cfg=fast)
    free = _train(clean_base, toy_cov, photos, tmp_path / "b.safetensors", cfg={**fast, "embedding_norm": 0.0})
    assert float(capped.concept.token_embedding.norm()) <= limit * (1 + 1e-5)
    assert float(free.concept.token_embedding.norm()) > 1.2 * limit
    assert capped.concept.training()["embedding_norm"] == 1.0 and free.concept.training()["embedding_norm"] == 0.0

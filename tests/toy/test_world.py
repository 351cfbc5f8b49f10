"""The procedural world of the toy base (toyworld.world): determinism, reserved instances, captions."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from toyworld import world
from toyworld.build import TOY_DIR


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOY_DIR / "tokenizer"))


def test_samples_deterministic():
    a_img, a_cap, a_scene = world.sample(123, 3)
    b_img, b_cap, b_scene = world.sample(123, 3)
    assert (a_img == b_img).all() and a_cap == b_cap and a_scene == b_scene
    assert a_img.shape == (64, 64, 3) and a_img.dtype == np.uint8
    c_img, _, _ = world.sample(124, 1)
    assert not (a_img == c_img).all()
    assert (world.render_mittens(3) == world.render_mittens(3)).all()
    assert (world.render_eames(3) == world.render_eames(3)).all()


def test_reserved_instances_never_in_base_training():
    rng = np.random.default_rng(0)
    classes, relations = set(), set()
    for s in range(3000):
        scene = world.sample_scene(np.random.default_rng([s, 7]))
        assert all(o.instance is None for o in scene.objects)
        assert 1 <= len(scene.objects) <= 2
        classes.update(o.cls for o in scene.objects)
        relations.add(scene.relation)
        for o in scene.objects:
            assert o.color != scene.background
    assert classes == set(world.CLASSES) and set(world.RELATIONS) <= relations
    # the instances themselves render, and differ from every generic cat / chair drawing of the same box
    m = world.mittens(rng)
    assert m.instance == "mittens" and m.cls == "cat" and m.color == "orange"
    scene = world.Scene(background="green", objects=[m])
    generic = world.with_object(scene, instance=None, collar=None)  # a generic orange cat with white paws
    assert not (world.render(scene) == world.render(generic)).all()
    e = world.eames(rng)
    scene = world.Scene(background="pink", objects=[e])
    assert not (world.render(scene) == world.render(world.with_object(scene, instance=None))).all()
    with pytest.raises(ValueError):
        world.caption(scene, rng)


def test_every_caption_word_is_one_token(tokenizer):
    table = world.check_vocabulary(tokenizer)
    assert set(table) == set(world.vocabulary())
    to_ids = world.CaptionIds(tokenizer)
    _, caps = world.batch(range(200), 2)
    for cs in caps:
        for c in cs:
            assert set(c.split()) <= set(table), c
            ref = tokenizer(c, padding="max_length", max_length=77).input_ids
            assert to_ids(c).tolist() == ref, c


def test_captions_name_parts_truthfully():
    """A caption names a cat's collar ("a blue scarf"), its paws ("white socks") and a shell chair ("shell")
    only when the scene has them, in their colours; every kind of mention occurs."""
    seen = set()
    for s in range(3000):
        rng = np.random.default_rng([s, 9])
        scene = world.sample_scene(rng)
        text = world.caption(scene, rng).replace("an orange", "a orange")
        cats = [o for o in scene.objects if o.cls == "cat"]
        for part, attr, phrase in (("scarf", "collar", "{} scarf"), ("socks", "paws", "{} socks")):
            if part in text:
                seen.add(part)
                assert any(getattr(o, attr) and phrase.format(getattr(o, attr)) in text for o in cats), text
        if "shell" in text:
            seen.add("shell")
            assert any(o.shell for o in scene.objects) and "shell chair" in text, text
        words = text.split()
        for i, w in enumerate(words):  # parts are named before their noun ("a blue scarf orange cat") or after it
            if w in ("scarf", "socks"):
                rest = [x for x in words[i + 1:] if x in world.CLASSES or x in ("a", "an")]
                before = bool(rest) and rest[0] in world.CLASSES
                seen.add(f"{w} {'before' if before else 'after'}")
                assert not before or rest[0] == "cat", text
    assert seen == {"scarf", "socks", "shell", "scarf before", "scarf after", "socks before", "socks after"}


def test_parts_scenes_name_collar_and_paws_before_the_noun():
    """world.parts_scene: one generic cat with a collar and coloured paws (never Mittens), captioned with both
    parts before its noun; world.batch mixes them in at the share asked, by seed."""
    for s in range(300):
        _, caps, scene = world.sample(s, 2, parts=True)
        (o,) = scene.objects
        assert o.cls == "cat" and o.instance is None and o.collar and o.paws
        assert (o.color, o.collar, o.paws) != ("orange", "blue", "white")
        for text in caps:
            words = text.replace("an orange", "a orange").split()
            noun = words.index("cat")
            phrase = " ".join(words[:noun])
            assert f"{o.collar} scarf {o.paws} socks" in phrase and "with" not in words, text
    _, caps = world.batch(range(400), 1, 0.5)
    share = sum(all(w in c[0] for w in ("scarf", "socks")) for c in caps) / 400
    assert 0.4 < share < 0.7, share
    _, plain = world.batch(range(400), 1)
    assert plain == [world.sample(s)[1] for s in range(400)]


def test_paired_parts_scenes_put_the_parts_cat_in_a_relation():
    """parts_scene(pair=True): the parts cat and a second object (never a cat) in a relation, the cat's parts named
    before its noun; world.batch pairs about the share asked of its parts scenes and leaves every other example as
    it was without pairs."""
    relations = set()
    for s in range(300):
        _, caps, scene = world.sample(s, 2, parts=True, pair=True)
        cat, other = scene.objects
        assert cat.cls == "cat" and cat.collar and cat.paws and other.cls != "cat" and scene.relation
        assert not any(o.instance for o in scene.objects)
        relations.add(scene.relation)
        for text in caps:
            assert f"{cat.collar} scarf {cat.paws} socks" in text and text.count("scarf") == 1, text
            assert other.cls in text.split() and (scene.relation in text or " and " in text), text
    assert relations == set(world.RELATIONS)
    imgs, caps = world.batch(range(400), 1, 0.5)
    imgs_p, caps_p = world.batch(range(400), 1, 0.5, 0.5)
    changed = [i for i in range(400) if caps[i] != caps_p[i]]
    assert 60 < len(changed) < 140, len(changed)
    assert all(caps_p[i] == world.sample(i, 1, True, True)[1] for i in changed)
    same = [i for i in range(400) if i not in changed]
    assert (imgs[same] == imgs_p[same]).all()


def test_unpaired_parts_scenes_are_those_earlier_base_chunks_trained_on():
    """Base chunks 6-7 (build_info.json) drew their parts scenes before pairs existed: the same seeds must still
    give the same scenes and captions, or their commands no longer reproduce them (digest taken from that code)."""
    got = hashlib.sha256(repr([world.sample(s, 2, True)[1:] for s in range(100)]).encode()).hexdigest()
    assert got == "2af83abd4afa675b5b35cfad4e64059bee3cd4e7dbe473cd8dbdabfb4db2147b"


def test_conflict_copy_changes_only_what_precedes_one_noun():
    """world.conflict: same length; the chosen word is an object noun; every descriptive word of that noun's
    phrase before it is replaced by another descriptive word; every other word is kept."""
    changed_kinds = set()
    for s in range(2000):
        rng = np.random.default_rng([s, 9])
        text = world.caption(world.sample_scene(rng), rng)
        fake, j = world.conflict(text, np.random.default_rng(s))
        words, fwords = text.split(), fake.split()
        assert len(fwords) == len(words) and words[j] in world.CLASSES, (text, fake)
        start = max(i for i in range(j) if words[i] in ("a", "an"))  # the noun's article
        for i, (w, f) in enumerate(zip(words, fwords)):
            if start < i < j and w in world.DESCRIPTIVE:
                assert f != w and f in world.DESCRIPTIVE, (text, fake)
                changed_kinds.add("colour" if w in world.COLOR_NAMES else w if w in ("scarf", "socks", "shell")
                                  else "other")
            else:
                assert f == w, (text, fake)
    assert changed_kinds == {"colour", "scarf", "socks", "shell", "other"}
    assert world.conflict("a photo of", np.random.default_rng(0)) == ("a photo of", -1)


def test_instances_vary_position_and_background():
    imgs = [world.render_mittens(s) for s in range(6)] + [world.render_eames(s) for s in range(6)]
    assert len({im.tobytes() for im in imgs}) == 12
    assert len({tuple(im[0, 0]) for im in imgs}) > 3  # several backgrounds

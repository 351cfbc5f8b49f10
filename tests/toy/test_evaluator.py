"""The shipped toy-world evaluator (toyworld.evaluator): labels, relation rules, accuracy, identity heads.

~15 s on 2 CPU threads (a few hundred fresh generator images).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from toyworld import evaluator, world

needs_weights = pytest.mark.skipif(not (evaluator.EVAL_DIR / "model.safetensors").is_file(),
                                   reason="evaluator weights not trained yet")


def test_labels_follow_the_scene():
    for seed in range(300):
        sc = evaluator.eval_scene(seed)
        lab = evaluator.labels(sc)
        assert lab["bg"] == world.COLOR_NAMES.index(sc.background)
        assert {world.CLASSES[k] for k in np.flatnonzero(lab["present"])} == {o.cls for o in sc.objects}
        assert lab["mittens"] == any(o.instance == "mittens" for o in sc.objects)
        for o in sc.objects:
            k = world.CLASSES.index(o.cls)
            if sum(p.cls == o.cls for p in sc.objects) == 1:
                assert np.allclose(lab["box"][k], (o.cx, o.cy, o.s))
            else:  # two objects of one class: colour and box are ambiguous, so not taught
                assert lab["color"][k] == -1 and np.isnan(lab["box"][k]).all()
    # the evaluator's own scenes include both reserved instances and their look-alike negatives
    scenes = [evaluator.eval_scene(s) for s in range(600)]
    assert any(o.instance == "mittens" for sc in scenes for o in sc.objects)
    assert any(o.instance == "eames" for sc in scenes for o in sc.objects)
    assert any(o.cls == "cat" and o.color == "orange" and o.instance is None and (o.collar or o.paws)
               for sc in scenes for o in sc.objects)
    assert any(o.cls == "chair" and o.shell and o.instance is None for sc in scenes for o in sc.objects)


def test_relation_rules_accept_the_worlds_placements_and_reject_swaps():
    assert evaluator.relation_rule_agreement(2000) == 1.0
    swapped = {"left of": "right of", "right of": "left of"}
    n = 0
    for s in range(2000):
        sc = world.sample_scene(np.random.default_rng([s, 7]))
        if sc.relation in swapped:
            a, b = sc.objects
            assert not evaluator.relation_holds(sc.relation, (b.cx, b.cy, b.s), (a.cx, a.cy, a.s))
            n += 1
        if sc.relation == "on":  # the support is never "on" the thing it carries
            a, b = sc.objects
            assert not evaluator.relation_holds("on", (b.cx, b.cy, b.s), (a.cx, a.cy, a.s))
    assert n > 100


def test_prompt_set_is_fixed_and_speaks_the_worlds_words():
    from transformers import CLIPTokenizer

    from toyworld.build import TOY_DIR

    a, b = evaluator.prompt_set(60), evaluator.prompt_set(60)
    assert a == b
    to_ids = world.CaptionIds(CLIPTokenizer.from_pretrained(str(TOY_DIR / "tokenizer")))
    for sp in a:
        to_ids(sp["prompt"])  # every word is one token of the base
        assert all(c != sp["bg"] for _, c in sp["objects"])
    assert sum(sp["relation"] is not None for sp in a) == 30


@needs_weights
def test_shipped_evaluator_reads_fresh_generator_images():
    info = json.loads((evaluator.EVAL_DIR / "info.json").read_text())
    assert (evaluator.EVAL_DIR / "model.safetensors").stat().st_size <= 5 * 2**20
    net = evaluator.load()
    acc = evaluator.accuracy(net, n=400, seed_base=evaluator.TEST_SEED_BASE + 77_000)
    for k in ("background", "texture", "classes", "colour", "pattern", "position", "relation", "mittens", "eames"):
        assert acc[k] >= 0.93, (k, acc[k], info["test_accuracy"])


@needs_weights
def test_identity_heads_tell_the_instances_from_look_alikes():
    net = evaluator.load()
    mittens = [world.render_mittens(s) for s in range(20)]
    eames = [world.render_eames(s) for s in range(20)]
    rng = np.random.default_rng(5)
    look_alikes = []
    for s in range(20):  # the same boxes drawn one detail away: a collar or paws missing, another shell colour
        sc = world._instance_scene(rng, world.mittens(rng), None, None)
        look_alikes.append(world.render(world.with_object(sc, instance=None, **[{"collar": None}, {"paws": None},
                                                                                  {"collar": "red"}][s % 3])))
        sc = world._instance_scene(rng, world.eames(rng), None, None)
        look_alikes.append(world.render(world.with_object(sc, instance=None, color=["blue", "green"][s % 2])))
    r = evaluator.read(net, np.stack(mittens + eames + look_alikes))
    assert (r["mittens"][:20] > 0.5).mean() >= 0.95 and (r["eames"][20:40] > 0.5).mean() >= 0.95
    assert (r["mittens"][40:] > 0.5).mean() <= 0.05 and (r["eames"][40:] > 0.5).mean() <= 0.05

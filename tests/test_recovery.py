"""Spec section 8.5: planted-concept recovery on the toy base (fixed seeds; figures printed with -s).

A teacher concept differs from its superclass initialisation only by a known random direction d in its
value targets. A student trained only on the teacher's images must move its value targets along d well
beyond chance: cos(student - control, d) > 2 / sqrt(sum d_l), where the control student is trained the
same way on an unperturbed teacher's images (what any student learns from rendered images alone cancels).
Its denoising loss on held-out teacher images must fall below the untrained student's.
"""

import json

from tests import recovery


def test_planted_concept_is_recovered(toy_base, toy_cov, tmp_path):
    f = recovery.run(toy_base, toy_cov, tmp_path, seed=0)
    print(json.dumps(f, indent=1))
    assert f["cos_vs_control_delta_vs_d"] > 2 * f["chance_cos"], f
    assert f["loss_trained_student"] < f["loss_untrained_student"], f

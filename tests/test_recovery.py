"""Spec section 8.5: planted-concept recovery on the toy base (fixed seeds; figures printed with -s).

A teacher concept differs from its superclass initialisation only by a known random direction d in its
value targets. A student trained only on the teacher's images must move its value targets along d well
beyond chance: cos(student - control, d) > 2 / sqrt(sum d_l), where the control student is trained the
same way on an unperturbed teacher's images (what any student learns from rendered images alone cancels).
Its denoising loss on held-out teacher images must fall below the untrained student's.
"""

import json

import pytest

from tests import recovery


# Known failure on the shipped base (chunk 8, 2026-12-01): the student closes 83% of the held-out loss gap, but
# cos(student - control, d) is 0.047 against chance 0.038 (1.26x; a planted shift of 16 gives 0.9x). It passed on
# chunks 3-7. With the refined decoder: 51% of the gap, cos 0.040 against 0.038. strict: the day it passes again,
# this marker must go.
@pytest.mark.xfail(strict=True, reason="planted value shift not recovered beyond 2x chance on the chunk-8 toy base")
def test_planted_concept_is_recovered(toy_base, toy_cov, tmp_path):
    f = recovery.run(toy_base, toy_cov, tmp_path, seed=0)
    print(json.dumps(f, indent=1))
    assert f["cos_vs_control_delta_vs_d"] > 2 * f["chance_cos"], f
    assert f["loss_trained_student"] < f["loss_untrained_student"], f

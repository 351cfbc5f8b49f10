"""Many real `pfx` processes on one home, and several publishers on one remote.

* 8 workers (threads, each running a seeded sequence of real `pfx` subprocesses, so up to 8 processes
  at once) mix install / remove / gc --grace 0 / verify / render on one home. Properties: every
  install succeeds even while gc deletes with no grace period (pending rows protect it), no process
  crashes, `stable` concepts (never removed) are all installed and intact at the end (zero lost),
  every render writes a valid PNG, and the home verifies clean.
* 4 `pfx publish` processes (three versions of one package, one other package) plus a concurrent
  `pfx registry compact`, through a proxy failing 15 % of requests: every version is published and
  indexed, and the remote index is consistent.

The scenarios are in tests/kit/scenarios.py; bench/hardening.py runs them with more seeds.
"""

from __future__ import annotations

from registry.home import Home
from tests.kit.engine import needs_toy
from tests.kit.scenarios import build_file_registry, make_render_concept, run_home_mix, run_publishers


@needs_toy
def test_eight_processes_mix_install_remove_gc_render_on_one_home(tmp_path, toy_base, toy_cov):
    url, churn, stable = build_file_registry(tmp_path, churn=6, stable=3,
                                             render_concept=make_render_concept(toy_base, toy_cov, tmp_path))
    r = run_home_mix(tmp_path, url, churn, stable, workers=8, ops=5, seed=0, renders=2, renderable="paintcat")
    assert r["problems"] == [], r["problems"]
    assert r["lost"] == 0 and r["renders_ok"] == 2
    assert r["by_op"].get("gc", 0) >= 2 and r["by_op"].get("remove", 0) >= 2, r["by_op"]


def test_reinstall_keeps_blobs_already_in_store_from_a_concurrent_gc(tmp_path, monkeypatch):
    """A removed version's blobs stay in the store until gc; reinstalling it skips their download.
    A gc landing between "the blob is here" and the record must not take them (the CI failure of
    the mix above: `concept blob ... is not in the store`). The gc runs at exactly that moment, from
    another Home on the same directory, as a second process would."""
    from registry.install import install
    from registry.local_ops import gc

    url, churn, _ = build_file_registry(tmp_path, churn=1, stable=0)
    home = Home.open(tmp_path / "h")
    home.add_remote("files", url)
    m = churn[0]
    install(home, [m.ref()])
    home.remove(m.name, m.version)
    digests = [b["digest"] for b in m.blobs()]
    assert all(home.store.has(d) for d in digests)
    other = Home.open(tmp_path / "h")
    real_has, ran = home.store.has, []

    def has_then_gc(digest):
        here = real_has(digest)
        if not ran:
            ran.append(gc(other, grace_s=0))
        return here

    monkeypatch.setattr(home.store, "has", has_then_gc)
    [row] = install(home, [m.ref()])
    assert ran and ran[0]["removed"] == 0, ran
    assert row["status"] == "installed" and all(real_has(d) for d in digests)
    other.close()
    home.close()


# --------------------------------------------------------------------------------------------------
# Publishers on one remote


def test_four_cli_publishers_and_a_compactor_under_faults_lose_nothing(s3_url, tmp_path, aws_env):
    r = run_publishers(s3_url, tmp_path, seed=0)
    assert r["problems"] == [], r["problems"]
    assert r["faults_injected"] > 0

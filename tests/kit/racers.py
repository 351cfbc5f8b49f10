"""Publishers and index editors in separate processes, released together by a barrier, for race tests
on real servers (tests/registry/test_s3_races.py).

Processes are started once (multiprocessing "spawn": a clean interpreter, as a second `pfx` would be)
and run every round, so ten races cost ten barrier waits rather than twenty interpreter starts. Each
process has its own home. What a worker reports per operation: ok or the error class, the manifest it
published, when it passed the barrier and when its claim PUT went out, and how many compare-and-swap
writes it lost (CasFailed) on the way.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any


def _count_cas_losses(stats: dict, claim_barrier: Any) -> None:
    """Wrap S3Remote.put_doc in this process to count lost swaps, and hold each claim PUT at a second
    barrier (so the racers' claims go out within a millisecond or so of each other) and note when."""
    from registry.remotes import s3
    from registry.remotes.base import CasFailed

    put_doc, put_if_absent = s3.S3Remote.put_doc, s3.S3Remote.put_if_absent

    def counting_put_doc(self, key, data, *, etag):
        try:
            return put_doc(self, key, data, etag=etag)
        except CasFailed:
            stats["cas_lost"] += 1
            raise

    def timed_put_if_absent(self, key, data):
        if key.startswith("claims/"):
            claim_barrier.wait(timeout=60)
            stats["claim_at"] = time.time()
        return put_if_absent(self, key, data)

    s3.S3Remote.put_doc = counting_put_doc
    s3.S3Remote.put_if_absent = timed_put_if_absent


def _worker(idx: int, home_dir: str, url: str, endpoint: str, env: dict, plan: list[tuple], barrier: Any,
            claim_barrier: Any, out: Any, remote_opts: dict) -> None:
    os.environ.update(env)
    from registry.errors import PfxError
    from registry.home import Home
    from registry.publish import publish, tag, yank
    from tests.kit.concepts import add_concept

    stats = {"cas_lost": 0, "claim_at": None}
    _count_cas_losses(stats, claim_barrier)
    home = Home.open(home_dir, offline=False)
    home.add_remote("r", url, endpoint_url=endpoint, **remote_opts)
    for step, (op, *args) in enumerate(plan):
        if op == "publish":
            name, version, seed = args
            add_concept(home, home_dir, name, version, seed=seed)  # local work before the barrier
        stats.update(cas_lost=0, claim_at=None)
        barrier.wait(timeout=120)
        t0 = time.time()
        rec: dict = {"worker": idx, "step": step, "op": op, "args": list(args), "released": t0}
        try:
            if op == "publish":
                rec["manifest"] = publish(home, f"{args[0]}@{args[1]}", to="r", sign=False)["manifest"]
            elif op == "tag":
                tag(home, args[0], args[1], remote_name="r")
            elif op == "yank":
                yank(home, args[0], remote_name="r")
            rec["ok"] = True
        except PfxError as e:
            rec.update(ok=False, error=type(e).__name__, message=str(e).splitlines()[0])
        rec.update(seconds=time.time() - t0, cas_lost=stats["cas_lost"], claim_at=stats["claim_at"])
        out.put(rec)
    home.close()


def run_rounds(tmp: os.PathLike, url: str, endpoint: str, plans: list[list[tuple]], env: dict,
               timeout: float = 300, **remote_opts: Any) -> list[dict]:
    """Run one process per plan; step i of every plan starts at the same barrier. Returns all records
    (sorted by step, then worker). A worker that dies or hangs fails the call with what it printed.
    Publish steps must come in lockstep (every plan publishing at that step): each claim PUT waits
    for the other racers' at a second barrier. `remote_opts` go to each home's `add_remote` (e.g.
    single_writer=True, to measure what a store without conditional writes does under a race)."""
    ctx = mp.get_context("spawn")
    barrier, claim_barrier = ctx.Barrier(len(plans)), ctx.Barrier(len(plans))
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(i, str(os.path.join(tmp, f"racer{i}")), url, str(endpoint), env, plan,
                                                barrier, claim_barrier, out, remote_opts), daemon=True)
             for i, plan in enumerate(plans)]
    for p in procs:
        p.start()
    want = sum(len(p) for p in plans)
    recs: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while len(recs) < want:
            try:
                recs.append(out.get(timeout=1))
            except Exception:  # noqa: BLE001 - queue.Empty: check that everyone is still alive
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise AssertionError(f"racers failed: exit codes {[p.exitcode for p in procs]}, "
                                         f"{len(recs)}/{want} results") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return sorted(recs, key=lambda r: (r["step"], r["worker"]))

"""Crash consistency and resource exhaustion, with real `pfx` subprocesses.

kill -9 at seeded random points of `pfx install`, `pfx publish`, `pfx gc` and `pfx train`: afterwards
the home verifies clean (every file in the store hashes to its name; the index is intact; every
installed version has its blobs), the remote index is consistent, leftover temp files are removed by
`gc` once stale, and a rerun completes (training resumes from its checkpoint).

Disk full (RLIMIT_FSIZE, SIGXFSZ ignored so writes fail with EFBIG) and unwritable homes (a home whose
parent is a file; a store whose tmp/ or blob shard is a file: the tests run as root, so chmod would not
stop a write) give a clear error and a non-zero exit, and leave nothing corrupt.

The `run_*` scenarios (tests/kit/scenarios.py) take a seed list; bench/hardening.py runs them with many
more seeds.
"""

from __future__ import annotations

import json

import pytest

from tests.kit.checks import home_problems
from tests.kit.concepts import file_registry_with_cat
from tests.kit.engine import needs_toy
from tests.kit.runner import clean_error, fsize_limit, pfx
from tests.kit.scenarios import (
    make_registry,
    run_gc_kills,
    run_install_kills,
    run_publish_kills,
    run_train_kill,
)

pytestmark = pytest.mark.usefixtures("aws_env")


# --------------------------------------------------------------------------------------------------
# kill -9 during install / publish / gc (kill points: tests/kit/scenarios.py)


def test_kill9_install_at_random_points(s3_url, tmp_path):
    r = run_install_kills(s3_url, tmp_path, seeds=range(3))
    assert r["problems"] == []
    assert r["killed"] >= 2, r  # most seeds really interrupted the install


def test_kill9_publish_at_random_points(s3_url, tmp_path):
    r = run_publish_kills(s3_url, tmp_path, seeds=range(3))
    assert r["problems"] == []
    assert r["killed"] >= 2, r


def test_kill9_gc_at_random_points(tmp_path):
    r = run_gc_kills(tmp_path, seeds=range(2))
    assert r["problems"] == []
    assert r["killed"] >= 1, r


# --------------------------------------------------------------------------------------------------
# kill -9 during training, then --resume


@needs_toy
def test_kill9_training_after_first_checkpoint_then_resume(tmp_path):
    r = run_train_kill(tmp_path, seed=3)
    assert r["problems"] == []
    assert r["checkpoint_step"] in (50, 100)


# --------------------------------------------------------------------------------------------------
# Disk full and unwritable homes


def test_disk_full_during_install_is_a_clear_error_and_nothing_is_corrupt(s3_url, tmp_path):
    url, ms = make_registry(s3_url, tmp_path, 2, tag="df")
    home = tmp_path / "h"
    pfx(home, "remote", "add", "s3", url, "--endpoint-url", s3_url, check=True)
    pfx(home, "list", check=True)  # the index exists; the concepts (60 KB each) will not fit
    p = pfx(home, "install", *[m.ref() for m in ms], preexec_fn=fsize_limit(32 << 10))
    assert clean_error(p), (p.returncode, p.stderr)
    assert "too large" in p.stderr.lower() or "no space" in p.stderr.lower() or "full" in p.stderr.lower(), p.stderr
    assert home_problems(home) == []
    assert json.loads(pfx(home, "list", "--json").stdout) == []
    assert list((home / "tmp").iterdir()) == []  # the failed writes removed their temp files
    pfx(home, "install", *[m.ref() for m in ms], check=True)
    assert home_problems(home) == []





def test_file_too_large_during_install_is_a_local_error_exit_1(tmp_path):
    url, _, _ = file_registry_with_cat(tmp_path, big=True)  # the concept is ~60 KB
    home = tmp_path / "h"
    pfx(home, "remote", "add", "r", url, check=True)
    p = pfx(home, "install", "cat@1.0.0", preexec_fn=fsize_limit(32 << 10))
    assert p.returncode == 1 and clean_error(p), (p.returncode, p.stderr)
    assert "File too large" in p.stderr and str(home / "tmp") in p.stderr, p.stderr
    assert "retry later" not in p.stderr and "try another remote" not in p.stderr, p.stderr
    assert list((home / "tmp").iterdir()) == []
    assert home_problems(home) == []
    assert json.loads(pfx(home, "list", "--json").stdout) == []
    pfx(home, "install", "cat@1.0.0", check=True)


def test_disk_full_for_the_index_is_a_clear_error(s3_url, tmp_path):
    url, ms = make_registry(s3_url, tmp_path, 1, tag="dq")
    home = tmp_path / "h"
    pfx(home, "remote", "add", "s3", url, "--endpoint-url", s3_url, check=True)
    size = (home / "pfx.sqlite").stat().st_size
    # Blobs fit (the concept is ~60 KB), the SQLite files may not grow past their current size.
    p = pfx(home, "install", ms[0].ref(), preexec_fn=fsize_limit(max(size, 64 << 10)))
    assert p.returncode == 0 or clean_error(p), (p.returncode, p.stderr)
    assert home_problems(home) == []
    pfx(home, "install", ms[0].ref(), check=True)
    assert home_problems(home) == []


def test_home_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    p = pfx(tmp_path / "afile" / "home", "list")
    assert clean_error(p), (p.returncode, p.stderr)
    assert "afile" in p.stderr


@pytest.mark.parametrize("what", ["tmp", "shard"])
def test_unwritable_store_is_a_clear_error_and_nothing_is_corrupt(s3_url, tmp_path, what):
    url, ms = make_registry(s3_url, tmp_path, 1, tag=f"ro{what}")
    home = tmp_path / "h"
    pfx(home, "remote", "add", "s3", url, "--endpoint-url", s3_url, check=True)
    if what == "tmp":  # the temp folder replaced by a file: no write can even start
        (home / "tmp").rmdir()
        blocker = home / "tmp"
    else:  # the blob shard the concept goes to is a file: the final rename cannot happen
        hexd = ms[0].concept["digest"][7:]
        blocker = home / "blobs" / "sha256" / hexd[:2]
    blocker.write_text("not a folder")
    p = pfx(home, "install", ms[0].ref())
    assert clean_error(p), (p.returncode, p.stderr)
    assert str(blocker) in p.stderr  # the message names the path in the way
    assert "Traceback" not in pfx(home, "verify").stderr
    blocker.unlink()
    assert json.loads(pfx(home, "list", "--json").stdout) == []
    assert home_problems(home) == []
    pfx(home, "install", ms[0].ref(), check=True)
    assert home_problems(home) == []


@needs_toy
def test_disk_full_and_unwritable_output_during_training_are_clear_errors(tmp_path):
    from tests.kit.engine import photo_folder

    home = tmp_path / "h"
    photos = photo_folder(tmp_path / "photos", n=2)
    args = ["train", str(photos), "--name", "fullcat", "--superclass", "cat", "--batch-size", "1", "--previews", "0"]
    # Files capped at 16 KB: the first write past that (index, covariance or concept) fails with EFBIG.
    p = pfx(home, *args, "--steps", "2", timeout=300, preexec_fn=fsize_limit(16 << 10))
    assert clean_error(p), (p.returncode, p.stderr[-2000:])
    assert any(w in p.stderr.lower() for w in ("disk", "too large", "full")), p.stderr
    assert home_problems(home) == []
    # The checkpoint cannot be written (its path is taken by a folder): training stops at step 50 with
    # a clear error, records nothing, and leaves the home clean.
    (home / "work" / "fullcat-0.1.0.ckpt").mkdir(parents=True)
    p = pfx(home, *args, "--steps", "60", timeout=300)
    assert clean_error(p), (p.returncode, p.stderr[-2000:])
    assert "fullcat-0.1.0.ckpt" in p.stderr
    assert home_problems(home) == []
    assert json.loads(pfx(home, "list", "--json").stdout) == []

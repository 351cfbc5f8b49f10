"""Semver ordering, ranges, and the selection rules (yanked, tags, prereleases)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.errors import NotFound, UsageError
from registry.names import Ref, parse_ref
from registry.versions import Version, next_minor, parse_range, parse_version, select_version

# The precedence example from semver.org section 11, in ascending order.
SEMVER_ORDER = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2",
                "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.1.0", "2.0.0", "10.0.0"]


def test_semver_precedence():
    parsed = [parse_version(s) for s in SEMVER_ORDER]
    shuffled = parsed[1::2] + parsed[::2]
    assert sorted(shuffled) == parsed
    assert all(a < b for a, b in itertools.pairwise(parsed))


def test_build_metadata_ignored_for_precedence():
    assert parse_version("1.0.0+a") == parse_version("1.0.0+b") == parse_version("1.0.0")
    assert str(parse_version("1.0.0-rc.1+build.5")) == "1.0.0-rc.1+build.5"


@pytest.mark.parametrize("bad", ["", "1", "1.2", "01.2.3", "1.02.3", "1.2.3-", "1.2.3-01", "1.2.3+", "v1.2.3",
                                 "1.2.3.4", " 1.2.3", "1.2.3\n", "1.2.3-a..b", "١.٢.٣"])
def test_bad_versions(bad):
    with pytest.raises(UsageError):
        parse_version(bad)


versions = st.builds(
    lambda a, b, c, pre: f"{a}.{b}.{c}" + (f"-{pre}" if pre else ""),
    st.integers(0, 20), st.integers(0, 20), st.integers(0, 20),
    st.one_of(st.none(), st.from_regex(r"(alpha|beta|rc|[0-9])(\.(0|[1-9][0-9]?|x))?", fullmatch=True)),
)


@given(st.lists(versions, min_size=1, max_size=8))
@settings(max_examples=200, deadline=None)
def test_order_is_total_and_roundtrips(vs):
    parsed = [parse_version(v) for v in vs]
    s = sorted(parsed)
    assert all(not (b < a) for a, b in itertools.pairwise(s))
    assert all(str(parse_version(str(p))) == str(p) for p in parsed)


@pytest.mark.parametrize("rng,yes,no", [
    ("^1.2", ["1.2.0", "1.9.9", "1.2.1"], ["1.1.9", "2.0.0", "2.0.0-rc.1", "1.3.0-beta"]),
    ("^1.2.3", ["1.2.3", "1.4.0"], ["1.2.2", "2.0.0"]),
    ("^0.2.3", ["0.2.3", "0.2.9"], ["0.3.0", "0.2.2"]),
    ("^0.0.3", ["0.0.3"], ["0.0.4", "0.0.2"]),
    ("^1.0.0-rc.1", ["1.0.0-rc.1", "1.0.0-rc.2", "1.0.0", "1.5.0"], ["1.1.0-rc.1", "0.9.0"]),
    ("~1.2", ["1.2.0", "1.2.9"], ["1.3.0", "1.1.0"]),
    ("~1.2.3", ["1.2.3", "1.2.10"], ["1.3.0", "1.2.2"]),
    ("~1", ["1.0.0", "1.9.0"], ["2.0.0"]),
    ("1.2", ["1.2.0", "1.2.7"], ["1.3.0"]),
    ("1.x", ["1.0.0", "1.9.9"], ["2.0.0", "0.9.0"]),
    ("*", ["0.0.1", "9.9.9"], ["1.0.0-rc.1"]),
    (">=1.0,<2.0", ["1.0.0", "1.9.9"], ["0.9.9", "2.0.0"]),
    (">=1.0 <2", ["1.5.0"], ["2.0.0"]),
    (">1.2", ["1.3.0"], ["1.2.5", "1.2.0"]),
    ("<=1.2", ["1.2.9", "1.0.0"], ["1.3.0"]),
    ("1.0.0 || ^3", ["1.0.0", "3.1.0"], ["2.0.0", "1.0.1"]),
    ("=1.2.3", ["1.2.3"], ["1.2.4"]),
])
def test_ranges(rng, yes, no):
    r = parse_range(rng)
    for v in yes:
        assert r.matches(parse_version(v)), (rng, v)
    for v in no:
        assert not r.matches(parse_version(v)), (rng, v)


@pytest.mark.parametrize("bad", ["^", "~x.y", ">=", "1.2.3.4", "||", "^a", ">=1.0,,<"])
def test_bad_ranges(bad):
    with pytest.raises(UsageError):
        parse_range(bad)


def D(n):
    return "sha256:" + f"{n:064x}"


VERSIONS = [
    {"version": "0.9.0", "manifest": D(1), "yanked": False},
    {"version": "1.0.0", "manifest": D(2), "yanked": False},
    {"version": "1.1.0", "manifest": D(3), "yanked": False},
    {"version": "1.2.0", "manifest": D(4), "yanked": True},
    {"version": "2.0.0-rc.1", "manifest": D(5), "yanked": False},
]


def pick(text, tags=None, versions=VERSIONS):
    return select_version(versions, tags or {}, parse_ref(text))["version"]


def test_default_is_highest_release_not_yanked_not_prerelease():
    assert pick("cat") == "1.1.0"


def test_default_follows_latest_tag_unless_yanked():
    assert pick("cat", {"latest": "1.0.0"}) == "1.0.0"
    assert pick("cat", {"latest": "1.2.0"}) == "1.1.0"  # tag names a yanked version: fall back


def test_range_never_picks_yanked_or_prerelease():
    assert pick("cat@^1") == "1.1.0"
    with pytest.raises(NotFound) as e:
        pick("cat@~1.2")
    assert "1.2.0 (yanked)" in str(e.value) and "yanked versions are only chosen" in str(e.value)


def test_exact_and_digest_pins_may_pick_yanked():
    assert pick("cat@1.2.0") == "1.2.0"
    assert pick(f"cat@{D(4)}") == "1.2.0"
    assert pick("cat@2.0.0-rc.1") == "2.0.0-rc.1"


def test_tags():
    assert pick("cat@beta", {"beta": "2.0.0-rc.1"}) == "2.0.0-rc.1"
    assert pick("cat@stable", {"stable": D(2)}) == "1.0.0"  # a tag may hold a manifest digest
    with pytest.raises(NotFound, match="yanked"):
        pick("cat@bad", {"bad": "1.2.0"})
    with pytest.raises(NotFound, match="no tag 'nope'"):
        pick("cat@nope", {"beta": "2.0.0-rc.1"})


def test_not_found_lists_available():
    with pytest.raises(NotFound) as e:
        pick("cat@3.0.0")
    assert "1.1.0" in str(e.value) and "0.9.0" in str(e.value)
    with pytest.raises(NotFound, match="no versions"):
        pick("cat", versions=[])
    with pytest.raises(NotFound):
        pick(f"cat@{D(99)}")


def test_only_prereleases_or_all_yanked():
    pre = [{"version": "1.0.0-rc.1", "manifest": D(1), "yanked": False}]
    assert pick("cat", versions=pre) == "1.0.0-rc.1"
    yanked = [{"version": "1.0.0", "manifest": D(1), "yanked": True}]
    with pytest.raises(NotFound):
        pick("cat", versions=yanked)
    assert pick("cat@1.0.0", versions=yanked) == "1.0.0"


def test_malformed_entries_are_never_chosen():
    vs = VERSIONS + [{"version": "99.0.0.bad", "manifest": D(9), "yanked": False}]
    assert pick("cat", versions=vs) == "1.1.0"


def test_next_minor():
    assert next_minor([]) == "0.1.0"
    assert next_minor(["0.1.0"]) == "0.2.0"
    assert next_minor(["1.9.3", "1.10.0", "0.3.0"]) == "1.11.0"
    assert next_minor(["2.0.0-rc.1", "1.4.0"]) == "2.1.0"
    assert next_minor(["junk"]) == "0.1.0"


def test_version_is_hashable_and_ref_kind():
    assert len({parse_version("1.0.0"), parse_version("1.0.0+x")}) == 1
    assert isinstance(parse_version("1.0.0"), Version)
    assert Ref("a", "default").selector is None

"""Semantic versions (semver 2.0.0), ranges, and the rule that picks a version for a reference.

Selection mirrors PEP 592 / npm: a yanked version stays installable by an exact version or a digest
pin (so lockfiles keep working), but a range, a tag or the default never selects it.
Ranges exclude prereleases unless the range itself names a prerelease of the same major.minor.patch
(npm's rule), so `^1.2` never jumps to `2.0.0-rc.1` nor to `1.3.0-beta`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

from registry.errors import NotFound, UsageError

_SEMVER = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?",
    re.ASCII,
)
_PARTIAL = re.compile(r"(0|[1-9]\d*)(?:\.(0|[1-9]\d*|[xX*]))?(?:\.(0|[1-9]\d*|[xX*]))?", re.ASCII)
MAX_VERSION_LEN = 128


@functools.total_ordering
@dataclass(frozen=True, eq=False)
class Version:
    """A semver 2.0.0 version. Equality and order follow semver precedence (build metadata ignored)."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    build: tuple[str, ...] = ()

    @property
    def is_prerelease(self) -> bool:
        return bool(self.prerelease)

    def _key(self):
        # A release sorts after all of its prereleases; numeric identifiers sort before alphanumeric ones.
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and self._key() == other._key()

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        s = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            s += "-" + ".".join(self.prerelease)
        if self.build:
            s += "+" + ".".join(self.build)
        return s

    @property
    def release(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)


def parse_version(s: str) -> Version:
    """Parse a full semver version ('1.2.0', '1.0.0-rc.1', '1.0.0+build.5'); UsageError if it is not one."""
    if not isinstance(s, str) or len(s) > MAX_VERSION_LEN:
        raise UsageError(f"invalid version {s!r}")
    m = _SEMVER.fullmatch(s)
    if not m:
        raise UsageError(f"invalid version {s!r}", hint="versions are semver: MAJOR.MINOR.PATCH, e.g. 1.2.0 or 1.0.0-rc.1")
    pre = tuple(m.group(4).split(".")) if m.group(4) else ()
    build = tuple(m.group(5).split(".")) if m.group(5) else ()
    return Version(int(m.group(1)), int(m.group(2)), int(m.group(3)), pre, build)


def is_version(s: str) -> bool:
    try:
        parse_version(s)
        return True
    except UsageError:
        return False


# --------------------------------------------------------------------------------------------------
# Ranges: a list of comparator sets ('||'); each set is comparators joined by ',' or spaces.


@dataclass(frozen=True)
class _Comparator:
    op: str  # one of >= > <= < =
    version: Version

    def test(self, v: Version) -> bool:
        c = self.version
        return {
            ">=": v >= c, ">": v > c, "<=": v <= c, "<": v < c, "=": v == c,
        }[self.op]


@dataclass(frozen=True)
class Range:
    """A parsed range. `matches` applies npm's prerelease rule."""

    text: str
    sets: tuple[tuple[_Comparator, ...], ...]

    def matches(self, v: Version) -> bool:
        for comps in self.sets:
            if not all(c.test(v) for c in comps):
                continue
            if not v.prerelease:
                return True
            # A prerelease matches only if some comparator names a prerelease of the same release.
            if any(c.version.prerelease and c.version.release == v.release for c in comps):
                return True
        return False


def _partial(text: str, whole: str) -> tuple[int, int | None, int | None, tuple[str, ...]]:
    """'1' -> (1, None, None), '1.2' -> (1, 2, None), '1.2.3-rc.1' -> (1, 2, 3, ('rc','1')); x/* wildcards."""
    if is_version(text):
        v = parse_version(text)
        return v.major, v.minor, v.patch, v.prerelease
    m = _PARTIAL.fullmatch(text)
    if not m:
        raise UsageError(f"invalid version range {whole!r}: cannot read {text!r}",
                         hint="ranges look like ^1.2, ~1.2.3, 1.x, >=1.0,<2.0 or *")
    parts = [m.group(1), m.group(2), m.group(3)]
    nums: list[int | None] = []
    for p in parts:
        if p is None or p in "xX*":
            nums.extend([None] * (3 - len(nums)))
            break
        nums.append(int(p))
    return nums[0], nums[1], nums[2], ()  # type: ignore[return-value]


def _v(major: int, minor: int | None = 0, patch: int | None = 0, pre: tuple[str, ...] = ()) -> Version:
    return Version(major, minor or 0, patch or 0, pre)


def _upper(v: tuple[int, int | None, int | None]) -> Version:
    """Exclusive upper bound written as X.Y.Z-0 so that prereleases of the bound are excluded too."""
    return Version(v[0], v[1] or 0, v[2] or 0, ("0",))


def _expand(token: str, whole: str) -> list[_Comparator]:
    if token in ("*", "x", "X"):
        return [_Comparator(">=", Version(0, 0, 0))]
    if token[0] == "^":
        ma, mi, pa, pre = _partial(token[1:], whole)
        lo = _v(ma, mi, pa, pre)
        if ma > 0 or mi is None:
            hi = (ma + 1, 0, 0)
        elif mi > 0 or pa is None:
            hi = (0, mi + 1, 0)
        else:
            hi = (0, 0, pa + 1)
        return [_Comparator(">=", lo), _Comparator("<", _upper(hi))]
    if token[0] == "~":
        ma, mi, pa, pre = _partial(token[1:], whole)
        lo = _v(ma, mi, pa, pre)
        hi = (ma + 1, 0, 0) if mi is None else (ma, mi + 1, 0)
        return [_Comparator(">=", lo), _Comparator("<", _upper(hi))]
    for op in (">=", "<=", ">", "<", "="):
        if token.startswith(op):
            ma, mi, pa, pre = _partial(token[len(op):], whole)
            if op == "=" or mi is not None and pa is not None:
                if op == "=" and (mi is None or pa is None):
                    break
                return [_Comparator(op, _v(ma, mi, pa, pre))]
            # Partial bounds: '<1.2' means '<1.2.0-0', '>1.2' means '>=1.3.0-0', '>=1.2' means '>=1.2.0'.
            nxt = (ma + 1, 0, 0) if mi is None else (ma, mi + 1, 0)
            if op == ">=":
                return [_Comparator(">=", _v(ma, mi, pa))]
            if op == ">":
                return [_Comparator(">=", _upper(nxt))]
            if op == "<":
                return [_Comparator("<", _upper((ma, mi, pa)))]
            return [_Comparator("<", _upper(nxt))]  # <=
    ma, mi, pa, pre = _partial(token.lstrip("="), whole)
    if mi is not None and pa is not None:
        return [_Comparator("=", _v(ma, mi, pa, pre))]
    hi = (ma + 1, 0, 0) if mi is None else (ma, mi + 1, 0)
    return [_Comparator(">=", _v(ma, mi, 0)), _Comparator("<", _upper(hi))]


@functools.lru_cache(maxsize=256)
def parse_range(text: str) -> Range:
    """Parse a version range: ^1.2, ~1.2.3, 1.x, 1.2, >=1.0,<2.0 (',' or space = and), a || b, *."""
    if not isinstance(text, str) or not text.strip() or len(text) > 256:
        raise UsageError(f"invalid version range {text!r}")
    sets = []
    for alt in text.split("||"):
        tokens = [t for t in re.split(r"[\s,]+", alt.strip()) if t]
        if not tokens:
            raise UsageError(f"invalid version range {text!r}: empty alternative")
        comps: list[_Comparator] = []
        for t in tokens:
            comps.extend(_expand(t, text))
        sets.append(tuple(comps))
    return Range(text, tuple(sets))


# --------------------------------------------------------------------------------------------------
# Selection


def _sorted(versions: list[dict]) -> list[tuple[Version, dict]]:
    out = []
    for v in versions:
        try:
            out.append((parse_version(v["version"]), v))
        except UsageError:
            continue  # a malformed entry in an index is skipped, never chosen
    out.sort(key=lambda pv: pv[0])
    return out


def _available(parsed: list[tuple[Version, dict]]) -> str:
    if not parsed:
        return "no versions are available"
    shown = [str(v) + (" (yanked)" if d.get("yanked") else "") for v, d in parsed[-12:]]
    more = f" and {len(parsed) - 12} older" if len(parsed) > 12 else ""
    return "available: " + ", ".join(shown) + more


def _highest(parsed: list[tuple[Version, dict]], ok: Callable[[Version, dict], bool]) -> dict | None:
    for v, d in reversed(parsed):
        if ok(v, d):
            return d
    return None


def select_version(versions: list[dict], tags: dict[str, str] | None, ref) -> dict:
    """Choose the entry of `versions` that `ref` (a names.Ref) means, or raise NotFound listing what exists.

    - default: the version tagged 'latest' if that tag exists and is not yanked, else the highest
      non-yanked release, else (only prereleases exist) the highest non-yanked prerelease;
    - version / digest: that exact entry, yanked or not;
    - range / tag: never a yanked entry (a tag pointing at a yanked version is NotFound).
    Tag values may be version strings or manifest digests.
    """
    tags = tags or {}
    parsed = _sorted(versions)
    kind, sel = ref.kind, ref.selector
    live = lambda v, d: not d.get("yanked")
    chosen: dict | None = None
    if kind == "digest":
        chosen = next((d for _, d in parsed if d.get("manifest") == sel), None)
    elif kind == "version":
        want = parse_version(sel)
        exact = [d for v, d in parsed if v == want]
        chosen = next((d for d in exact if d["version"] == sel), exact[0] if exact else None)
    elif kind == "range":
        rng = parse_range(sel)
        chosen = _highest(parsed, lambda v, d: live(v, d) and rng.matches(v))
    elif kind in ("tag", "default"):
        name = sel if kind == "tag" else "latest"
        target = tags.get(name)
        if target is not None:
            key = "manifest" if str(target).startswith("sha256:") else "version"
            hit = next((d for _, d in parsed if d.get(key) == target), None)
            if hit is not None and not hit.get("yanked"):
                chosen = hit
            elif kind == "tag":
                why = "is yanked" if hit is not None else "names a version that does not exist"
                raise NotFound(f"{ref}: tag {name!r} points at {target} which {why}; {_available(parsed)}")
        elif kind == "tag":
            known = ", ".join(sorted(tags)) or "none"
            raise NotFound(f"{ref}: no tag {name!r} (tags: {known}); {_available(parsed)}")
        if chosen is None:
            chosen = _highest(parsed, lambda v, d: live(v, d) and not v.is_prerelease) or _highest(parsed, live)
    else:
        raise UsageError(f"unknown reference kind {kind!r}")
    if chosen is None:
        extra = " (yanked versions are only chosen by an exact version or digest)" if kind in ("range", "default") and any(
            d.get("yanked") for _, d in parsed) else ""
        raise NotFound(f"{ref}: no matching version{extra}; {_available(parsed)}")
    return chosen


def next_minor(existing: list[str]) -> str:
    """The version `pfx train` gives a name: 0.1.0 if it has none, else the next minor of the highest."""
    parsed = []
    for s in existing:
        try:
            parsed.append(parse_version(s))
        except UsageError:
            continue
    if not parsed:
        return "0.1.0"
    top = max(parsed)
    return f"{top.major}.{top.minor + 1}.0"


def sort_versions(items: list[dict], key: str = "version") -> list[dict]:
    """Sort dicts by semver precedence of item[key] (unparseable ones first, by text)."""
    def k(d):
        try:
            return (1, parse_version(d[key]), "")
        except UsageError:
            return (0, Version(0, 0, 0), str(d.get(key)))
    return sorted(items, key=k)

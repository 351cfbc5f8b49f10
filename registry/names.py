"""Concept names and references.

A name is checked once, on input, against a whitelist that is safe as a file or object name on POSIX
and Windows alike. Even so, no file path is ever built from a name: the store addresses bytes by
digest only. The whitelist exists so that names stay unambiguous on every platform and in URLs and
S3 keys (the remote layout may use names in keys), and so that look-alike names cannot impersonate
each other.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from registry.errors import InvalidName, UsageError
from registry.versions import parse_range, parse_version

MAX_PART = 64
_PART = re.compile(r"[a-z0-9]+(?:[-_.][a-z0-9]+)*", re.ASCII)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)
_TAG = re.compile(r"[a-z][a-z0-9]*(?:[-_.][a-z0-9]+)*", re.ASCII)
# Windows device names are reserved with any extension ("con.txt" is the console too).
_WINDOWS_RESERVED = frozenset(
    ["con", "prn", "aux", "nul", "conin$", "conout$"]
    + [f"com{i}" for i in range(10)]
    + [f"lpt{i}" for i in range(10)]
)

REF_KINDS = ("default", "version", "range", "tag", "digest")


def _short(text: str, limit: int = 60) -> str:
    """repr() of user input, cut so a hostile 10 KB argument cannot flood an error message."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def odd_character(text: str) -> str | None:
    """Describe the first non-ASCII or control character, so a look-alike ('cаt' with a Cyrillic
    'а', fullwidth 'ｃａｔ', a NUL) is named in the error rather than just called invalid."""
    for i, ch in enumerate(text):
        if not ch.isascii() or not ch.isprintable():
            name = unicodedata.name(ch, "control character" if not ch.isprintable() else "unnamed character")
            return f"U+{ord(ch):04X} {name} at position {i}"
    return None


def _check_part(part: str, whole: str) -> None:
    if not part:
        raise InvalidName(f"invalid name {whole!r}: empty part", hint="names look like 'cat-mittens' or 'team/cat-mittens'")
    if len(part) > MAX_PART:
        raise InvalidName(f"invalid name {whole!r}: part {part[:16]!r}... is {len(part)} characters (max {MAX_PART})")
    if not _PART.fullmatch(part):
        hint = "use lowercase ASCII letters and digits with single '-', '_' or '.' between them"
        if part.isascii() and _PART.fullmatch(part.lower()):
            hint = f"names are lowercase: try {part.lower()!r}"
        odd = odd_character(part)
        if odd:
            why = f"contains {odd}, only ASCII is allowed"
        elif part.strip(".") == "":
            why = "is a path traversal"
        elif part[-1] in "-_.":
            why = f"ends with {part[-1]!r} (a trailing dot is dropped by Windows)"
        elif part[0] in "-_.":
            why = f"starts with {part[0]!r}"
        elif re.search(r"[-_.]{2}", part):
            why = "has two separators in a row (no '..')"
        else:
            why = "is not allowed"
        raise InvalidName(f"invalid name {_short(whole)}: {_short(part)} {why}", hint=hint)
    if part.split(".", 1)[0] in _WINDOWS_RESERVED:
        raise InvalidName(f"invalid name {whole!r}: {part!r} is a reserved device name on Windows")


def validate_name(name: str) -> str:
    """Return `name` unchanged if it is a valid concept name, else raise InvalidName saying why.

    Grammar: `part` or `namespace/part`; a part is 1-64 characters of [a-z0-9] with single '-', '_'
    or '.' between alphanumerics (so no '..', no leading/trailing dot or dash, no empty part).
    """
    if not isinstance(name, str):
        raise InvalidName(f"invalid name {name!r}: not a string")
    if not name:
        raise InvalidName("invalid name: empty", hint="names look like 'cat-mittens' or 'team/cat-mittens'")
    if len(name) > 2 * MAX_PART + 1:
        raise InvalidName(f"invalid name {name[:20]!r}...: {len(name)} characters is too long")
    parts = name.split("/")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise InvalidName(f"invalid name {_short(name)}: an absolute path is not a name")
    if any(p in (".", "..") for p in re.split(r"[/\\]", name)):
        raise InvalidName(f"invalid name {_short(name)}: path traversal ('..') is not a name")
    if len(parts) > 2:
        raise InvalidName(f"invalid name {name!r}: at most one '/' (namespace/name)")
    for part in parts:
        _check_part(part, name)
    return name


def is_digest(text: str) -> bool:
    """True for 'sha256:' followed by 64 lowercase hex digits (the only digest form in pfx)."""
    return isinstance(text, str) and _DIGEST.fullmatch(text) is not None


def validate_tag(tag: str) -> str:
    """Tags are movable names such as 'latest'; they start with a letter so they never parse as semver."""
    if not isinstance(tag, str) or len(tag) > MAX_PART or not _TAG.fullmatch(tag):
        raise UsageError(f"invalid tag {_short(str(tag))}", hint="tags are lowercase words starting with a letter, e.g. 'latest'")
    return tag


@dataclass(frozen=True)
class Ref:
    """A parsed reference. `selector` is None for 'default', else the text after '@'."""

    name: str
    kind: str
    selector: str | None = None

    def __str__(self) -> str:
        return self.name if self.selector is None else f"{self.name}@{self.selector}"


def parse_ref(text: str) -> Ref:
    """Parse `name`, `name@1.2.0`, `name@^1.2` / `@~1.2` / `@>=1.0,<2` (ranges), `name@latest` (a tag)
    or `name@sha256:<64 hex>` (a pin). Raises InvalidName / UsageError with the reason."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError("empty reference", hint="references look like 'cat-mittens', 'cat-mittens@1.2.0' or 'cat-mittens@^1'")
    text = text.strip()
    name, at, sel = text.partition("@")
    validate_name(name)
    if not at:
        return Ref(name, "default", None)
    if not sel:
        raise UsageError(f"invalid reference {text!r}: nothing after '@'")
    odd = odd_character(sel)
    if odd:
        raise UsageError(f"invalid reference {_short(text)}: the part after '@' contains {odd}, only ASCII is allowed")
    if len(sel) > 2 * MAX_PART + 64:
        raise UsageError(f"invalid reference {_short(text)}: the part after '@' is too long")
    if sel.startswith("sha256:"):
        if not is_digest(sel):
            raise UsageError(f"invalid reference {text!r}: a digest pin is 'sha256:' and 64 lowercase hex digits")
        return Ref(name, "digest", sel)
    if sel[0].isdigit():
        try:
            parse_version(sel)
            return Ref(name, "version", sel)
        except UsageError:
            pass
    if sel[0].isalpha() and _TAG.fullmatch(sel):
        return Ref(name, "tag", validate_tag(sel))
    parse_range(sel)  # raises UsageError naming the problem
    return Ref(name, "range", sel)

"""Names and references: a whitelist that is safe on POSIX and Windows and never a path."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.errors import InvalidName, UsageError
from registry.names import Ref, is_digest, parse_ref, validate_name, validate_tag

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("name", [
    "a", "cat", "cat-mittens", "chair_eames", "v1.2", "team/cat-mittens", "0", "a" * 64, "x" * 64 + "/" + "y" * 64,
    "con-cat", "nul1", "com10", "lpt", "a.b-c_d",
])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name,why", [
    ("", "empty"),
    ("..", "traversal"), ("../etc/passwd", "traversal"), ("a/../b", "traversal"), ("a/..", "traversal"),
    ("/abs", "absolute"), ("/etc/passwd", "absolute"), ("C:/x", "drive"), ("c:x", "drive"), ("\\\\srv\\share", "unc"),
    ("a\\b", "backslash"), ("a//b", "empty part"), ("a/b/c", "two slashes"), ("a/", "trailing slash"),
    ("Cat", "uppercase"), ("CAT-MITTENS", "uppercase"),
    ("a..b", "double dot"), ("a--b", "double dash"), ("-a", "leading dash"), ("a-", "trailing dash"),
    (".hidden", "leading dot"), ("trailing.", "trailing dot"), ("a b", "space"), ("a\tb", "tab"),
    ("a\nb", "newline"), ("a\x00b", "nul byte"), ("cat\n", "trailing newline"),
    ("con", "windows"), ("nul", "windows"), ("aux", "windows"), ("prn", "windows"), ("com1", "windows"),
    ("lpt9", "windows"), ("con.txt", "windows with extension"), ("team/nul", "windows in namespace part"),
    ("nul/cat", "windows namespace"), ("com0", "windows"),
    ("cаt", "cyrillic a look-alike"), ("ｃａｔ", "fullwidth"), ("café", "accent"), ("cat\u200b", "zero width"),
    ("ca\u0301t", "combining"), ("ᴄat", "small capital"), ("cat\u2044x", "fraction slash"), ("ﬁsh", "ligature"),
    ("a" * 65, "overlong part"), ("x/" + "a" * 65, "overlong part"), ("a" * 10_000, "huge"),
    ("a@b", "at sign"), ("a:b", "colon"), ("a*b", "glob"), ("a?b", "glob"), ("a<b", "windows illegal"),
    ("a|b", "pipe"), ('a"b', "quote"), ("%2e%2e", "url-escaped"),
])
def test_invalid_names(name, why):
    with pytest.raises(InvalidName):
        validate_name(name)


def test_invalid_name_is_usage_error_with_hint():
    with pytest.raises(UsageError) as e:
        validate_name("Cat")
    assert "'cat'" in str(e.value)  # suggests the lowercase form


@given(st.text(max_size=80))
@settings(max_examples=400, deadline=None)
def test_accepted_names_are_safe_everywhere(s):
    try:
        validate_name(s)
    except InvalidName:
        return
    assert s.isascii() and s == s.lower() and s.strip() == s
    assert ".." not in s and "\\" not in s and ":" not in s and not s.startswith("/")
    for part in s.split("/"):
        assert 1 <= len(part) <= 64 and part[0].isalnum() and part[-1].isalnum()
        assert part.split(".")[0] not in {"con", "nul", "aux", "prn"}


@pytest.mark.parametrize("text,expected", [
    ("cat", Ref("cat", "default", None)),
    ("team/cat", Ref("team/cat", "default", None)),
    ("cat@1.2.0", Ref("cat", "version", "1.2.0")),
    ("cat@1.0.0-rc.1", Ref("cat", "version", "1.0.0-rc.1")),
    ("cat@^1.2", Ref("cat", "range", "^1.2")),
    ("cat@~1.2", Ref("cat", "range", "~1.2")),
    ("cat@1.2", Ref("cat", "range", "1.2")),
    ("cat@1.x", Ref("cat", "range", "1.x")),
    ("cat@>=1.0,<2.0", Ref("cat", "range", ">=1.0,<2.0")),
    ("cat@*", Ref("cat", "range", "*")),
    ("cat@latest", Ref("cat", "tag", "latest")),
    ("cat@stable-2", Ref("cat", "tag", "stable-2")),
    (f"cat@{D}", Ref("cat", "digest", D)),
])
def test_parse_ref(text, expected):
    ref = parse_ref(text)
    assert ref == expected
    assert str(ref) == text


@pytest.mark.parametrize("text", [
    "", "@1.0.0", "cat@", "cat@sha256:abc", "cat@sha256:" + "AB" * 32, "Cat@1.0.0", "../x@1.0.0",
    "cat@01.2.3", "cat@^", "cat@>=", "cat@1.2.3.4", "cat@latest!", "cat@@1.0.0",
])
def test_parse_ref_rejects(text):
    with pytest.raises(UsageError):
        parse_ref(text)


def test_digest_and_tag_helpers():
    assert is_digest(D) and not is_digest(D + "\n") and not is_digest("sha512:" + "a" * 64)
    assert validate_tag("latest") == "latest"
    for bad in ("1.0.0", "Latest", "", "a b"):
        with pytest.raises(UsageError):
            validate_tag(bad)

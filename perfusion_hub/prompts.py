"""Concept references in a prompt.

A concept named `cat-mittens` (token `<cat-mittens>`) can be referenced three ways:
  "a photo of <cat-mittens>"             the token itself
  "a photo of cat-mittens"               the bare name, as a whole word
  "a photo of a cat" + with=[cat-mittens] bound to the first free occurrence of its superclass word
No torch here: the CLI uses this to find which concepts to install before loading any model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from perfusion_hub.errors import BadInput

_TOKEN_RE = re.compile(r"<([a-z0-9][a-z0-9._/-]*)>")


@dataclass
class ParsedPrompt:
    text: str  # the prompt with every reference written as its token
    concepts: list[str]  # names, in order of first appearance
    superclass_text: str  # the prompt with every concept token replaced by its superclass word


def _word(s: str) -> re.Pattern:
    return re.compile(r"(?<![\w<./-])" + re.escape(s) + r"(?![\w>/-]|\.\w)")


def referenced_names(prompt: str, candidates: list[str] | None = None) -> list[str]:
    """Names referenced in `prompt` as <name> or (if in `candidates`) as a bare word; no validation."""
    found = [m.group(1) for m in _TOKEN_RE.finditer(prompt)]
    for name in candidates or []:
        if _word(name).search(prompt):
            found.append(name)
    return list(dict.fromkeys(found))


def parse_prompt(prompt: str, known: dict[str, tuple[str, str]], with_names: list[str] = ()) -> ParsedPrompt:
    """Rewrite `prompt` so every reference is a token. `known`: name -> (token, superclass)."""
    text = prompt
    for name in sorted(known, key=len, reverse=True):  # longest first: cat-mittens before cat
        token = known[name][0]
        text = _word(name).sub(token, text)
    for name in with_names:
        if name not in known:
            raise BadInput(f"--with {name}: no such concept is loaded")
        token, superclass = known[name]
        if token in text:
            continue
        pattern = _word(superclass)
        if not pattern.search(text):
            raise BadInput(
                f"--with {name}: the prompt has no '{superclass}' to bind it to; "
                f"write {token} or {name} in the prompt instead"
            )
        text = pattern.sub(token, text, count=1)
    tokens = {v[0]: k for k, v in known.items()}
    used: list[str] = []
    for m in _TOKEN_RE.finditer(text):
        tok = m.group(0)
        if tok not in tokens:
            raise BadInput(f"{tok} in the prompt is not a known concept; known: {', '.join(sorted(known)) or 'none'}")
        if tokens[tok] not in used:
            used.append(tokens[tok])
    sup = text
    for name in used:
        token, superclass = known[name]
        sup = sup.replace(token, superclass)
    return ParsedPrompt(text, used, sup)

"""Concept references in a prompt: the one grammar that `pfx render`, `render()` and the tests share.

A concept named `cat-mittens` (token `<cat-mittens>`) can be referenced three ways:
  "a photo of <cat-mittens>"             the token itself
  "a photo of cat-mittens"               the bare name, as a whole word
  "a photo of a cat" + with=[cat-mittens] bound to the first free occurrence of its superclass word

A prompt is read as a sequence of references: `<token>`s and bare words shaped like names (lowercase
alphanumeric parts joined by `-`, `_` or `.`, with an optional `namespace/`), each taken whole, so
`cat-mittens` never matches inside `cat-mittens-2` or `cat-mittens.png`. No torch here: the CLI uses this
to find which concepts to install before loading any model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from perfusion_hub.errors import BadInput

_PART = r"[a-z0-9]+(?:[-_.][a-z0-9]+)*"
_REFERENCE = re.compile(
    r"<(?P<token>[a-z0-9][a-z0-9._/-]*)>"
    rf"|(?<![\w<./-])(?P<word>{_PART}(?:/{_PART})?)(?![\w>/-]|\.\w)"
)


@dataclass
class PromptScan:
    names: list[str]  # concepts referenced, as <name> or as a known bare name, in order of first appearance
    unknown: list[str]  # bare words shaped like concept names (with a - or _) that are not known concepts


@dataclass
class ParsedPrompt:
    text: str  # the prompt with every reference written as its token
    concepts: list[str]  # names, in order of first appearance
    superclass_text: str  # the prompt with every concept token replaced by its superclass word


def scan_prompt(prompt: str, known: set[str] | frozenset[str] = frozenset()) -> PromptScan:
    """The concepts `prompt` references (`<name>` always; a bare name if it is in `known`), and the bare
    name-shaped words that are not known: probably a concept the user forgot to install."""
    names: list[str] = []
    unknown: list[str] = []
    for m in _REFERENCE.finditer(prompt):
        if m["token"]:
            names.append(m["token"])
        elif m["word"] in known:
            names.append(m["word"])
        elif re.search(r"[-_]", m["word"]):
            unknown.append(m["word"])
    return PromptScan(list(dict.fromkeys(names)), list(dict.fromkeys(unknown)))


def parse_prompt(prompt: str, known: dict[str, tuple[str, str]], with_names: list[str] = ()) -> ParsedPrompt:
    """Rewrite `prompt` so every reference is a token. `known`: name -> (token, superclass)."""
    text = _REFERENCE.sub(lambda m: known[m["word"]][0] if m["word"] in known else m[0], prompt)
    for name in with_names:
        if name not in known:
            raise BadInput(f"--with {name}: no such concept is loaded")
        token, superclass = known[name]
        if token in text:
            continue
        hit = next((m for m in _REFERENCE.finditer(text) if m["word"] == superclass), None)
        if hit is None:
            raise BadInput(
                f"--with {name}: the prompt has no '{superclass}' to bind it to; "
                f"write {token} or {name} in the prompt instead"
            )
        text = text[:hit.start()] + token + text[hit.end():]
    tokens = {v[0]: k for k, v in known.items()}
    used: list[str] = []
    for m in _REFERENCE.finditer(text):
        if not m["token"]:
            continue
        if m[0] not in tokens:
            raise BadInput(f"{m[0]} in the prompt is not a known concept; known: {', '.join(sorted(known)) or 'none'}")
        if tokens[m[0]] not in used:
            used.append(tokens[m[0]])
    sup = text
    for name in used:
        token, superclass = known[name]
        sup = sup.replace(token, superclass)
    return ParsedPrompt(text, used, sup)

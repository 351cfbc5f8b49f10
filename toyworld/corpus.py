"""The toy world's caption corpus generator: writes the packaged corpus the covariance C is estimated over.

Captions come from the project's own templates and word lists (`toyworld.words`), drawn by a seeded
`random.Random`, so the same ``(n, seed)`` always yields the same list. They cover objects with sizes,
patterns, colours and materials, scenes, art styles, spatial relations, activities, counts and lighting,
e.g. "a watercolor of a small red fox next to a lamp in a forest at night".

Every object noun of the word lists is used as a main subject at least once (subjects are drawn by cycling
through shuffled copies of the noun list), so vocabulary coverage is complete for the default size.

``python -m toyworld.corpus`` (also run by ``python -m toyworld.build``) rewrites
``perfusion_hub/data/captions.txt``; reading it and the corpus digest are the runtime's
(`perfusion_hub.captions`).
"""
from __future__ import annotations

import random
from pathlib import Path

from perfusion_hub.captions import CAPTIONS_PATH, canonical_text, corpus_digest, load_captions
from toyworld import words as W

DEFAULT_N = 6000
DEFAULT_SEED = 20230501

_VOWELS = ("a", "e", "i", "o", "u")
_CLOTHING = W.NOUNS["clothing"]
_SINGLE_RELATIONS = tuple(r for r in W.RELATIONS if r not in ("holding", "wearing", "riding", "carrying"))


def _a(phrase: str) -> str:
    """Indefinite article for a phrase."""
    return ("an " if phrase[:1] in _VOWELS else "a ") + phrase


class _Gen:
    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self._subjects: list[str] = []

    # --- pieces -------------------------------------------------------------------------------------
    def subject_noun(self) -> str:
        """Main subjects cycle through shuffled copies of all nouns (full coverage)."""
        if not self._subjects:
            self._subjects = list(W.ALL_NOUNS)
            self.r.shuffle(self._subjects)
        return self._subjects.pop()

    def any_noun(self) -> str:
        return self.r.choice(W.ALL_NOUNS)

    def adjectives(self, max_n: int = 2) -> list[str]:
        r = self.r
        k = r.choices(range(max_n + 1), weights=[4, 4, 2][: max_n + 1])[0]
        pools = [W.SIZES, W.PATTERNS, W.COLORS, W.MATERIALS]
        chosen = sorted(r.sample(range(4), k))  # keep the natural order size, state, colour, material
        return [r.choice(pools[i]) for i in chosen]

    def np(self, noun: str | None = None, adj: int = 2, det: str | None = None) -> str:
        """A noun phrase with a determiner: 'a small red fox', 'the wooden chair'."""
        noun = noun or self.any_noun()
        body = " ".join(self.adjectives(adj) + [noun])
        det = det or self.r.choices(["a", "the", "my", "one"], weights=[10, 4, 1, 1])[0]
        return _a(body) if det == "a" else f"{det} {body}"

    def plural_np(self, noun: str | None = None) -> str:
        noun = noun or self.any_noun()
        adj = self.adjectives(1)
        return " ".join([self.r.choice(W.COUNTS)] + adj + [W.plural(noun)])

    def scene(self) -> str:
        s = self.r.choice(W.SCENES)
        prep = self.r.choice(["in", "in", "at", "on"])
        det = self.r.choice(["a", "the"])
        return f"{prep} {_a(s) if det == 'a' else 'the ' + s}"

    def style(self) -> str:
        return _a(self.r.choice(W.STYLES))

    def light(self) -> str:
        return self.r.choice(W.LIGHTING)

    def quality(self) -> str:
        return self.r.choice(W.QUALITY)

    def verb(self) -> str:
        return self.r.choice(W.VERBS)

    def rel(self) -> str:
        return self.r.choice(_SINGLE_RELATIONS)

    # --- templates ----------------------------------------------------------------------------------
    def caption(self) -> str:
        r = self.r
        s = self.subject_noun()
        t = r.randrange(20)
        if t == 0:
            return f"a photo of {self.np(s, 1)}"
        if t == 1:
            return f"{r.choice(['a good', 'a nice', 'a close up', 'a bright', 'a dark'])} photo of the {s}"
        if t == 2:
            return f"{self.style()} of {self.np(s)}"
        if t == 3:
            return f"{self.style()} of {self.np(s)} {self.rel()} {self.np(adj=1)}"
        if t == 4:
            return f"{self.style()} of {self.np(s)} {self.rel()} {self.np(adj=1)} {self.scene()} {self.light()}"
        if t == 5:
            return f"{self.np(s)} {self.rel()} {self.np(adj=1)} {self.scene()}"
        if t == 6:
            return f"{self.plural_np(s)} {self.verb()} {self.scene()}"
        if t == 7:
            return f"{self.np(s)} {self.verb()} {self.light()}"
        if t == 8:
            return f"{self.np(s)}, {r.choice(W.STYLES)}, {self.quality()}"
        if t == 9:
            return f"{self.np(s)} {self.verb()} {self.scene()}, {self.quality()}"
        if t == 10:
            return f"{self.np(s)} and {self.np(adj=1)} {self.scene()}"
        if t == 11:
            return f"{self.np(s)} wearing {self.np(r.choice(_CLOTHING), 1, 'a')}"
        if t == 12:
            return f"{self.np(s)} holding {self.np(adj=1)} {self.light()}"
        if t == 13:
            return f"{self.style()} of {self.plural_np(s)} {self.rel()} {self.np(adj=1)}"
        if t == 14:
            return f"{self.quality()} {r.choice(W.STYLES)} of {self.np(s)} {self.scene()}"
        if t == 15:
            return f"an image of {self.np(s, 0, 'a')} {self.rel()} {self.np(adj=0)}"
        if t == 16:
            return f"{self.np(s)} {self.scene()} {self.light()}"
        if t == 17:
            return f"{self.np(s, 1, 'the')} is {self.rel()} {self.np(adj=1)}"
        if t == 18:
            return (f"{self.style()} of {self.np(s, 1)} {self.verb()} {self.rel()} {self.np(adj=1)} "
                    f"{self.scene()}")
        return f"{self.np(s)} {self.rel()} {self.np(adj=1)}, {r.choice(W.STYLES)} {self.light()}"


def generate_captions(n: int = DEFAULT_N, seed: int = DEFAULT_SEED) -> list[str]:
    """n distinct captions, deterministic for (n, seed)."""
    if n <= 0:
        raise ValueError("n must be positive")
    g = _Gen(seed)
    seen: dict[str, None] = {}
    attempts = 0
    while len(seen) < n:
        attempts += 1
        if attempts > 50 * n:
            raise RuntimeError("could not generate enough distinct captions")
        seen.setdefault(" ".join(g.caption().split()), None)
    return list(seen)


def write_captions(path: str | Path | None = None, n: int = DEFAULT_N, seed: int = DEFAULT_SEED) -> Path:
    path = Path(path) if path is not None else CAPTIONS_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(canonical_text(generate_captions(n, seed)).encode("utf-8"))
    return path


if __name__ == "__main__":
    out = write_captions()
    caps = load_captions(out)
    print(f"wrote {len(caps)} captions to {out} ({out.stat().st_size} bytes), {corpus_digest(caps)}")

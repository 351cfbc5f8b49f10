"""Build the `toy` base's CLIP-style byte-level BPE tokenizer (written by the project).

Output (``perfusion_hub/data/toy/tokenizer/``): ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
``special_tokens_map.json``, loadable with ``transformers.CLIPTokenizer.from_pretrained(dir)`` (and
``CLIPTokenizerFast``).

Design
------
* Vocabulary layout follows CLIP: the 256 byte characters of the GPT-2/CLIP byte-to-unicode table, the same
  256 with the end-of-word suffix ``</w>``, one entry per merge (in merge order), then ``<|startoftext|>``
  (bos) and ``<|endoftext|>`` (eos = pad = unk, as in SD). Because every byte and byte+``</w>`` is present,
  any text tokenizes without unknowns (byte-level fallback).
* Merges are trained by a small BPE trainer of our own over the *word set*: every word of
  `toyworld.words.all_words()` plus every pre-token of the packaged caption corpus (split with CLIP's
  pre-tokenizer regex). Each word counts once. At each step the most frequent adjacent pair among the words
  not yet reduced to one symbol is merged (ties: lexicographically smallest pair), until every word is a
  single symbol. A word's initial symbols are its byte characters, the last one carrying ``</w>``, exactly as
  CLIP's ``bpe()`` does.
* Verification: CLIP's encoder (greedy lowest-rank merge, leftmost first) is simulated over the merges; any
  word it would not reduce to one token (possible only when the same token string is produced by two
  different merges) gets extra merges appended at the end, which cannot affect other words. The build then
  checks with transformers' tokenizer that every word maps to exactly one id.
* Deterministic: pure Python, fixed tie-breaking, sorted inputs; same bytes on every run and platform.
"""

from __future__ import annotations

import heapq
import itertools
import json
from collections import defaultdict
from pathlib import Path

import regex

from perfusion_hub.bases import EMBEDDED
from toyworld import corpus, words

TOKENIZER_DIR = EMBEDDED["toy"] / "tokenizer"
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"
MODEL_MAX_LENGTH = 77

# CLIP's pre-tokenizer pattern (the text is lowercased and whitespace-normalised first).
CLIP_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


_B2U = bytes_to_unicode()


def pretokenize(text: str) -> list[str]:
    """CLIP pre-tokens of a text (lowercased, whitespace collapsed), as byte-unicode strings."""
    text = " ".join(text.split()).lower()
    return ["".join(_B2U[b] for b in t.encode("utf-8")) for t in CLIP_PAT.findall(text)]


def word_set(captions: list[str] | None = None) -> list[str]:
    """Sorted words that must be single tokens: the word lists plus every corpus pre-token."""
    if captions is None:
        captions = corpus.load_captions()
    ws: set[str] = set()
    for w in words.all_words():
        ws.update(pretokenize(w))
    for c in captions:
        ws.update(pretokenize(c))
    return sorted(ws)


def _initial(word: str) -> tuple[str, ...]:
    return tuple(word[:-1]) + (word[-1] + EOW,)


def _merge_word(sym: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    """Merge every (a, b) occurrence left to right, as CLIP's bpe() does."""
    out: list[str] = []
    i, n = 0, len(sym)
    while i < n:
        if i < n - 1 and sym[i] == a and sym[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(sym[i])
            i += 1
    return tuple(out)


def _pairs(sym: tuple[str, ...]):
    return itertools.pairwise(sym)


def train_merges(word_list: list[str]) -> list[tuple[str, str]]:
    """BPE merges that reduce every word of `word_list` to a single symbol (deterministic)."""
    segs = [_initial(w) for w in word_list]
    counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, s in enumerate(segs):
        for p in _pairs(s):
            counts[p] += 1
            where[p].add(i)
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap:
        negc, p = heapq.heappop(heap)
        if counts.get(p, 0) != -negc or negc == 0:
            continue  # stale entry
        merges.append(p)
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(p, ())):
            old = segs[i]
            new = _merge_word(old, *p)
            if new == old:
                continue
            for q in _pairs(old):
                counts[q] -= 1
                touched.add(q)
            for q in set(_pairs(old)):
                where[q].discard(i)
            for q in _pairs(new):
                counts[q] += 1
                where[q].add(i)
                touched.add(q)
            segs[i] = new
        for q in touched:
            c = counts.get(q, 0)
            if c > 0:
                heapq.heappush(heap, (-c, q))
            else:
                counts.pop(q, None)
                where.pop(q, None)
    return merges


def clip_bpe(word: str, ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """CLIP's bpe(): repeatedly merge the lowest-rank adjacent pair (all its occurrences, left to right)."""
    sym = _initial(word)
    while len(sym) > 1:
        best = min(_pairs(sym), key=lambda q: ranks.get(q, float("inf")))
        if best not in ranks:
            break
        sym = _merge_word(sym, *best)
    return sym


def complete_merges(word_list: list[str], merges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Append merges for any word CLIP's encoder would leave in several pieces."""
    merges = list(merges)
    while True:
        ranks = {p: i for i, p in enumerate(merges)}
        extra: list[tuple[str, str]] = []
        for w in word_list:
            seg = clip_bpe(w, ranks)
            if len(seg) > 1:
                acc = seg[0]
                for s in seg[1:]:
                    if (acc, s) not in ranks and (acc, s) not in extra:
                        extra.append((acc, s))
                    acc += s
        if not extra:
            return merges
        merges.extend(extra)


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    chars = list(_B2U.values())
    tokens = chars + [c + EOW for c in chars]
    seen = set(tokens)
    for a, b in merges:
        t = a + b
        if t not in seen:
            seen.add(t)
            tokens.append(t)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def tokenizer_files(captions: list[str] | None = None) -> dict[str, bytes]:
    """The tokenizer folder's files as bytes (deterministic)."""
    wl = word_set(captions)
    merges = complete_merges(wl, train_merges(wl))
    vocab = build_vocab(merges)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}

    def dump(obj) -> bytes:
        return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    return {
        "vocab.json": (json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"),
        "merges.txt": ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode("utf-8"),
        "tokenizer_config.json": dump(config),
        "special_tokens_map.json": dump(special),
    }


def verify(tok_dir: str | Path, word_list: list[str] | None = None) -> dict:
    """Load with transformers and check every word encodes as exactly one id; returns a summary."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    word_list = word_list if word_list is not None else sorted(set(words.all_words()))
    summary = {}
    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        tok = cls.from_pretrained(str(tok_dir))
        if tok.model_max_length != MODEL_MAX_LENGTH:
            raise AssertionError(f"{cls.__name__}: model_max_length {tok.model_max_length}")
        bad = []
        ids = tok(list(word_list), add_special_tokens=False)["input_ids"]
        for w, i in zip(word_list, ids):
            if len(i) != 1:
                bad.append((w, tok.convert_ids_to_tokens(i)))
        if bad:
            raise AssertionError(f"{cls.__name__}: {len(bad)} words are not single tokens, e.g. {bad[:5]}")
        summary[cls.__name__] = len(tok)
    return summary


def build(out_dir: str | Path | None = None, captions: list[str] | None = None, check: bool = True) -> Path:
    out = Path(out_dir) if out_dir is not None else TOKENIZER_DIR
    out.mkdir(parents=True, exist_ok=True)
    for name, data in tokenizer_files(captions).items():
        (out / name).write_bytes(data)
    if check:
        verify(out, sorted(set(words.all_words()) | set(_corpus_words(captions))))
    return out


def _corpus_words(captions: list[str] | None) -> list[str]:
    if captions is None:
        captions = corpus.load_captions()
    return sorted({t for c in captions for t in CLIP_PAT.findall(" ".join(c.split()).lower())})


if __name__ == "__main__":
    import time

    t0 = time.perf_counter()
    d = build()
    v = json.loads((d / "vocab.json").read_text("utf-8"))
    print(f"tokenizer written to {d}: vocab {len(v)} in {time.perf_counter() - t0:.1f}s")

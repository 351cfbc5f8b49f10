"""Word lists, caption corpus and the toy base's tokenizer (all cheap: ~5 s)."""

from __future__ import annotations

import re
import unicodedata

import pytest

from perfusion_hub.errors import BadInput
from toyworld import corpus, words
from toyworld import tokenizer as tokenizer_build

TOK_DIR = tokenizer_build.TOKENIZER_DIR
# Digest of the shipped corpus (data/captions.txt). Changing templates, word lists or the seed changes it,
# and with it the covariance identity of every base: update deliberately.
SHIPPED_CORPUS_DIGEST = "sha256:82b9e68554aa9d8bd358869f6e0341f2a4ea2b17f559924bde40ccfe7cc50c9d"


@pytest.fixture(scope="module", params=["CLIPTokenizer", "CLIPTokenizerFast"])
def tok(request):
    import transformers

    return getattr(transformers, request.param).from_pretrained(str(TOK_DIR))


@pytest.fixture(scope="module")
def captions():
    return corpus.load_captions()


# ---- word lists --------------------------------------------------------------------------------------
def test_word_lists_shape():
    nouns = words.ALL_NOUNS
    assert 400 <= len(nouns) <= 800
    assert len(set(nouns)) == len(nouns)
    assert words.SUPERCLASS_WORDS == nouns
    for w in ("cat", "dog", "bird", "horse", "rabbit", "teddy", "chair", "table", "sofa", "lamp", "cup",
              "mug", "vase", "bowl", "ball", "robot", "doll", "tree", "flower", "car", "man", "pizza"):
        assert w in nouns, w
    for w in nouns:
        assert re.fullmatch(r"[a-z]+", w), w
    for lst in (words.COLORS, words.MATERIALS, words.SIZES, words.PATTERNS, words.VERBS):
        assert lst and all(re.fullmatch(r"[a-z]+", w) for w in lst)
    for lst in (words.SCENES, words.STYLES, words.RELATIONS, words.LIGHTING):
        assert lst and all(p == p.lower() and p.isascii() for p in lst)
    assert {"striped", "spotted"} <= set(words.PATTERNS)
    assert {"watercolor", "oil painting", "pencil sketch", "pixel art", "photo"} <= set(words.STYLES)
    assert {"on", "next to", "left of", "under", "behind", "in front of"} <= set(words.RELATIONS)
    assert {"beach", "kitchen", "forest", "city street"} <= set(words.SCENES)


# ---- tokenizer ---------------------------------------------------------------------------------------
def test_tokenizer_specials(tok):
    assert tok.model_max_length == 77
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>"
    assert tok.pad_token_id == tok.eos_token_id
    assert tok.bos_token_id == len(tok) - 2 and tok.eos_token_id == len(tok) - 1
    ids = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    assert ids[:7] == [tok.bos_token_id] + tok.convert_tokens_to_ids(
        ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]) + [tok.eos_token_id]
    assert 2000 <= len(tok) <= 8000


def test_every_word_is_one_token(tok, captions):
    ws = set(words.all_words())
    for c in captions:
        ws.update(tokenizer_build.CLIP_PAT.findall(c.lower()))
    ws = sorted(ws)
    ids = tok(ws, add_special_tokens=False)["input_ids"]
    bad = [(w, tok.convert_ids_to_tokens(i)) for w, i in zip(ws, ids) if len(i) != 1]
    assert not bad, bad[:10]
    # every superclass maps to its own `word</w>` entry
    for w in words.SUPERCLASS_WORDS:
        assert tok.convert_ids_to_tokens(tok(w, add_special_tokens=False)["input_ids"]) == [w + "</w>"]


@pytest.mark.parametrize("text", [
    "Zyxwvut qqqq jjjjkkk",
    "café — naïve 🐱 日本語のテキスト, Ελληνικά!",
    "<cat-toy> on a chair; (x=3.14) #tag @user ~~~ \t\n tabs",
    "it's the dog's bowl, isn't it?",
    "\u00a0non-breaking\u2003spaces and a\u0301ccents",
])
def test_any_text_tokenizes_without_unknowns(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids and tok.unk_token_id not in ids  # unk is <|endoftext|>, which plain text never produces
    toks = tok.convert_ids_to_tokens(ids)
    u2b = {u: b for b, u in tokenizer_build.bytes_to_unicode().items()}
    rebuilt = bytes(u2b[ch] for t in toks for ch in t.replace("</w>", "")).decode("utf-8")
    expected = "".join(unicodedata.normalize("NFC", text).lower().split())
    assert rebuilt == expected


def test_tokenizer_build_reproduces_shipped_files():
    for name, data in tokenizer_build.tokenizer_files().items():
        assert (TOK_DIR / name).read_bytes() == data, name


def test_clip_bpe_simulation_agrees(tok):
    merges = (TOK_DIR / "merges.txt").read_text("utf-8").splitlines()[1:]
    ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    for w in ("teddy", "watercolor", "hummingbird", "xylophone"):
        assert tokenizer_build.clip_bpe(w, ranks) == (w + "</w>",)
    # a word outside the lists splits into pieces that the real tokenizer agrees with
    seg = tokenizer_build.clip_bpe("catdogfrog", ranks)
    assert len(seg) > 1
    assert list(seg) == tok.convert_ids_to_tokens(tok("catdogfrog", add_special_tokens=False)["input_ids"])


# ---- corpus ------------------------------------------------------------------------------------------
def test_corpus_shipped(captions):
    assert len(captions) == corpus.DEFAULT_N
    assert len(set(captions)) >= 5000
    assert corpus.CAPTIONS_PATH.stat().st_size < 600_000
    assert corpus.corpus_digest(captions) == SHIPPED_CORPUS_DIGEST
    assert corpus.corpus_digest(corpus.generate_captions()) == SHIPPED_CORPUS_DIGEST  # regenerates exactly
    assert corpus.CAPTIONS_PATH.read_bytes() == corpus.canonical_text(captions).encode("utf-8")


def test_corpus_coverage(captions):
    seen = set()
    for c in captions:
        seen.update(re.findall(r"[a-z]+", c))
    nouns = set(words.ALL_NOUNS)
    assert len(nouns & seen) / len(nouns) >= 0.9
    for lst in (words.COLORS, words.MATERIALS, words.PATTERNS):
        assert len(set(lst) & seen) / len(set(lst)) >= 0.9
    text = "\n".join(captions)
    for group in (words.SCENES, words.STYLES, words.RELATIONS, words.LIGHTING):
        assert sum(p in text for p in group) / len(group) >= 0.9
    # fits the 77-token context with room to spare
    assert max(len(tokenizer_build.CLIP_PAT.findall(c)) for c in captions) <= 60


def test_corpus_digest_definition():
    caps = ["a cat", "a dog"]
    import hashlib

    assert corpus.corpus_digest(caps) == "sha256:" + hashlib.sha256(b"a cat\na dog\n").hexdigest()
    assert corpus.generate_captions(50, seed=7) == corpus.generate_captions(50, seed=7)
    assert corpus.generate_captions(50, seed=7) != corpus.generate_captions(50, seed=8)


def test_load_user_captions(tmp_path):
    p = tmp_path / "caps.txt"
    p.write_text("\ufeffa red fox\n\n   \n  a café at night  \r\nlast line", encoding="utf-8")
    assert corpus.load_captions(p) == ["a red fox", "a café at night", "last line"]

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(BadInput, match="no captions"):
        corpus.load_captions(empty)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(BadInput, match="not UTF-8"):
        corpus.load_captions(bad)
    with pytest.raises(BadInput, match="cannot read"):
        corpus.load_captions(tmp_path / "missing.txt")
    with pytest.raises(BadInput, match="cannot read"):
        corpus.load_captions(tmp_path)  # a directory

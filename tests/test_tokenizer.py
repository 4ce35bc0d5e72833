"""jaxgen's CLIP tokenizer against transformers' CLIPTokenizer and an independent reference BPE.

No model hub here: the vocabulary is trained locally with ``train_tokenizer`` (CLIP's format), and
both jaxgen and transformers read the folder it writes.

transformers 5 ships one CLIPTokenizer (tokenizers-backed; ``CLIPTokenizerFast`` is the same
class), so the "slow" tokenizer is covered by a small pure-Python reference written here: CLIP's
byte-level BPE by merge rank, with either plain cleaning (NFC, whitespace, lower-case) or the
cleaning transformers 4's slow tokenizer used without ftfy (BERT's BasicTokenizer). The second
differs from the fast pipeline exactly on control/format characters and CJK ideographs.
"""
from __future__ import annotations

import json
import os
import shutil
import unicodedata

import numpy as np
import pytest

import jaxgen
from jaxgen.errors import ConfigError
from jaxgen.tokenizer import CLIPTokenizer, load_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")
regex = pytest.importorskip("regex")        # installed with transformers

CAPTIONS = [f"a {size} {color} {shape} {place}"
            for size in ("small", "large")
            for color in ("red", "green", "blue", "yellow", "magenta", "cyan")
            for shape in ("circle", "square", "triangle")
            for place in ("on the left", "on the right", "at the top", "at the bottom", "in the center")]
CAPTIONS += [f"a handwritten digit {w}" for w in
             ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]
CAPTIONS += [f"the number {d}" for d in range(10)]

CORPUS = [
    "a large red circle on the left",
    "A LARGE Red Circle On The LEFT",
    "the number 7",
    "Hello, world! How's it going?",
    "don't stop -- we're here; they'll see, I'd say, you've won & I'm glad",
    "prices: $3.50, 12,000 items (approx.) at 9:45pm #1 @home",
    "1234567890 3.14159 2024-01-01",
    "café déjà vu naïve résumé Ångström ÉCOLE",
    "e\u0301cole (decomposed accent)",
    "emoji 🐱🚀 time 😀👍🏽 ❤️",
    "tabs\tand\nnew   lines\r\n  everywhere  ",
    "quotes “curly” ‘single’ «guillemets» — en–dash…",
    "wow!!! really??? ok...",
    "<|endoftext|> special tokens <|startoftext|> in text",
    "url https://example.com/path?q=1&x=2",
    "",
    "   ",
    "a " * 100,
    "supercalifragilisticexpialidocious " * 20,
    "Ω ≈ ç √ ∫ ˜ µ ≤ ≥ ÷",
    "Привет мир γειά σου κόσμε",
]
# Inputs on which transformers 4's slow tokenizer without ftfy (BasicTokenizer cleaning) differs
# from the tokenizers-based one: it deletes control/format characters (here NUL and the emoji
# zero-width joiner) and splits CJK ideographs into one word each.
SLOW_ONLY_DIFFERENT = [
    "null\x00byte and bell\x07 here",
    "astronaut 👩\u200d🚀 emoji",
    "北京欢迎你 and 東京",
]


# ------------------------------------------------------------------------------------------------
# an independent reference: CLIP's BPE written out in plain Python
# ------------------------------------------------------------------------------------------------
REF_PATTERN = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                            r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)


def _ref_byte_chars() -> dict[int, str]:
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                             (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                             (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def _v4_slow_clean(text: str) -> str:
    """transformers 4's CLIPTokenizer without ftfy: BasicTokenizer(strip_accents=False, no punct split)."""
    out = []
    for ch in text:
        if ch in "\t\n\r" or unicodedata.category(ch) == "Zs":
            out.append(" ")
        elif ord(ch) in (0, 0xFFFD) or unicodedata.category(ch).startswith("C"):
            continue
        elif _is_cjk(ch):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    text = unicodedata.normalize("NFC", "".join(out))
    return " ".join(w.lower() for w in text.split())


def reference_ids(text: str, vocab: dict, merges: list, length: int = 77, slow_v4: bool = False) -> list[int]:
    ranks = {tuple(m): i for i, m in enumerate(merges)}
    chars = _ref_byte_chars()
    if slow_v4:
        text = _v4_slow_clean(text)
    else:
        text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
    ids = []
    for word in REF_PATTERN.findall(text):
        if word in ("<|startoftext|>", "<|endoftext|>"):
            ids.append(vocab[word])
            continue
        sym = [chars[b] for b in word.encode("utf-8")]
        sym[-1] += "</w>"
        while len(sym) > 1:
            pairs = [(sym[i], sym[i + 1]) for i in range(len(sym) - 1)]
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(sym):
                if i < len(sym) - 1 and (sym[i], sym[i + 1]) == best:
                    merged.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    merged.append(sym[i])
                    i += 1
            sym = merged
        ids.extend(vocab[s] for s in sym)
    body = [vocab["<|startoftext|>"], *ids[: length - 2], vocab["<|endoftext|>"]]
    return body + [vocab["<|endoftext|>"]] * (length - len(body))


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip_tok") / "tokenizer"
    train_tokenizer(CAPTIONS * 3 + CORPUS * 2 + SLOW_ONLY_DIFFERENT * 2, 800, path)
    return str(path)


@pytest.fixture(scope="module")
def tok(folder):
    return jaxgen.load_tokenizer(folder)


@pytest.fixture(scope="module")
def hf(folder):
    return transformers.CLIPTokenizer.from_pretrained(folder)


def hf_ids(hf_tok, texts, length=77):
    enc = hf_tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="np")
    return enc["input_ids"]


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
def test_trained_vocabulary_layout(tok):
    assert tok.vocab_size == 800
    assert tok.bos_token_id == tok.vocab_size - 2 and tok.eos_token_id == tok.vocab_size - 1
    assert tok.pad_token_id == tok.eos_token_id and tok.model_max_length == 77
    assert tok.vocab["!"] == 0 and tok.vocab["!</w>"] == 256     # CLIP's byte-symbol order


def test_matches_transformers(tok, hf):
    texts = CORPUS + SLOW_ONLY_DIFFERENT
    ours = tok(texts)
    assert ours.dtype == np.int32 and ours.shape == (len(texts), 77)
    ref = hf_ids(hf, texts)
    bad = [t for t, a, b in zip(texts, ours, ref) if not np.array_equal(a, b)]
    assert not bad, f"ids differ from transformers on {bad}"
    assert hf.bos_token_id == tok.bos_token_id and hf.eos_token_id == tok.eos_token_id
    assert hf.pad_token_id == tok.pad_token_id


def test_matches_reference_bpe(tok, folder):
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    merges = [tuple(line.split()) for line in open(os.path.join(folder, "merges.txt"), encoding="utf-8")
              if line.strip() and not line.startswith("#version")]
    texts = CORPUS + SLOW_ONLY_DIFFERENT
    ours = tok(texts)
    for text, row in zip(texts, ours):
        assert row.tolist() == reference_ids(text, vocab, merges), text
    # transformers 4's slow path without ftfy: the same ids except the documented inputs.
    differing = [t for t, row in zip(texts, ours)
                 if row.tolist() != reference_ids(t, vocab, merges, slow_v4=True)]
    assert differing == SLOW_ONLY_DIFFERENT


def test_framing_truncation_padding(tok):
    ids, mask = tok.encode(["", "a " * 200, "the number 7"], return_attention_mask=True)
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    assert ids[0, :2].tolist() == [bos, eos] and (ids[0, 2:] == pad).all()
    assert ids[1, 0] == bos and ids[1, -1] == eos and mask[1].all()   # truncated, end token kept
    n = int(mask[2].sum())
    assert ids[2, n - 1] == eos and (ids[2, n:] == pad).all() and mask[2, :n].all()
    assert tok("the number 7").shape == (1, 77)
    assert np.array_equal(tok([b"the number 7"]), tok(["the number 7"]))      # TFDS Text is bytes
    assert tok(["x"], max_length=16).shape == (1, 16)
    assert tok.decode(ids[2]) == "the number 7"


def test_save_roundtrip_and_transformers_reads_it(tok, tmp_path):
    tok.save(tmp_path / "copy")
    again = load_tokenizer(tmp_path / "copy")
    assert np.array_equal(again(CORPUS), tok(CORPUS))
    hf2 = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "copy"))
    assert np.array_equal(hf_ids(hf2, CORPUS), tok(CORPUS))


def test_tokenizer_json_folder(hf, tok, tmp_path):
    """A folder with only tokenizer.json (+ config), as transformers 5 saves it."""
    hf.save_pretrained(str(tmp_path / "hf"))
    only = tmp_path / "json_only"
    only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "hf" / name, only / name)
    assert not (only / "vocab.json").exists()
    assert np.array_equal(load_tokenizer(only)(CORPUS), tok(CORPUS))


def test_sd2_pad_token(folder, tmp_path):
    """SD 2.x pads with "!" (id 0); transformers then treats "!" as a special token in text too."""
    sd2 = tmp_path / "sd2"
    shutil.copytree(folder, sd2)
    cfg = json.loads((sd2 / "tokenizer_config.json").read_text())
    cfg["pad_token"] = "!"
    (sd2 / "tokenizer_config.json").write_text(json.dumps(cfg))
    (sd2 / "special_tokens_map.json").unlink()
    ours = load_tokenizer(sd2)
    assert ours.pad_token_id == 0
    texts = CORPUS + ["wow!! great?! ok!", "!!!"]
    ids = ours(texts)
    assert np.array_equal(ids, hf_ids(transformers.CLIPTokenizer.from_pretrained(str(sd2)), texts))
    assert ids[2, -1] == 0 and ids[2, 0] == ours.bos_token_id


def test_sd1_style_added_token_config(folder, tmp_path):
    """SD 1.x repos store special tokens as AddedToken dicts (normalized: true). transformers 5
    still matches them case-sensitively in the raw text, and so does jaxgen."""
    sd1 = tmp_path / "sd1"
    shutil.copytree(folder, sd1)
    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}
    cfg = {"add_prefix_space": False, "bos_token": added("<|startoftext|>"), "do_lower_case": True,
           "eos_token": added("<|endoftext|>"), "errors": "replace", "model_max_length": 77,
           "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer",
           "unk_token": added("<|endoftext|>")}
    (sd1 / "tokenizer_config.json").write_text(json.dumps(cfg))
    (sd1 / "special_tokens_map.json").unlink()
    texts = CORPUS + ["<|ENDOFTEXT|> upper-case special", "x<|endoftext|>y"]
    ours = load_tokenizer(sd1)(texts)
    assert np.array_equal(ours, hf_ids(transformers.CLIPTokenizer.from_pretrained(str(sd1)), texts))


def test_added_tokens_both_ways(hf, tok, tmp_path):
    """Textual-inversion style added tokens: transformers' folder -> jaxgen -> transformers."""
    hf.save_pretrained(str(tmp_path / "hf"))
    hf2 = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "hf"))
    hf2.add_tokens(["<cat-toy>", "Bigword"])
    hf2.save_pretrained(str(tmp_path / "added"))
    ours = load_tokenizer(tmp_path / "added")
    assert ours.vocab_size == tok.vocab_size + 2
    texts = CORPUS + ["a photo of <cat-toy>", "A photo of <CAT-TOY>!", "bigword BIGWORD", "x<cat-toy>y"]
    assert np.array_equal(ours(texts), hf_ids(hf2, texts))
    assert ours.decode(ours(["a photo of <cat-toy>"])[0]) == "a photo of <cat-toy>"
    ours.save(tmp_path / "ours")                        # vocab.json + merges.txt + added_tokens_decoder
    assert np.array_equal(load_tokenizer(tmp_path / "ours")(texts), ours(texts))
    hf3 = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "ours"))
    assert np.array_equal(hf_ids(hf3, texts), ours(texts))


def test_errors(tmp_path, folder):
    with pytest.raises(ConfigError, match="no such folder"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="vocab.json"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer(["a b c"], 100)
    with pytest.raises(ConfigError, match="not in the vocabulary"):
        CLIPTokenizer({"a": 0}, [])

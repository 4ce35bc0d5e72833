"""CLIP's byte-level BPE tokenizer, read from and written to the Hugging Face folder layouts.

A folder holds either ``vocab.json`` + ``merges.txt`` (the layout of Stable Diffusion repos'
``tokenizer/`` folders) or ``tokenizer.json``, plus ``tokenizer_config.json`` for the special
tokens and the context length (SD 1.x pads with ``<|endoftext|>``, SD 2.x with ``"!"``).

The BPE itself runs in the ``tokenizers`` library, configured as CLIP's tokenizer is:

* normalisation: Unicode NFC, every run of whitespace becomes one space, lower-casing;
* pre-tokenisation: CLIP's word pattern (``'s``-style contractions, letter runs, single digits,
  runs of other non-space symbols), then GPT-2's byte-to-unicode mapping;
* BPE with the ``</w>`` end-of-word suffix and no sub-word prefix;
* special tokens (bos/eos/unk/pad) are matched in the raw text before normalisation, so
  ``"<|endoftext|>"`` typed in a prompt is the end token, as in transformers' CLIPTokenizer
  (transformers 4 and the original tokenizer also matched them after lower-casing, e.g.
  ``"<|ENDOFTEXT|>"``; transformers 5, the reference here, does not);
* framing: ``[bos] + tokens[: L - 2] + [eos]``, then padding with the pad token to ``L``
  (``L`` = ``model_max_length``, 77 for CLIP): a long prompt is truncated and keeps its end token.

This matches transformers 5's CLIPTokenizer (tokenizers-backed; CLIPTokenizerFast is the same
class) id for id. Older pipelines differ on rare inputs: the original OpenAI tokenizer ran
``ftfy.fix_text`` (it straightens curly quotes, among other repairs) and ``html.unescape``;
transformers 4's slow tokenizer, without ftfy installed, deleted control and format characters
(NUL, the emoji zero-width joiner) and split CJK ideographs into separate words.

``train_tokenizer`` learns a small vocabulary in the same format for the embedded datasets.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Iterable, Mapping, Sequence

import numpy as np

from jaxgen.errors import ConfigError, DataError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77           # CLIP's text context (max_position_embeddings)
EOW = "</w>"                  # end-of-word suffix of CLIP's BPE symbols
# CLIP's pre-tokenisation pattern: the two special tokens, English contractions, letter runs,
# single digits, runs of other non-space characters.
WORD_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
_LARGE = 10**6                # transformers writes ~1e30 when a tokenizer has no length limit


def byte_alphabet() -> list[str]:
    """The 256 printable characters standing for bytes 0..255 in byte-level BPE, in vocab order.

    Returns a list ``a`` with ``a[i]`` the character of the i-th byte of GPT-2/CLIP's ordering:
    printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') keep their own character and come first;
    the other 68 bytes (control characters, space, ...) map to U+0100 onward, in byte order.
    Use ``byte_to_char()`` for the byte -> character dict.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_to_char() -> dict[int, str]:
    """byte value (0..255) -> its byte-level BPE character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    order = printable + [b for b in range(256) if b not in printable]
    return dict(zip(order, byte_alphabet()))


def _token_content(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ConfigError(f"tokenizer_config.json: cannot read special token {value!r}; expected a string "
                      "or an object with a 'content' string.")


class CLIPTokenizer:
    """CLIP's tokenizer: texts -> int32 ids ``[B, model_max_length]`` with start/end/pad tokens.

    vocab:   token -> id, the BPE vocabulary of vocab.json (byte-level characters, ``</w>`` marks
             the end of a word); ids 0..len(vocab)-1.
    merges:  BPE merges in priority order, as (left, right) pairs.
    bos/eos/unk/pad_token: token strings, each in ``vocab`` or ``added_tokens``.
    model_max_length: the padded length (77 for CLIP).
    added_tokens: tokens added after the vocabulary (e.g. textual-inversion words), as dicts
             {"content", "id", "special", "normalized", "lstrip", "rstrip", "single_word"}
             (``id`` must continue the vocabulary: len(vocab), len(vocab) + 1, ...). They are
             matched as whole units in the text: special ones in the raw text, others (with
             normalized=True, the default) after lower-casing, as transformers does.
    """

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *,
                 bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN, unk_token: str = EOS_TOKEN,
                 pad_token: str = EOS_TOKEN, model_max_length: int = CONTEXT_LENGTH,
                 added_tokens: Sequence[Mapping] = ()):
        from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        if sorted(self.vocab.values()) != list(range(len(self.vocab))):
            raise ConfigError("CLIPTokenizer: vocabulary ids must be 0..N-1 without gaps or repeats.")
        self.added_tokens = []
        for n, spec in enumerate(sorted(added_tokens, key=lambda t: t["id"])):
            if spec["id"] != len(self.vocab) + n or spec["content"] in self.vocab:
                raise ConfigError(f"CLIPTokenizer: added token {spec['content']!r} has id {spec['id']}; "
                                  f"added tokens must be new and take ids {len(self.vocab)}, "
                                  f"{len(self.vocab) + 1}, ... in order.")
            special = bool(spec.get("special", False))
            flags = {k: bool(spec.get(k, False)) for k in ("lstrip", "rstrip", "single_word")}
            self.added_tokens.append({"content": spec["content"], "id": int(spec["id"]), "special": special,
                                      "normalized": bool(spec.get("normalized", not special)), **flags})
        self._token_to_id = {**self.vocab, **{t["content"]: t["id"] for t in self.added_tokens}}
        for role, tok in (("bos_token", bos_token), ("eos_token", eos_token),
                          ("unk_token", unk_token), ("pad_token", pad_token)):
            if tok not in self._token_to_id:
                raise ConfigError(f"CLIPTokenizer: {role} {tok!r} is not in the vocabulary; fix "
                                  "tokenizer_config.json or the vocabulary.")
        if model_max_length < 2:
            raise ConfigError(f"CLIPTokenizer: model_max_length={model_max_length} leaves no room for "
                              "the start and end tokens; use CLIP's 77.")
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.model_max_length = int(model_max_length)
        self._id_to_token = {i: t for t, i in self._token_to_id.items()}

        backend = Tokenizer(BPE(vocab=self.vocab, merges=self.merges, dropout=None,
                                continuing_subword_prefix="", end_of_word_suffix=EOW,
                                fuse_unk=False, unk_token=unk_token))
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False)])
        for spec in self.added_tokens:          # in id order, so each takes its own id
            flags = {k: spec[k] for k in ("lstrip", "rstrip", "single_word")}
            if spec["special"]:
                backend.add_special_tokens([AddedToken(spec["content"], special=True, normalized=False,
                                                       **flags)])
            else:
                backend.add_tokens([AddedToken(spec["content"], special=False,
                                               normalized=spec["normalized"], **flags)])
            if backend.token_to_id(spec["content"]) != spec["id"]:
                raise ConfigError(f"CLIPTokenizer: added token {spec['content']!r} did not get id "
                                  f"{spec['id']}; the vocabulary and added tokens disagree.")
        # Special tokens are matched in the raw text, case-sensitively (as transformers 5 does,
        # whatever "normalized" flag tokenizer_config.json gives them).
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in dict.fromkeys((bos_token, eos_token, unk_token, pad_token))])
        self._backend = backend

    # -- ids ------------------------------------------------------------------------------------
    @property
    def bos_token_id(self) -> int:
        return self._token_to_id[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self._token_to_id[self.eos_token]

    @property
    def pad_token_id(self) -> int:
        return self._token_to_id[self.pad_token]

    @property
    def unk_token_id(self) -> int:
        return self._token_to_id[self.unk_token]

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the text model's vocab_size must cover it)."""
        return len(self._token_to_id)

    # -- encoding -------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        """The BPE tokens of one text, without start/end tokens and without truncation."""
        return self._backend.encode(text, add_special_tokens=False).tokens

    def encode(self, texts: str | Sequence[str], max_length: int | None = None,
               return_attention_mask: bool = False):
        """Tokenise, frame, truncate and pad.

        texts:      one string or a list of B strings (empty strings are fine); ``bytes`` (as
                    TFDS Text features come back) are decoded as UTF-8.
        max_length: padded length L; defaults to ``model_max_length`` (77).
        Returns ids, int32 ``[B, L]``: ``bos, tokens..., eos, pad...``; a text with more than L - 2
        tokens is cut to its first L - 2 and still ends with eos, with a UserWarning saying how
        many texts were cut and how many tokens were dropped. With return_attention_mask,
        returns ``(ids, mask)``, mask int32 ``[B, L]``: 1 on bos..eos, 0 on padding.
        """
        if isinstance(texts, (str, bytes)):
            texts = [texts]
        try:
            texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
        except UnicodeDecodeError as e:
            raise DataError(f"CLIPTokenizer: a text given as bytes is not UTF-8 ({e.reason} at byte "
                            f"{e.start}); decode it yourself, or pass str.") from None
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise DataError(f"CLIPTokenizer: every text must be a str, got {', '.join(sorted(set(bad)))}.")
        length = self.model_max_length if max_length is None else int(max_length)
        if length < 2:
            raise ConfigError(f"CLIPTokenizer: max_length={length} leaves no room for start and end tokens.")
        ids = np.full((len(texts), length), self.pad_token_id, np.int32)
        mask = np.zeros((len(texts), length), np.int32)
        dropped = []                                      # tokens cut from each long text
        for row, enc in enumerate(self._backend.encode_batch(texts, add_special_tokens=False)):
            body = enc.ids[: length - 2]                  # truncation keeps room for bos and eos
            if len(enc.ids) > len(body):
                dropped.append(len(enc.ids) - len(body))
            n = len(body) + 2
            ids[row, :n] = [self.bos_token_id, *body, self.eos_token_id]
            mask[row, :n] = 1
        if dropped:
            warnings.warn(f"CLIPTokenizer: {len(dropped)} of {len(texts)} text(s) have more than the "
                          f"{length - 2} tokens that fit in {length} positions; {sum(dropped)} token(s) were "
                          f"dropped from their ends (at most {max(dropped)} from one text). Shorten the text "
                          "to keep it whole.", UserWarning, stacklevel=2)
        return (ids, mask) if return_attention_mask else ids

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
        """ids int32 ``[B, L]`` (see ``encode``)."""
        return self.encode(texts, max_length=max_length)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of one id sequence: byte-level characters back to UTF-8, ``</w>`` back to spaces."""
        char_to_byte = {c: b for b, c in byte_to_char().items()}
        specials = {self.bos_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id}
        pieces = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in specials:
                continue
            if i not in self._id_to_token:
                raise DataError(f"CLIPTokenizer.decode: id {i} is outside the vocabulary "
                                f"(size {self.vocab_size}).")
            pieces.append(self._id_to_token[i])
        buf = bytearray()
        for piece in pieces:
            word_end = piece.endswith(EOW)
            body = piece[: -len(EOW)] if word_end else piece
            for c in body:   # added tokens may hold characters outside the byte alphabet
                buf.extend(bytes([char_to_byte[c]]) if c in char_to_byte else c.encode("utf-8"))
            if word_end:
                buf.extend(b" ")
        return buf.decode("utf-8", errors="replace").strip()

    # -- files ----------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> str:
        """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json.

        jaxgen.load_tokenizer and transformers' CLIPTokenizer.from_pretrained both read the folder.
        Returns the folder path.
        """
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.writelines(f"{a} {b}\n" for a, b in self.merges)
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                   "unk_token": self.unk_token, "pad_token": self.pad_token}
        config = {**special, "model_max_length": self.model_max_length, "do_lower_case": True,
                  "errors": "replace", "add_prefix_space": False, "clean_up_tokenization_spaces": False,
                  "tokenizer_class": "CLIPTokenizer"}
        if self.added_tokens:
            config["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                              for t in self.added_tokens}
        for name, value in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                json.dump(value, f, indent=2, ensure_ascii=False)
                f.write("\n")
        return folder

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
                f"bos={self.bos_token!r}, eos={self.eos_token!r}, pad={self.pad_token!r})")


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): the file is corrupt; copy it again.") from e


def _read_merges(path: str) -> list[tuple[str, str]]:
    merges = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if lineno == 1 and line.startswith("#version"):
                continue
            if not line.strip():
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ConfigError(f"{path}:{lineno}: a merge line holds two symbols separated by one "
                                  f"space, found {line!r}.")
            merges.append((parts[0], parts[1]))
    return merges


def _merges_from_json(merges, path: str) -> list[tuple[str, str]]:
    out = []
    for m in merges:
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2:
            raise ConfigError(f"{path}: merge {m!r} is not a pair of symbols.")
        out.append((pair[0], pair[1]))
    return out


def load_tokenizer(folder: str | os.PathLike, *, max_length: int | None = None) -> CLIPTokenizer:
    """Read CLIP's tokenizer from a folder (an SD repo's ``tokenizer/`` or a CLIP model folder).

    folder: holds ``vocab.json`` + ``merges.txt``, or ``tokenizer.json`` (a BPE model), and
            optionally ``tokenizer_config.json`` / ``special_tokens_map.json`` for the special
            tokens (defaults: bos ``<|startoftext|>``, eos/unk/pad ``<|endoftext|>``) and
            ``model_max_length``. Added tokens listed in ``added_tokens.json`` or the config's
            ``added_tokens_decoder`` that lie outside the vocabulary are appended in id order.
    max_length: the padded length; defaults to the config's ``model_max_length``, or 77 (CLIP's
            context length) when the config gives none.
    Returns a CLIPTokenizer: ``tok(texts)`` -> int32 ``[B, max_length]``.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder}: no such folder. Pass the tokenizer folder (vocab.json + merges.txt "
                          "or tokenizer.json), e.g. <sd-repo>/tokenizer.")
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    json_path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
        vocab = _read_json(vocab_path)
        merges = _read_merges(merges_path)
    elif os.path.isfile(json_path):
        model = _read_json(json_path).get("model", {})
        if model.get("type", "BPE") != "BPE" or "vocab" not in model or "merges" not in model:
            raise ConfigError(f"{json_path}: expected a BPE model with 'vocab' and 'merges' "
                              f"(CLIP's tokenizer), found model type {model.get('type')!r}.")
        vocab, merges = model["vocab"], _merges_from_json(model["merges"], json_path)
    else:
        raise ConfigError(f"{folder}: no tokenizer files. CLIP's tokenizer needs vocab.json and "
                          "merges.txt, or tokenizer.json.")
    if not isinstance(vocab, dict):
        raise ConfigError(f"{folder}: the vocabulary must be a JSON object token -> id.")

    cfg = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):   # the config wins
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            cfg.update(_read_json(path))

    vocab = dict(vocab)
    # Added tokens: tokenizer.json's "added_tokens" (transformers 5), tokenizer_config.json's
    # "added_tokens_decoder" (transformers 4) and added_tokens.json (older); those already in the
    # BPE vocabulary with the same id (the start/end tokens) are not "added".
    added: dict[int, dict] = {}
    for token_id, token in (cfg.get("added_tokens_decoder") or {}).items():
        spec = dict(token) if isinstance(token, Mapping) else {"content": _token_content(token)}
        added[int(token_id)] = {**spec, "id": int(token_id)}
    added_path = os.path.join(folder, "added_tokens.json")
    if os.path.isfile(added_path):
        for token, token_id in _read_json(added_path).items():
            added.setdefault(int(token_id), {"content": token, "id": int(token_id)})
    if os.path.isfile(json_path):
        for spec in _read_json(json_path).get("added_tokens") or []:
            added.setdefault(int(spec["id"]), dict(spec))
    extra = [spec for token_id, spec in sorted(added.items()) if vocab.get(spec["content"]) != token_id]

    roles = {}
    for role, default in (("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN),
                          ("unk_token", EOS_TOKEN), ("pad_token", EOS_TOKEN)):
        value = cfg.get(role, default)
        roles[role] = _token_content(value) if value is not None else default
    if max_length is None:
        max_length = cfg.get("model_max_length")
        if not isinstance(max_length, (int, float)) or max_length >= _LARGE:
            max_length = CONTEXT_LENGTH
    return CLIPTokenizer(vocab, merges, model_max_length=int(max_length), added_tokens=extra, **roles)


def train_tokenizer(texts: Iterable[str], vocab_size: int, folder: str | os.PathLike | None = None,
                    *, model_max_length: int = CONTEXT_LENGTH, pad_token: str = EOS_TOKEN,
                    min_frequency: int = 2) -> CLIPTokenizer:
    """Learn a CLIP-format byte-level BPE vocabulary on ``texts`` (e.g. a dataset's captions).

    The vocabulary is laid out as CLIP's: the 256 byte characters, the same with ``</w>``, the
    merge results in merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` (the last two
    ids). vocab_size is the total size, at least 514; a small corpus may support fewer merges,
    giving a smaller vocabulary. folder: where to write vocab.json, merges.txt,
    tokenizer_config.json and special_tokens_map.json (None: do not write).
    Returns the CLIPTokenizer.
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    base = 2 * 256 + 2
    if vocab_size < base:
        raise ConfigError(f"train_tokenizer: vocab_size={vocab_size} is below the {base} symbols every "
                          "CLIP vocabulary holds (bytes, bytes + '</w>', start and end tokens).")
    texts = list(texts)
    model = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix=EOW, unk_token=None))
    model.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    model.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + base, min_frequency=min_frequency,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  end_of_word_suffix=EOW, continuing_subword_prefix="",
                                  special_tokens=[])
    model.train_from_iterator(texts, trainer=trainer)
    learned = _merges_from_json(json.loads(model.to_str())["model"]["merges"], "trained BPE")

    alphabet = byte_alphabet()
    vocab: dict[str, int] = {}
    for tok in [*alphabet, *(c + EOW for c in alphabet)]:
        vocab[tok] = len(vocab)
    merges = []
    for left, right in learned:
        if len(vocab) >= vocab_size - 2:
            break
        merges.append((left, right))
        vocab.setdefault(left + right, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    tok = CLIPTokenizer(vocab, merges, model_max_length=model_max_length, pad_token=pad_token)
    if folder is not None:
        tok.save(folder)
    return tok

"""Byte-level BPE, as Hugging Face ``tokenizers`` runs GPT-2's and LLaMA-3's ``tokenizer.json``.

A language model reads integers. A byte-level BPE tokenizer turns text into them in four steps,
each a few lines below:

1. **Added tokens.** Special strings such as ``<|endoftext|>`` are cut out first and become one
   id each; the pieces between them go through steps 2-3.
2. **Pre-tokenization.** A regular expression splits the text into "words": letters, digits,
   punctuation and whitespace runs, each usually with the space before it (GPT-2:
   ``" world"``). BPE never merges across two words.
3. **Bytes to symbols.** Each word is encoded as UTF-8 and every byte is shown as one printable
   character (`bytes_to_unicode`: ``" "`` becomes ``"Ġ"``), so any text, emoji included, is a
   string over 256 symbols and nothing is ever unknown.
4. **BPE.** Starting from single symbols, repeatedly merge the adjacent pair that comes first in
   the ``merges`` list (the order training learned them in) until no listed pair is left; each
   resulting symbol is looked up in ``vocab``.

Decoding reverses step 3: the symbols of the ids are joined, mapped back to bytes and decoded as
UTF-8 (a cut-off multi-byte character becomes U+FFFD, as in ``tokenizers``).

What is read from ``tokenizer.json``: ``model`` (type ``"BPE"``: ``vocab``, ``merges`` as
``"a b"`` strings or ``["a", "b"]`` pairs, ``ignore_merges``), ``added_tokens``,
``pre_tokenizer`` (GPT-2's ``ByteLevel`` with its built-in pattern, or LLaMA-3's ``Sequence`` of a
``Split`` on a regular expression and a ``ByteLevel`` without one), ``post_processor``
(``ByteLevel``, or a ``TemplateProcessing`` that puts special tokens around the text, LLaMA-3's
``<|begin_of_text|>``) and ``decoder`` (``ByteLevel``). Anything else that would change the
result (a normalizer, BPE dropout, another model type or pre-tokenizer) is refused by name.

The regular expressions use Unicode classes (``\\p{L}``: any letter), which Python's ``re`` does
not know: the ``regex`` package runs them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import regex

__all__ = ["BPETokenizer", "GPT2_PATTERN", "LLAMA3_PATTERN", "bytes_to_unicode"]

#: GPT-2's pre-tokenizer (``tokenizers``' ``ByteLevel(use_regex=True)``): contractions, letters,
#: digits, other symbols, each with one optional leading space; whitespace runs keep their last
#: space for the next word.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

#: LLaMA-3's (and GPT-4's cl100k): case-insensitive contractions, digits in groups of at most 3,
#: newlines kept apart from other whitespace.
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"""
    r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters (one each, all distinct).

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are moved to
    the characters from U+0100 on, in order: byte 32 (space) becomes "Ġ" (U+0120), byte 10
    (newline) "Ċ" (U+010A).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _refuse(what: str, value: Any, supported: str) -> ValueError:
    return ValueError(f"BPETokenizer: {what} {value!r} is not supported (supported: {supported})")


class BPETokenizer:
    """A byte-level BPE tokenizer equal to Hugging Face ``tokenizers`` on GPT-2 and LLaMA-3 files.

    Parameters
    ----------
    vocab : dict of str to int
        Each symbol string (bytes shown through `bytes_to_unicode`) and its id.
    merges : sequence of (str, str)
        The merge rules, earliest (highest priority) first.
    pattern : str
        The pre-tokenizer's regular expression (`GPT2_PATTERN`, `LLAMA3_PATTERN`, ...).
    added_tokens : dict of str to int, optional
        Strings cut out before pre-tokenization, each one id.
    special : iterable of str, optional
        Which added tokens are special (left out by ``decode(..., skip_special_tokens=True)``).
    prefix : sequence of int, optional
        Ids put in front of the text by ``encode(..., add_special_tokens=True)`` (LLaMA-3's
        ``<|begin_of_text|>``).
    add_prefix_space : bool, default False
        Put a space before the text when it does not start with whitespace.
    ignore_merges : bool, default False
        Look a whole word up in ``vocab`` before merging (LLaMA-3 does).

    Examples
    --------
    >>> tok = BPETokenizer({"a": 0, "b": 1, "ab": 2}, [("a", "b")], GPT2_PATTERN)
    >>> tok.encode("abab"), tok.decode([2, 0])
    ([2, 2], 'aba')
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        pattern: str,
        *,
        added_tokens: dict[str, int] | None = None,
        special: Iterable[str] = (),
        prefix: Sequence[int] = (),
        add_prefix_space: bool = False,
        ignore_merges: bool = False,
    ):
        self.vocab = dict(vocab)
        self.ranks = {tuple(pair): i for i, pair in enumerate(merges)}
        self.pattern = regex.compile(pattern)
        self.added_tokens = dict(added_tokens or {})
        self.special = set(special)
        self.prefix = list(prefix)
        self.add_prefix_space = add_prefix_space
        self.ignore_merges = ignore_merges
        self.id_to_token = {i: t for t, i in {**self.vocab, **self.added_tokens}.items()}
        # longest first, so that "<|end|>" never shadows "<|endoftext|>"
        longest = sorted(self.added_tokens, key=len, reverse=True)
        self._added = regex.compile("|".join(map(regex.escape, longest))) if longest else None
        self._byte = bytes_to_unicode()
        self._unbyte = {c: b for b, c in self._byte.items()}
        self._cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ reading tokenizer.json

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        """Read a Hugging Face ``tokenizer.json`` (GPT-2's or LLaMA-3's kind); refuse the rest by name."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"BPETokenizer.from_file: no file {str(path)!r}")
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> BPETokenizer:
        """`from_file`'s work, on the parsed JSON."""
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise _refuse("model type", model.get("type"), "'BPE'")
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key) not in (None, ""):
                raise _refuse(f"model.{key}", model[key], "null")
        if model.get("byte_fallback"):
            raise _refuse("model.byte_fallback", True, "false (byte-level BPE needs no fallback)")
        if spec.get("normalizer") is not None:
            raise _refuse("normalizer", spec["normalizer"].get("type"), "null")
        merges: list[tuple[str, str]] = []
        for m in model["merges"]:  # "a b" (older files) or ["a", "b"]
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            merges.append((a, b))
        pattern, add_prefix_space = _pre_tokenizer(spec.get("pre_tokenizer"))
        _check_decoder(spec.get("decoder"))
        added, special = {}, []
        for token in spec.get("added_tokens") or []:
            if token.get("single_word") or token.get("lstrip") or token.get("rstrip"):
                raise _refuse(
                    f"added token {token['content']!r} option", "single_word/lstrip/rstrip", "false"
                )
            added[token["content"]] = token["id"]
            if token.get("special"):
                special.append(token["content"])
        prefix = _template_prefix(spec.get("post_processor"), {**model["vocab"], **added})
        return cls(
            model["vocab"],
            merges,
            pattern,
            added_tokens=added,
            special=special,
            prefix=prefix,
            add_prefix_space=add_prefix_space,
            ignore_merges=bool(model.get("ignore_merges", False)),
        )

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """The ids of ``text``: added tokens cut out, the rest pre-tokenized and merged word by word."""
        if not isinstance(text, str):
            raise TypeError(f"BPETokenizer.encode: text must be a str, got {type(text).__name__}")
        ids = list(self.prefix) if add_special_tokens else []
        start = 0
        for match in self._added.finditer(text) if self._added else ():
            ids += self._encode_ordinary(text[start : match.start()], start == 0)
            ids.append(self.added_tokens[match.group()])
            start = match.end()
        ids += self._encode_ordinary(text[start:], start == 0)
        return ids

    def _encode_ordinary(self, text: str, at_start: bool) -> list[int]:
        if self.add_prefix_space and at_start and text and not text[0].isspace():
            text = " " + text
        ids: list[int] = []
        for word in self.pattern.findall(text):
            symbols = "".join(self._byte[b] for b in word.encode("utf-8"))
            if symbols not in self._cache:
                self._cache[symbols] = self._bpe(symbols)
            ids += self._cache[symbols]
        return ids

    def _bpe(self, word: str) -> list[int]:
        """Merge the word's symbols, lowest-ranked adjacent pair first, then look them up."""
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get(pair), i) for i, pair in enumerate(zip(parts, parts[1:]))]
            ranked = [(rank, i) for rank, i in pairs if rank is not None]
            if not ranked:
                break
            best = min(ranked)[0]
            a, b = next(pair for pair in zip(parts, parts[1:]) if self.ranks.get(pair) == best)
            merged, i = [], 0
            while i < len(parts):  # every occurrence of (a, b), left to right
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        missing = [p for p in parts if p not in self.vocab]
        if missing:
            raise ValueError(
                f"BPETokenizer: symbol {missing[0]!r} of word {word!r} is not in the vocabulary "
                "(a byte-level vocabulary holds all 256 byte symbols)"
            )
        return [self.vocab[p] for p in parts]

    # ------------------------------------------------------------------ decoding

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """The text of ``ids``: symbols mapped back to bytes, decoded as UTF-8 (U+FFFD for broken ones)."""
        out = bytearray()
        for i in ids:
            token = self.id_to_token.get(int(i))
            if token is None:
                raise ValueError(
                    f"BPETokenizer.decode: id {i} is not in the vocabulary of {len(self)}"
                )
            if skip_special_tokens and token in self.special:
                continue
            if all(c in self._unbyte for c in token):
                out += bytes(self._unbyte[c] for c in token)
            else:  # an added token written as plain text
                out += token.encode("utf-8")
        return out.decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return len(self.id_to_token)

    def __repr__(self) -> str:
        return (
            f"BPETokenizer(vocab={len(self.vocab)}, merges={len(self.ranks)}, "
            f"added_tokens={len(self.added_tokens)})"
        )


def _pre_tokenizer(spec: dict[str, Any] | None) -> tuple[str, bool]:
    """(regular expression, add_prefix_space) of GPT-2's or LLaMA-3's pre-tokenizer."""
    if spec is None:
        raise _refuse("pre_tokenizer", None, "ByteLevel, or Sequence[Split, ByteLevel]")
    if spec["type"] == "ByteLevel":
        if not spec.get("use_regex", True):
            raise _refuse(
                "ByteLevel pre_tokenizer without a Split before it", spec, "use_regex: true"
            )
        return GPT2_PATTERN, bool(spec.get("add_prefix_space", False))
    if spec["type"] == "Sequence":
        parts = spec.get("pretokenizers") or []
        kinds = [p.get("type") for p in parts]
        if kinds == ["Split", "ByteLevel"]:
            split, byte_level = parts
            if split.get("behavior") != "Isolated" or split.get("invert"):
                raise _refuse(
                    "Split", (split.get("behavior"), split.get("invert")), "Isolated, invert false"
                )
            if "Regex" not in split.get("pattern", {}):
                raise _refuse("Split pattern", split.get("pattern"), "a Regex")
            if byte_level.get("use_regex", True):
                raise _refuse("ByteLevel after Split with use_regex", True, "false")
            return split["pattern"]["Regex"], bool(byte_level.get("add_prefix_space", False))
        raise _refuse("pre_tokenizer sequence", kinds, "['Split', 'ByteLevel']")
    raise _refuse("pre_tokenizer", spec["type"], "ByteLevel, or Sequence[Split, ByteLevel]")


def _check_decoder(spec: dict[str, Any] | None) -> None:
    if spec is None or spec.get("type") != "ByteLevel":
        raise _refuse("decoder", None if spec is None else spec.get("type"), "ByteLevel")


def _template_prefix(spec: dict[str, Any] | None, ids: dict[str, int]) -> list[int]:
    """The special-token ids a TemplateProcessing puts before ``$A`` (none after it supported)."""
    if spec is None or spec.get("type") == "ByteLevel":
        return []
    if spec.get("type") == "Sequence":  # LLaMA-3: ByteLevel then TemplateProcessing
        prefix: list[int] = []
        for part in spec.get("processors") or []:
            prefix += _template_prefix(part, ids)
        return prefix
    if spec.get("type") != "TemplateProcessing":
        raise _refuse("post_processor", spec.get("type"), "ByteLevel, TemplateProcessing")
    prefix, seen_text = [], False
    for piece in spec["single"]:
        if "Sequence" in piece:
            seen_text = True
        elif seen_text:
            raise _refuse(
                "TemplateProcessing with special tokens after the text",
                spec["single"],
                "prefix only",
            )
        else:
            name = piece["SpecialToken"]["id"]
            prefix += (
                spec["special_tokens"][name]["ids"]
                if name in spec["special_tokens"]
                else [ids[name]]
            )
    return prefix

"""Character-level language-modelling data: the shipped public-domain corpora and a tokenizer.

Two texts ship with loralab (see ``loralab/data/corpora/SOURCES.md``): the Book of Genesis in the
King James Version (1611) and the first 160 KB of Ambrose Bierce's *The Devil's Dictionary*
(1881-1906). The GPT is pre-trained on the first and adapted with LoRA to the second.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np

from loralab._validate import fraction, one_of, positive_int

__all__ = ["CORPORA", "CHARS", "CharTokenizer", "load_corpus", "Corpus", "get_batch"]

CORPORA = {"genesis": "kjv_genesis.txt", "devil": "devils_dictionary.txt"}
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # newline and printable ASCII: 96 symbols


class CharTokenizer:
    """Characters <-> integer ids over a fixed alphabet (default: newline + printable ASCII, 96 ids).

    Parameters
    ----------
    chars : str
        The alphabet, each character once; the id of a character is its position.

    Examples
    --------
    >>> tok = CharTokenizer()
    >>> tok.encode("Hi!")
    array([41, 74,  2])
    >>> tok.decode(tok.encode("Hi!"))
    'Hi!'
    """

    def __init__(self, chars: str = CHARS):
        if not isinstance(chars, str):
            raise TypeError(
                f"CharTokenizer: chars must be a str, got {chars!r} ({type(chars).__name__})"
            )
        if len(set(chars)) != len(chars):
            raise ValueError(f"CharTokenizer: chars must not repeat a character, got {chars!r}")
        self.chars = chars
        self._index = {c: i for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> int64 ids of shape (len(text),); a character outside the alphabet is an error."""
        try:
            return np.array([self._index[c] for c in text], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(
                f"CharTokenizer.encode: character {exc.args[0]!r} is not in the alphabet"
            ) from None

    def decode(self, ids: np.ndarray) -> str:
        """Int ids of shape (n,) -> a string of n characters."""
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))


@dataclass(frozen=True)
class Corpus:
    """A tokenised text split into a training part and a held-out validation part.

    Attributes
    ----------
    name : str
    train : ndarray of shape (n_train,), int64
    val : ndarray of shape (n_val,), int64
        The last ``val_fraction`` of the text (a contiguous tail, so no sentence leaks across).
    """

    name: str
    train: np.ndarray
    val: np.ndarray


def load_corpus(name: str, *, val_fraction: float = 0.1) -> Corpus:
    """Load a shipped corpus, tokenised with :class:`CharTokenizer`.

    Parameters
    ----------
    name : "genesis" or "devil"
    val_fraction : float in (0, 1)
        Share of the text (its tail) kept for validation.

    Returns
    -------
    Corpus
    """
    one_of("name", name, CORPORA, "load_corpus")
    val_fraction = fraction("val_fraction", val_fraction, "load_corpus")
    text = (
        resources.files("loralab.data")
        .joinpath("corpora")
        .joinpath(CORPORA[name])
        .read_text(encoding="ascii")
    )
    ids = CharTokenizer().encode(text)
    split = len(ids) - int(len(ids) * val_fraction)
    return Corpus(name, ids[:split], ids[split:])


def get_batch(
    ids: np.ndarray, batch_size: int, context_length: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random windows of a token stream and the same windows shifted by one (the targets).

    Parameters
    ----------
    ids : ndarray of shape (n,), int
    batch_size, context_length : int
    rng : numpy.random.Generator

    Returns
    -------
    x, y : ndarrays of shape (batch_size, context_length), int64
        ``y[b, t] == ids[start_b + t + 1]`` is the character that follows ``x[b, t]``.
    """
    batch_size = positive_int("batch_size", batch_size, "get_batch")
    context_length = positive_int("context_length", context_length, "get_batch")
    if len(ids) <= context_length:
        raise ValueError(
            f"get_batch: the stream has {len(ids)} tokens, need more than context_length={context_length}"
        )
    starts = rng.integers(0, len(ids) - context_length, size=batch_size)
    offsets = starts[:, None] + np.arange(context_length)
    return ids[offsets], ids[offsets + 1]

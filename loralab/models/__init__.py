"""Models to adapt with LoRA: a small GPT on the NumPy engine and the character-level corpora it reads."""

from loralab.models.data import CHARS, CharTokenizer, Corpus, get_batch, load_corpus
from loralab.models.gpt import GPT, causal_attention, load_pretrained

__all__ = [
    "GPT",
    "causal_attention",
    "load_pretrained",
    "CharTokenizer",
    "CHARS",
    "Corpus",
    "load_corpus",
    "get_batch",
]

"""Models to adapt with LoRA: a small GPT on the NumPy engine and the character-level corpora it reads,
and the digits MLP of the demo and the tutorials, each with its shipped checkpoint."""

from typing import TYPE_CHECKING, Any

from loralab._deprecated import moved_attribute
from loralab.models.data import CHARS, CharTokenizer, Corpus, get_batch, load_corpus
from loralab.models.digits import load_digits_mlp
from loralab.models.generation import generate
from loralab.models.gpt import GPT, causal_attention, load_gpt
from loralab.models.gpt2 import GPT2
from loralab.models.hf import from_pretrained, save_pretrained
from loralab.models.kv_cache import KVCache
from loralab.models.llama import Llama, LlamaConfig

__all__ = [
    "GPT",
    "GPT2",
    "Llama",
    "LlamaConfig",
    "KVCache",
    "from_pretrained",
    "save_pretrained",
    "generate",
    "causal_attention",
    "load_gpt",
    "load_digits_mlp",
    "CharTokenizer",
    "CHARS",
    "Corpus",
    "load_corpus",
    "get_batch",
]

if not TYPE_CHECKING:  # mypy would otherwise accept any attribute of loralab.models

    def __getattr__(name: str) -> Any:
        """0.1's ``load_pretrained`` (now `load_gpt`) with a DeprecationWarning; removed in 0.3."""
        return moved_attribute(__name__, name)

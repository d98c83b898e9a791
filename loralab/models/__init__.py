"""Models to adapt with LoRA: a small GPT on the NumPy engine and the character-level corpora it reads,
and the digits MLP of the demo and the tutorials, each with its shipped checkpoint."""

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

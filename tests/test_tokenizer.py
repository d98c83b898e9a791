"""loralab.tokenizer: byte-level BPE equal to Hugging Face `tokenizers`, id for id, on awkward text."""

import json

import pytest

from loralab.tokenizer import GPT2_PATTERN, LLAMA3_PATTERN, BPETokenizer, bytes_to_unicode

tokenizers = pytest.importorskip("tokenizers")

TRAIN = [
    "Hello world! It's a test: 123 4567 89012 don't you'll we're they've I'm he'd",
    "naïve café façade Ünïcödé ß straße ΑΒΓ αβγ Привет мир 你好世界 こんにちは",
    "emoji 😀😃🎉 👩‍👩‍👧 flags 🇫🇷 and   runs    of     spaces\n\nnewlines\r\n\ttabs\t\tend",
    "code: def f(x):\n    return x**2 + 3.14159 # comment\n<html><body>&amp;</body></html>",
    "IT'S LOUD, DON'T SHOUT. Mixed-Case_words snake_case CamelCase 2024-12-05 12:34:56",
] * 20

AWKWARD = [
    "",
    " ",
    "Hello world!",
    "  leading and trailing spaces  ",
    "It's, you'll, we'RE, THEY'VE, I'M: contractions in any case",
    "digits 1 12 123 1234 12345 123456 3.14159 1e-10 0x1F",
    "😀 emoji 🎉🎉 and 👩‍👩‍👧 a family, 🇫🇷 a flag",
    "tabs\tand\nnewlines\r\n\n\n  mixed \n\t whitespace",
    "naïve café Ünïcödé 你好世界 Привет",
    "unseen symbols: ∮ ⊕ ∞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and a lone é",
    "special <|endoftext|> in the middle<|endoftext|>and at the end<|endoftext|>",
    "a" * 50 + " " + "ab" * 30,
]


def _gpt2_style(tmp_path):
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator(
        TRAIN, vocab_size=600, min_frequency=1, special_tokens=["<|endoftext|>"]
    )
    path = tmp_path / "gpt2" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return tokenizers.Tokenizer.from_file(str(path)), path


def _llama3_style(tmp_path):
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|endoftext|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TRAIN, trainer)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
            ),
        ]
    )
    path = tmp_path / "llama3" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return tok, path


@pytest.fixture(params=["gpt2", "llama3"])
def pair(request, tmp_path):
    hf, path = (_gpt2_style if request.param == "gpt2" else _llama3_style)(tmp_path)
    return hf, BPETokenizer.from_file(path)


@pytest.mark.parametrize("text", AWKWARD, ids=range(len(AWKWARD)))
def test_encode_equals_tokenizers_id_for_id(pair, text):
    hf, ours = pair
    assert ours.encode(text) == hf.encode(text).ids
    assert (
        ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False).ids
    )


@pytest.mark.parametrize("text", AWKWARD, ids=range(len(AWKWARD)))
def test_decode_equals_tokenizers_and_round_trips(pair, text):
    hf, ours = pair
    ids = hf.encode(text).ids
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip
        )
    assert (
        ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False) == text
    )


def test_a_cut_multibyte_character_decodes_to_the_replacement_character(pair):
    hf, ours = pair
    ids = ours.encode("😀", add_special_tokens=False)
    byte_ids = [ours.vocab[bytes_to_unicode()[b]] for b in "😀".encode()]
    assert ours.decode(byte_ids[:2]) == hf.decode(byte_ids[:2]) == "\ufffd"
    assert ours.decode(ids) == "😀"


def test_bytes_to_unicode_is_a_bijection_onto_printable_characters():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


def test_merges_apply_lowest_rank_first_and_every_occurrence():
    vocab = {c: i for i, c in enumerate("abc")} | {"ab": 3, "bc": 4, "abc": 5}
    # "bc" is learned first: "abc" -> a, bc; then no (a, bc) merge exists
    tok = BPETokenizer(vocab, [("b", "c"), ("a", "b")], GPT2_PATTERN)
    assert tok.encode("abc") == [0, 4]
    tok = BPETokenizer(vocab, [("a", "b"), ("ab", "c")], GPT2_PATTERN)
    assert tok.encode("abcab") == [5, 3]


def test_ignore_merges_looks_the_whole_word_up_first():
    # LLaMA-3's option: a word that is in the vocabulary is one token, whatever the merges give
    vocab = {c: i for i, c in enumerate("abc")} | {"bc": 3, "abc": 4}
    plain = BPETokenizer(vocab, [("b", "c")], GPT2_PATTERN)
    whole = BPETokenizer(vocab, [("b", "c")], GPT2_PATTERN, ignore_merges=True)
    assert plain.encode("abc") == [0, 3] and whole.encode("abc") == [4]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update(normalizer={"type": "NFC"}), "normalizer"),
        (lambda s: s["model"].update(type="WordPiece"), "model type"),
        (lambda s: s["model"].update(dropout=0.1), "dropout"),
        (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer"),
        (lambda s: s.update(decoder={"type": "WordPiece"}), "decoder"),
        (lambda s: s["added_tokens"][0].update(lstrip=True), "lstrip"),
    ],
)
def test_what_would_change_the_result_is_refused_by_name(tmp_path, change, message):
    _, path = _gpt2_style(tmp_path)
    spec = json.loads(path.read_text(encoding="utf-8"))
    change(spec)
    with pytest.raises(ValueError, match=message):
        BPETokenizer.from_dict(spec)


def test_bad_arguments_get_named_errors(pair, tmp_path):
    _, ours = pair
    with pytest.raises(TypeError, match="text must be a str"):
        ours.encode(b"bytes")
    with pytest.raises(ValueError, match="id 99999 is not in the vocabulary"):
        ours.decode([99999])
    with pytest.raises(FileNotFoundError, match="no file"):
        BPETokenizer.from_file(tmp_path / "missing.json")

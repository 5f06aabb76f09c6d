"""msrnn.load_tokenizer against transformers' tokenizers, for both formats:
tokenizer.json (the converted default model) and tokenizer.model (a tiny sentencepiece model)."""

import json

import pytest

import msrnn
from test_convert import book_pages, default_model_dir, gguf_file

DIGITS_AND_SPECIALS = [
    "In 1890, 42 people lived at No. 7; by 2024 there were 3,141,592.",
    "x² + y³ = z½, H₂O at 9 o'clock",
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n",
    "don't  stop\t\tnow\n\n\n   end  ",
]


@pytest.fixture(scope="session")
def converted():
    return default_model_dir()


@pytest.fixture(scope="session")
def tok(converted):
    return msrnn.load_tokenizer(converted)


@pytest.fixture(scope="session")
def hf_tok(converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted)


def test_books_digits_and_special_tokens_match_transformers(tok, hf_tok):
    """msrnn == transformers on the converted directory == transformers' tokenizer built from the
    GGUF itself (for this text: see test_numerals_are_isolated_like_llama_cpp for where the GGUF
    one parts ways)."""
    from transformers import AutoTokenizer

    directory, name = gguf_file()
    gguf_tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    for text in book_pages() + DIGITS_AND_SPECIALS:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text)
        assert ids == gguf_tok.encode(text)
        assert tok.decode(ids) == text == hf_tok.decode(ids)
    digits = tok.encode("In 1890, 42 people")
    assert [tok.decode([i]) for i in digits[:7]] == ["In", " ", "1", "8", "9", "0", ","]


def test_numerals_are_isolated_like_llama_cpp(tok):
    """SmolLM2's pre-tokenizer (GGUF "smollm", StarCoder's) cuts every numeral character (\\p{N})
    out before the GPT-2 regex, so a space never merges into one: " ½" is "Ġ" + "Â½".
    (transformers' GGUF tokenizer does not know "smollm" and keeps the plain GPT-2 regex, which
    reads " ½" as one piece and merges it into "ĠÂ" + "½".)"""
    def spelled(text):
        return [tok.backend.id_to_token(i) for i in tok.encode(text)]

    assert spelled(" ½") == ["Ġ", "Â½"]
    assert spelled("a ² b") == ["a", "Ġ", "Â²", "Ġb"]
    assert spelled("at Ⅻ o'clock")[:3] == ["at", "Ġ", "â"]    # Ⅻ is 3 bytes, no merge with Ġ
    assert spelled(" 1890") == ["Ġ", "1", "8", "9", "0"]


def test_special_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (1, 2, {2})
    assert tok.encode("Hello")[0] != tok.bos_id                 # SmolLM2 adds no BOS
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi"


def test_chat_template_matches_transformers(tok, hf_tok):
    for messages in ([{"role": "user", "content": "What is the capital of France?"}],
                     [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Name a colour."}]):
        for prompt in (True, False):
            assert tok.apply_chat_template(messages, add_generation_prompt=prompt) == \
                hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]).endswith(
        "<|im_start|>assistant\n")


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        msrnn.load_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(error.value)
    assert "tokenizer.json" in str(error.value) and "tokenizer.model" in str(error.value)


# -- sentencepiece ------------------------------------------------------------------------------

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "In 1890, 42 people, said he; but nobody listened!",
             "Hello world\nand a second line",
             "Nowhere, ever: what a place."]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A tiny LLaMA-style sentencepiece model (BPE, byte fallback, digits split, no
    normalization) trained on a few KB of a book, with LLaMA-2's tokenizer_config.json."""
    import sentencepiece

    directory = tmp_path_factory.mktemp("sentencepiece")
    text = book_pages(8000)[1]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_prefix=str(directory / "tokenizer"),
        vocab_size=400, model_type="bpe", byte_fallback=True, split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
              "legacy": False, "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    return str(directory)


def hf_sentencepiece_tokenizer(directory):
    """transformers' sentencepiece-based tokenizer: the slow LlamaTokenizer before version 5. In
    version 5 LlamaTokenizer is built on `tokenizers` (and converting a tokenizer.model to it
    needs protobuf); the sentencepiece one is SentencePieceBackend, told to add BOS. Its
    non-legacy mode also needs protobuf; for text without special tokens the modes agree."""
    try:
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    except ImportError:
        from transformers import LlamaTokenizer

        return LlamaTokenizer.from_pretrained(directory)
    return SentencePieceBackend.from_pretrained(directory, special_tokens_pattern="bos",
                                                legacy=True)


def test_sentencepiece_matches_transformers(sp_dir):
    import sentencepiece

    tok = msrnn.load_tokenizer(sp_dir)
    hf = hf_sentencepiece_tokenizer(sp_dir)
    sp = sentencepiece.SentencePieceProcessor(model_file=f"{sp_dir}/tokenizer.model")
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (1, 2, {2, 5})
    seen = [line for line in book_pages(8000)[1].splitlines() if len(line) > 20][:5]
    for text in SENTENCES + seen:
        ids = tok.encode(text)
        assert ids == hf.encode(text) == [1] + sp.encode(text)          # LLaMA-2 adds BOS
        assert tok.decode(ids, skip_special_tokens=True) == text
    for text in seen:           # SentencePieceBackend cannot decode byte-fallback pieces ("<0x7A>")
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    # What sentencepiece alone decides: byte fallback for unseen characters, leading spaces.
    for text in ["café ü ☃ 1890", "  two  leading spaces", "trailing  "]:
        ids = tok.encode(text)
        assert ids == [1] + sp.encode(text)
        assert tok.decode(ids, skip_special_tokens=True) == text == sp.decode(ids)
    # Special tokens written in the text are single ids; no "▁" is added after them.
    ids = tok.encode("a</s> b")
    assert ids == [1] + sp.encode("a") + [2] + sp.encode("b")
    assert tok.decode(ids) == "<s> a</s> b"


def test_a_template_that_writes_bos_gets_one(sp_dir, tmp_path):
    """A LLaMA-2-style template writes {{ bos_token }} and the tokenizer adds BOS to plain
    text: the chat prompt has one BOS, as transformers' apply_chat_template(tokenize=True)."""
    import shutil

    directory = tmp_path / "chat"
    shutil.copytree(sp_dir, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tok = msrnn.load_tokenizer(str(directory))
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert tok.decode(ids) == "<s>[INST] Hi [/INST]"
    assert tok.encode("Hi")[0] == tok.bos_id                    # plain text still gets its BOS


def test_no_chat_template(sp_dir):
    with pytest.raises(ValueError, match="no chat template"):
        msrnn.load_tokenizer(sp_dir).apply_chat_template([{"role": "user", "content": "Hi"}])

"""The offline default model: GGUF -> Hugging Face checkpoint (msrnn/checkpoint/convert.py).

The converted directory must hold the same model that transformers' own GGUF loader builds from
the same file, and msrnn must run it the same way."""

import fcntl
import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import msrnn
from msrnn.checkpoint import convert
from msrnn import data
from msrnn.prompt import prefill

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / "weights" / "SmolLM2-135M-Instruct"
BOOKS = Path(data.FOLDER)                     # the two books msrnn ships (msrnn/data/)


@functools.lru_cache(maxsize=None)
def default_model_dir() -> str:
    """The converted default model, made once if missing (test_tokenizer.py uses it too).

    Under pytest-xdist every worker asks for it: a lock file beside it lets one convert while
    the others wait, so that no worker replaces the directory while another reads it."""
    DEFAULT_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(DEFAULT_DIR.parent / f".{DEFAULT_DIR.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                  # released when the file closes
        if not (DEFAULT_DIR / "source.json").is_file():
            convert.fetch_default(str(DEFAULT_DIR))
    return str(DEFAULT_DIR)


@functools.lru_cache(maxsize=None)
def gguf_file() -> tuple[str, str]:
    """(directory, file name) of the GGUF, as transformers' `gguf_file=` loaders want them."""
    path = convert.default_gguf()
    return os.path.dirname(path), os.path.basename(path)


def book_pages(n_chars: int = 3000) -> list[str]:
    """A page from the middle of each book in msrnn/data (see its README.md)."""
    books = sorted(BOOKS.glob("*.txt"))
    assert books, f"no books found in {BOOKS}"
    pages = []
    for book in books:
        text = book.read_text(encoding="utf-8")
        middle = len(text) // 2
        pages.append(text[middle:middle + n_chars])
    return pages


@pytest.fixture(scope="session")
def converted():
    return default_model_dir()


@pytest.fixture(scope="session")
def prompt(converted):
    """64 tokens of a book page: [1, 64]."""
    ids = msrnn.load_tokenizer(converted).encode(book_pages()[0])[:64]
    return torch.tensor([ids])


@pytest.fixture(scope="session")
def reference_logits(prompt):
    """Logits of transformers' own GGUF loader (dequantizes and un-permutes on its own)."""
    from transformers import AutoModelForCausalLM

    directory, name = gguf_file()
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(prompt).logits


def test_converted_checkpoint_equals_transformers_gguf_loading(converted, prompt,
                                                                reference_logits):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(prompt).logits
    assert logits.shape == (1, 64, 49152)
    torch.testing.assert_close(logits, reference_logits, atol=1e-3, rtol=0)


def test_msrnn_runs_the_converted_checkpoint_like_transformers(converted, prompt,
                                                               reference_logits):
    model = msrnn.load(converted, dtype=torch.float32)
    with torch.no_grad():
        logits, state = prefill(model, prompt, model.init_state(1, msrnn.policies.Full()))
    torch.testing.assert_close(logits, reference_logits, atol=1e-3, rtol=0)


def test_greedy_answer(converted):
    """The end-to-end check that the weights (q/k permutation included) are right."""
    from transformers import LlamaForCausalLM

    tok = msrnn.load_tokenizer(converted)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = torch.tensor([tok.encode(text)])
    model = LlamaForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    out = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=sorted(tok.eos_ids),
                         pad_token_id=tok.eos_id)
    answer = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."


def test_config(converted):
    config = json.loads((Path(converted) / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"]) == (30, 9, 3, 64)
    assert config["tie_word_embeddings"] is True                  # the GGUF has no output.weight
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 100000.0
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


# -- the q/k permutation --------------------------------------------------------------------------

def to_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter, as its effect on rows: within each head of D rows, Hugging Face's
    row s*D/2 + i (s = 0, 1; i < D/2) becomes row 2i + s. Written as an explicit index map, so
    that it checks convert.unpermute rather than restating it."""
    D = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for s in range(2):
            for i in range(D // 2):
                out[h * D + 2 * i + s] = w[h * D + s * D // 2 + i]
    return out


def rope_rotate_half(x, p, theta=10000.0):
    """Hugging Face's RoPE on one head x [D]: pairs (x_i, x_{i+D/2})."""
    D = x.shape[-1]
    angle = p * theta ** (-np.arange(0, D, 2) / D)
    x1, x2 = x[: D // 2], x[D // 2:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                           x2 * np.cos(angle) + x1 * np.sin(angle)])


def rope_interleaved(x, p, theta=10000.0):
    """llama.cpp's RoPE for LLaMA on one head x [D]: neighbouring pairs (x_{2i}, x_{2i+1})."""
    D = x.shape[-1]
    angle = p * theta ** (-np.arange(0, D, 2) / D)
    even, odd = x[0::2], x[1::2]
    out = np.empty_like(x)
    out[0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[1::2] = odd * np.cos(angle) + even * np.sin(angle)
    return out


@pytest.mark.parametrize("n_heads", [9, 3])                   # q: 9 heads, k: 3 KV heads
def test_unpermute_inverts_llama_cpp_and_matches_its_rope(n_heads):
    rng = np.random.default_rng(0)
    D, C = 64, 40
    w_hf = rng.standard_normal((n_heads * D, C)).astype(np.float32)
    w_gguf = to_llama_cpp(w_hf, n_heads)
    np.testing.assert_array_equal(convert.unpermute(w_gguf, n_heads), w_hf)
    # Why the permutation exists: llama.cpp's interleaved RoPE on its rows computes the same
    # rotated vector as Hugging Face's rotate-half RoPE on the original rows, in its row order.
    x = rng.standard_normal(C)
    for p in (0, 1, 17):
        for h in range(n_heads):
            rows = slice(h * D, (h + 1) * D)
            hf = rope_rotate_half(w_hf[rows] @ x, p)
            cpp = rope_interleaved(w_gguf[rows] @ x, p)
            np.testing.assert_allclose(cpp, to_llama_cpp(hf[:, None], 1)[:, 0], atol=1e-4)


# -- atomic and idempotent ------------------------------------------------------------------------

def test_second_conversion_returns_without_rewriting(converted):
    files = sorted(Path(converted).iterdir())
    before = {f.name: f.stat().st_mtime_ns for f in files}
    assert set(before) >= set(convert.FILES)
    assert convert.convert_gguf(convert.default_gguf(), converted) == converted
    assert {f.name: f.stat().st_mtime_ns for f in sorted(Path(converted).iterdir())} == before


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(reader, config, path):               # half a weights file, then Ctrl-C
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "save_weights", interrupted)
    target = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        convert.convert_gguf(convert.default_gguf(), str(target))
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []                 # the partial folder is gone too


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a conversion made by msrnn"):
        convert.convert_gguf(convert.default_gguf(), str(target))
    assert (target / "notes.txt").read_text() == "mine"

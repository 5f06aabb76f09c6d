"""The code in README.md and docs/policies.md runs as written, on the default model (README's
first block on a tiny one); the Random policy of docs/policies.md is the sanity baseline TOVA
must beat."""

import re
from pathlib import Path

import pytest
import torch

from msrnn.experiments.evaluate import load_chunks, perplexity
from msrnn.policies import TOVA
from test_convert import BOOKS, default_model_dir
from tiny import save, tiny_hf

REPO = Path(__file__).resolve().parent.parent


def python_blocks(name: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (REPO / name).read_text(), re.M | re.S)


@pytest.fixture
def in_repo(monkeypatch, tmp_path):
    default_model_dir()                               # the docs load weights/SmolLM2-...
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("MSRNN_HOME", str(tmp_path))   # an empty model home: the clone's weights/


def test_readme_full_steps_equal_forward(tmp_path):
    """README's first block, "Full steps equal forward", runs as written on a tiny random LLaMA
    in place of the default model: its assert holds. The assert can fail: with TOVA(2) in place
    of Full the steps are not the forward pass."""
    block = python_blocks("README.md")[0]
    assert len(block.strip().splitlines()) == 6 and "msrnn.policies.Full()" in block
    directory = save(tiny_hf("llama", seed=1), tmp_path / "tiny")
    tiny = block.replace('"SmolLM2-135M-Instruct"', repr(directory))
    assert tiny != block
    scope = {}
    exec(tiny, scope)
    assert scope["ys"].shape == (1, scope["ids"].shape[1], scope["model"].vocab_size)
    with pytest.raises(AssertionError):
        exec(tiny.replace("msrnn.policies.Full()", "msrnn.policies.TOVA(2)"), {})


def test_readme_code(in_repo, capsys):
    blocks = python_blocks("README.md")
    assert len(blocks) == 3                                     # Full = forward, first (above)
    scope = {}
    exec(blocks[1], scope)
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "The capital of France is Paris."
    assert out[0].startswith("tensor([[[") and "0," in out[0]   # layer 0 keeps position 0
    exec(blocks[2], scope)                                      # the same inside transformers
    assert capsys.readouterr().out.splitlines()[-1] == "The capital of France is Paris."


def test_policies_doc_and_random_baseline(in_repo, capsys):
    blocks = python_blocks("docs/policies.md")
    assert len(blocks) == 5              # H2O's excerpt, Random, its use, Decayed, PyramidKV
    scope = {}
    for block in blocks[:3]:
        exec(block, scope)
    out = capsys.readouterr().out
    assert "tensor([[[" in out                                  # kept positions were printed
    assert scope["state"].positions(0).shape == (1, 3, 8)       # 12 tokens, 8 kept
    from msrnn.policies import H2O
    assert scope["H2O"].observe.__code__.co_code == H2O.observe.__code__.co_code  # the excerpt
    assert scope["H2O"].score.__code__.co_code == H2O.score.__code__.co_code      # is the code

    # The policy with memory of its own: its buffer is there and was updated.
    exec(blocks[3], scope)
    state = scope["state"]
    assert "torch.Size([1, 3, 9])" in capsys.readouterr().out
    assert state.positions(0).shape == (1, 3, 8)
    assert (state.layers[0].memory["avg"] > 0).any()

    # "Write your own" walks through the example file as it is, below its docstring.
    pyramid = (REPO / "examples" / "policies" / "pyramidkv.py").read_text()
    assert pyramid.split('"""', 2)[2].strip() == blocks[4].strip()

    # What a policy worth its name must do: beat evicting at random.
    model, tok, Random = scope["model"], scope["tok"], scope["Random"]
    chunks = load_chunks(tok, [str(BOOKS / "news-from-nowhere.txt")], 160, max_chunks=2)
    tova, _ = perplexity(model, chunks, TOVA(16))
    random, _ = perplexity(model, chunks, Random(16))
    assert tova < 0.8 * random, (tova, random)
    assert torch.is_tensor(scope["ids"]) and scope["ids"].shape[0] == 1


def test_transformers_doc_policy_check():
    """docs/transformers.md, "Test your policy against transformers": the pytest a user copies
    runs as written (it defines tests; each is called)."""
    blocks = [b for b in python_blocks("docs/transformers.md") if "def test_" in b]
    assert len(blocks) == 1
    scope = {}
    exec(blocks[0], scope)
    tests = [fn for name, fn in scope.items() if name.startswith("test_")]
    assert tests
    for fn in tests:
        fn()

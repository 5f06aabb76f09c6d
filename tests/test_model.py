"""The core: msrnn's decoder (Full policy) equals Hugging Face transformers, and loading fails
clearly on bad checkpoints."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import msrnn
from msrnn import attention
from msrnn.policies import Full, Window
from msrnn.prompt import Mode, parallel_prefix, prefill
from tiny import save, tiny_hf

TOL = 1e-4
T = 48

CASES = {
    # name: (kind, config overrides)
    "llama-mha-untied": ("llama", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa3-headdim-tied": ("llama", dict(hidden_size=48, num_attention_heads=6,
                                              num_key_value_heads=2, head_dim=24,
                                              tie_word_embeddings=True)),
    "llama-gqa4-llama3-rope": ("llama", dict(num_attention_heads=8, num_key_value_heads=2,
                                             rope_theta=500000.0, rope_scaling=dict(
                                                 rope_type="llama3", factor=8.0,
                                                 low_freq_factor=1.0, high_freq_factor=4.0,
                                                 original_max_position_embeddings=32))),
    "llama-mqa-linear-rope": ("llama", dict(num_attention_heads=4, num_key_value_heads=1,
                                            rope_scaling=dict(rope_type="linear", factor=4.0))),
    "mistral-gqa2": ("mistral", dict(sliding_window=None)),
    "mistral-native-window": ("mistral", dict(sliding_window=9)),
    "qwen2-qkv-bias": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2-mqa-tied": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen3-qk-norm": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen3-gqa4-headdim": ("qwen3", dict(num_attention_heads=8, num_key_value_heads=2,
                                         head_dim=12)),
}


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    hf = tiny_hf(kind, **overrides)
    directory = save(hf, tmp_path_factory.mktemp(request.param))
    return hf, msrnn.load(directory)


def tokens(batch=2, length=T, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def test_prefill_equals_transformers(pair):
    hf, model = pair
    ids = tokens()                                     # two rows with different tokens
    logits, state = prefill(model, ids, model.init_state(2, Full()))
    assert logits.shape == (2, T, hf.config.vocab_size)
    assert (logits - hf_logits(hf, ids)).abs().max() <= TOL
    assert state.length == T and state.positions(0).shape == (2, hf.config.num_key_value_heads, T)


def test_steps_equal_transformers(pair):
    hf, model = pair
    ids = tokens()
    state = model.init_state(2, Full(), capacity=16)  # small on purpose: the state must grow
    stepped = torch.stack([model.step(ids[:, t], state)[0] for t in range(T)], 1)
    assert (stepped - hf_logits(hf, ids)).abs().max() <= TOL
    assert state.slots >= T
    assert torch.equal(state.positions(1)[1, 0], torch.arange(T))


def test_prefill_then_steps(pair):
    """A prompt in parallel, then steps, then another parallel chunk: one continuous sequence."""
    hf, model = pair
    ids = tokens()
    state = model.init_state(2, Full())
    a, _ = prefill(model, ids[:, :20], state)
    b = torch.stack([model.step(ids[:, t], state)[0] for t in range(20, 30)], 1)
    c, _ = prefill(model, ids[:, 30:], state)
    assert (torch.cat([a, b, c], 1) - hf_logits(hf, ids)).abs().max() <= TOL


def test_window_equals_mistral_sliding_window(tmp_path):
    """Window(k) attends to the new token and the k before it: Mistral's sliding_window = k + 1.
    msrnn loads the same weights without a native window, so only the policy bounds it."""
    k = 16
    hf = tiny_hf("mistral", sliding_window=k + 1)
    directory = save(hf, tmp_path)
    cfg_path = os.path.join(directory, "config.json")
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "sliding_window": None}, open(cfg_path, "w"))
    model = msrnn.load(directory)
    ids = tokens(batch=2, length=4 * k)
    expected = hf_logits(hf, ids)
    state = model.init_state(2, Window(k))
    stepped = torch.stack([model.step(ids[:, t], state)[0] for t in range(4 * k)], 1)
    assert (stepped - expected).abs().max() <= TOL
    # A sequential prompt of Window runs as one masked parallel pass (Policy.visible).
    empty = model.init_state(2, Window(k))
    assert parallel_prefix(4 * k, empty, Mode.SEQUENTIAL) == (4 * k, True)
    prefilled, state = prefill(model, ids, empty)
    assert (prefilled - expected).abs().max() <= TOL
    pos = state.positions(0)
    assert torch.equal(pos, torch.arange(3 * k, 4 * k).expand_as(pos))
    # ... and without the policy, the unbounded model is not the windowed one.
    assert (model(ids) - expected).abs().max() > 1e-2


def test_sharded_checkpoint_loads_identically(tmp_path):
    hf = tiny_hf("llama")
    single = msrnn.load(save(hf, tmp_path / "single"))
    sharded_dir = save(hf, tmp_path / "sharded", max_shard_size="40KB")
    assert os.path.exists(os.path.join(sharded_dir, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded_dir) if f.endswith(".safetensors")]) > 2
    sharded = msrnn.load(sharded_dir)
    ids = tokens()
    assert torch.equal(single(ids), sharded(ids))


def test_bfloat16_load_is_close(tmp_path):
    hf = tiny_hf("llama")
    model = msrnn.load(save(hf, tmp_path), dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    ids = tokens()
    logits, _ = prefill(model, ids, model.init_state(2, Full()))
    assert (logits.float() - hf_logits(hf, ids)).abs().max() < 0.1


def test_bfloat16_attention_is_computed_in_float32():
    """A bfloat16 model's scores and weighted values come from its q, K and V widened to
    float32 (attention.wide): equal to the float64 attention of the same bfloat16 numbers to
    float32 precision, where scores rounded to bfloat16 would be off by about 1e-3."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 1, 64, generator=g).bfloat16()                  # [B, Hkv, G, T, D]
    keys, values = torch.randn(2, 1, 2, 40, 64, generator=g).bfloat16()      # [B, Hkv, S, D]
    mask = torch.ones(1, 1, 1, 1, 40, dtype=torch.bool)
    a = attention.probabilities(q, keys, mask, scale=0.125)
    exact = attention.probabilities(q.double(), keys.double(), mask, scale=0.125)
    assert a.dtype == torch.float32 and (a - exact).abs().max() < 1e-6
    o = attention.weighted(a, values)
    exact = attention.weighted(exact, values.double())                       # rounded once
    assert o.dtype == torch.bfloat16 and ((o.double() - exact).abs() <= exact.abs() / 256).all()


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def checkpoint(tmp_path):
    return save(tiny_hf("llama"), tmp_path / "ckpt")


def test_missing_directory(tmp_path):
    with pytest.raises(msrnn.checkpoint.loading.CheckpointError, match="model directory not found"):
        msrnn.load(str(tmp_path / "no-such-model"))


def test_missing_config(checkpoint):
    os.remove(os.path.join(checkpoint, "config.json"))
    with pytest.raises(ValueError, match="no config.json in"):
        msrnn.load(checkpoint)


def test_unsupported_model_type(checkpoint):
    path = os.path.join(checkpoint, "config.json")
    json.dump({**json.load(open(path)), "model_type": "gpt2"}, open(path, "w"))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        msrnn.load(checkpoint)


def test_missing_config_key(checkpoint):
    path = os.path.join(checkpoint, "config.json")
    cfg = json.load(open(path))
    del cfg["intermediate_size"]
    json.dump(cfg, open(path, "w"))
    with pytest.raises(ValueError, match="no 'intermediate_size'"):
        msrnn.load(checkpoint)


def test_truncated_safetensors(checkpoint):
    path = os.path.join(checkpoint, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(msrnn.checkpoint.loading.CheckpointError, match="corrupt or truncated"):
        msrnn.load(checkpoint)


def test_weight_of_wrong_shape(checkpoint):
    path = os.path.join(checkpoint, "model.safetensors")
    weights = load_file(path)
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(msrnn.checkpoint.loading.CheckpointError,
                       match=r"'model.layers.1.mlp.up_proj.weight' has shape \[95, 64\], but "
                             r"config.json implies \[96, 64\]"):
        msrnn.load(checkpoint)


def test_missing_weight(checkpoint):
    path = os.path.join(checkpoint, "model.safetensors")
    weights = load_file(path)
    del weights["model.layers.1.self_attn.v_proj.weight"]
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(msrnn.checkpoint.loading.CheckpointError,
                       match="has no weight 'model.layers.1.self_attn.v_proj.weight'"):
        msrnn.load(checkpoint)


def test_unreachable_hub_says_where_to_put_files(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MSRNN_HOME", str(tmp_path))            # a repo id goes to the model home
    with pytest.raises(msrnn.checkpoint.loading.CheckpointError,
                       match=f"to {tmp_path / 'No-Such-Model'}/ and pass that directory"):
        msrnn.load("nobody-here/No-Such-Model")


def test_position_past_the_model_range(tmp_path):
    model = msrnn.load(save(tiny_hf("llama", max_position_embeddings=8), tmp_path))
    state = model.init_state(1, Full())
    prefill(model, tokens(1, 8), state)
    with pytest.raises(ValueError, match="reach position 8, past the model.s range of 8"):
        model.step(torch.tensor([3]), state)
    with pytest.raises(ValueError, match="past the model's range"):
        prefill(model, tokens(1, 9), model.init_state(1, Window(4)))


def test_bad_token_ids(checkpoint):
    model = msrnn.load(checkpoint)
    state = model.init_state(2, Full())
    with pytest.raises(ValueError, match="empty prompt"):
        prefill(model, torch.zeros(2, 0, dtype=torch.long), state)
    with pytest.raises(ValueError, match="batch size 3, but the multi-state was made for 2"):
        model.step(torch.tensor([1, 2, 3]), state)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        model.step(torch.tensor([[1, 2]]), state)
    with pytest.raises(ValueError, match="unknown prompt mode"):
        prefill(model, tokens(2, 4), state, mode="parallel")

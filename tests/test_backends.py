"""One multi-state step, two backends: msrnn's decoder and a transformers model (msrnn.hf.HFBackend)
run the same schedule (msrnn.prompt) over the same step (msrnn.attention), so they must agree.

For a tiny LLaMA and a tiny Qwen3 (float64), every registered policy, both prompt modes and a
ragged batch of three prompts: the logits after each prompt and at each of the following steps,
and the positions every layer keeps after each of them, are the same on both backends. The new
tokens are fixed in advance (not sampled), so one backend's choice never steers the other's.
"""

import pytest
import torch

import msrnn
import msrnn.hf
from msrnn.policies import REGISTRY, from_name
from msrnn.prompt import fill
from tiny import save, tiny_hf

torch.set_num_threads(1)

K = 12
VOCAB = 256
STEPS = 16
LENGTHS = [30, 9, 21]
# transformers computes RoPE's cos/sin in float32, even for a float64 model: agreement is at
# float32's precision, not float64's.
TOL = 1e-5


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def backends(request, tmp_path_factory):
    hf = tiny_hf(request.param, seed=4, vocab_size=VOCAB)
    directory = save(hf, tmp_path_factory.mktemp(request.param))
    return msrnn.load(directory, dtype=torch.float64), msrnn.hf.HFBackend(hf.double())


def rows(seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(VOCAB, generator=g)[:n] for n in LENGTHS]


def run(backend, policy, mode):
    """[(logits [B, V], kept positions per layer)] after the prompts and after each step."""
    g = torch.Generator().manual_seed(11)
    feed = torch.randint(0, VOCAB, (STEPS, len(LENGTHS)), generator=g)
    state, logits = fill(backend, rows(), policy, mode, STEPS)
    layers = state.shape.layers
    out = [(logits, [state.positions(l).tolist() for l in range(layers)])]
    for ids in feed:
        logits, state = backend.step(ids, state)
        out.append((logits, [state.positions(l).tolist() for l in range(layers)]))
    return out


@torch.inference_mode()
@pytest.mark.parametrize("mode", ["oneshot", "sequential"])
@pytest.mark.parametrize("name", list(REGISTRY))
def test_backends_agree(backends, name, mode):
    ours, theirs = backends
    policy = from_name(name, K, 4 if name == "sinks" else None)
    a, b = run(ours, policy, mode), run(theirs, policy, mode)
    for t, ((la, ka), (lb, kb)) in enumerate(zip(a, b)):
        err = (la - lb).abs().max().item()
        assert err <= TOL, f"{name} {mode} step {t}: logits differ by {err:.3g}"
        assert ka == kb, f"{name} {mode} step {t}: kept positions differ"
    if policy.bounded:                       # the test saw evictions, not only growth
        assert len(a[-1][1][0][0][0]) == K


def test_both_backends_stop_on_the_same_tokens(tmp_path):
    """The stop tokens are config.json's eos_token_id with generation_config.json's, by one
    rule (config.stop_tokens) on both backends and in the tokenizer, even where the two files
    disagree."""
    import json

    from msrnn.config import read_stop_tokens
    from tiny import save_char_tokenizer

    hf = tiny_hf("llama", seed=1, vocab_size=VOCAB, eos_token_id=3)
    hf.generation_config.eos_token_id = [5, 7, 3]
    directory = save(hf, tmp_path)
    save_char_tokenizer(directory, VOCAB)
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 3
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == \
        [5, 7, 3]
    ours = msrnn.load(directory).eos_ids
    theirs = msrnn.hf.HFBackend(msrnn.hf.load(directory)).eos_ids
    assert ours == theirs == read_stop_tokens(directory) == [3, 5, 7]
    assert msrnn.load_tokenizer(directory).eos_ids == {3, 5, 7}
    assert msrnn.load(directory).compile_step().eos_ids == [3, 5, 7]


def test_the_default_models_stop_tokens_agree():
    from test_convert import default_model_dir

    directory = default_model_dir()             # made here if missing: no test comes first
    ours = msrnn.load(directory).eos_ids
    assert ours == msrnn.hf.HFBackend(msrnn.hf.load(directory)).eos_ids == [2]
    assert msrnn.load_tokenizer(directory).eos_ids == set(ours)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("training", [False, True])
def test_the_transformers_backend_leaves_the_model_as_it_found_it(implementation, training):
    """HFBackend routes attention through msrnn and runs in eval mode; when it is done (`with`,
    or release()), the model's attention implementation and training mode are its own again."""
    hf = tiny_hf("llama", seed=2, vocab_size=VOCAB, attn_implementation=implementation)
    hf.train(training)
    with msrnn.hf.HFBackend(hf) as backend:
        assert hf.config._attn_implementation == "msrnn_" + implementation
        assert not hf.training
        msrnn.generate(backend, torch.tensor([[1, 2, 3]]), from_name("tova", 2), 3)
    assert hf.config._attn_implementation == implementation
    assert hf.training is training
    backend = msrnn.hf.HFBackend(hf)
    backend.release()
    assert hf.config._attn_implementation == implementation and hf.training is training

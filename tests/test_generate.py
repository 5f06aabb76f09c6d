"""Decoding: sampling, msrnn.generate against transformers, flat memory with a bounded policy."""

import pytest
import torch

import msrnn
from msrnn.generate import sample, stream
from msrnn.policies import TOVA, Full, Window
from tiny import save, tiny_hf


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = tiny_hf("llama")
    return hf, msrnn.load(save(hf, tmp_path_factory.mktemp("gen")))


def test_greedy_full_equals_transformers_generate(pair):
    hf, model = pair
    prompt = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    ours = msrnn.generate(model, prompt, Full(), max_new_tokens=30, eos_ids=set())
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30,
                         min_new_tokens=30, do_sample=False, pad_token_id=0)[:, 10:]
    assert torch.equal(ours, theirs)


def test_window_generate_equals_stepping_by_hand(pair):
    _, model = pair
    prompt = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    ours = msrnn.generate(model, prompt, Window(6), max_new_tokens=20, eos_ids=set(),
                          prompt_mode="sequential")
    state = model.init_state(1, Window(6))
    for t in range(12):
        logits, state = model.step(prompt[:, t], state)
    by_hand = []
    for _ in range(20):
        by_hand.append(logits.argmax(-1))
        logits, state = model.step(by_hand[-1], state)
    assert torch.equal(ours, torch.stack(by_hand, 1))


def test_stops_at_eos(pair):
    _, model = pair
    prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(5))
    free = msrnn.generate(model, prompt, Full(), max_new_tokens=12, eos_ids=set())
    stop = int(free[0, 3])                          # pretend the 4th token is EOS
    ids = msrnn.generate(model, prompt, Full(), max_new_tokens=12, eos_ids={stop})
    first = free[0].tolist().index(stop)
    assert ids[0].tolist() == free[0, : first + 1].tolist()


def test_bounded_memory_stays_flat(pair):
    """TOVA holds k + 1 slots however long the output; Full holds the whole sequence."""
    _, model = pair
    prompt = torch.randint(0, 128, (1, 8))

    def state_bytes(policy, n):
        sizes = {s.nbytes() for _, s in stream(model, prompt, policy, n, eos_ids=set())}
        assert len(sizes) == 1                      # constant during one run
        return sizes.pop()

    assert state_bytes(TOVA(16), 20) == state_bytes(TOVA(16), 200)
    assert state_bytes(Full(), 200) > 5 * state_bytes(Full(), 20)


def test_sampling_is_seeded_and_sane():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits), logits.argmax(-1))
    assert torch.equal(sample(logits, 1.0, top_k=1), logits.argmax(-1))
    assert torch.equal(sample(logits, 1.0, top_p=1e-6), logits.argmax(-1))
    a = sample(logits, 0.8, 10, 0.9, torch.Generator().manual_seed(7))
    b = sample(logits, 0.8, 10, 0.9, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    top10 = logits.topk(10, -1).indices
    draws = torch.stack([sample(logits, 1.0, top_k=10) for _ in range(50)], 1)
    assert all(set(draws[i].tolist()) <= set(top10[i].tolist()) for i in range(3))


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, top_p=0.75, generator=g)) for _ in range(300)}
    assert draws == {0, 1}                          # 0.5 + 0.3 >= 0.75: the rest is cut


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_k=0), "top_k must be a positive integer"),
    (dict(max_new_tokens=-2), "max_new_tokens must be an integer >= 0"),
])
def test_bad_sampling_parameters(pair, kwargs, message):
    _, model = pair
    with pytest.raises(ValueError, match=message):
        msrnn.generate(model, torch.tensor([[1, 2, 3]]), TOVA(8), **kwargs)


def test_empty_prompt(pair):
    _, model = pair
    with pytest.raises(ValueError, match="prompt is empty"):
        msrnn.generate(model, torch.zeros(1, 0, dtype=torch.long), TOVA(8))

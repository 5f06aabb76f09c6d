"""Decoding: sampling, msrnn.generate against transformers, flat memory with a bounded policy."""

import pytest
import torch

import msrnn
import msrnn.hf
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
    prompt = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(6))

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


# ----------------------------------------------------------------------------- past EOS

PROMPT = torch.tensor([[5, 17, 42, 9, 77, 3]])


@pytest.fixture(scope="module")
def early_eos(tmp_path_factory):
    """A tiny model whose own EOS is the second token it writes greedily after PROMPT, on both
    backends: (eos id, its EOS-free greedy run of 24 tokens, {backend name: backend}, a fresh
    transformers copy for reference)."""
    free = msrnn.generate(msrnn.load(save(tiny_hf("llama", eos_token_id=None),
                                          tmp_path_factory.mktemp("free"))),
                          PROMPT, Full(), max_new_tokens=24, eos_ids=set())[0]
    eos = int(free[1])
    assert eos != int(free[0]) and free.tolist().count(eos) < 12   # EOS comes early, not always
    hf = tiny_hf("llama", eos_token_id=eos)
    directory = save(hf, tmp_path_factory.mktemp("early"))
    backends = {"msrnn": msrnn.load(directory),
                "transformers": msrnn.hf.HFBackend(tiny_hf("llama", eos_token_id=eos))}
    return eos, free, backends, hf


@pytest.mark.parametrize("backend", ["msrnn", "transformers"])
def test_eos_ends_early_unless_ignored(early_eos, backend):
    eos, free, backends, _ = early_eos
    model = backends[backend]
    assert model.eos_ids == [eos]
    assert msrnn.generate(model, [PROMPT[0]], Full(), max_new_tokens=24)[0].tolist() == \
        free[:2].tolist()                                    # the model's own EOS ends it
    for n in (1, 7, 24):
        ids = msrnn.generate(model, PROMPT, TOVA(64), max_new_tokens=n, ignore_eos=True)
        assert ids.shape == (1, n) and ids[0].tolist() == free[:n].tolist()   # EOS fed back
        rows = msrnn.generate(model, [PROMPT[0], PROMPT[0, :4]], Full(), max_new_tokens=n,
                              ignore_eos=True)
        assert [len(r) for r in rows] == [n, n]


@pytest.mark.parametrize("backend", ["msrnn", "transformers"])
def test_min_new_tokens_holds_eos_back(early_eos, backend):
    """At least N tokens, none of the first N an EOS: what transformers' own generate gives
    with min_new_tokens=N (its EOS logits are -inf until then)."""
    eos, _, backends, hf = early_eos
    model = backends[backend]
    for n in (3, 10):
        ids = msrnn.generate(model, [PROMPT[0]], Full(), max_new_tokens=30,
                             min_new_tokens=n)[0]
        assert len(ids) >= n and eos not in ids[:n].tolist()
        theirs = hf.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=30,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)[0, 6:]
        assert ids.tolist() == theirs[:len(ids)].tolist()
        assert len(ids) == 30 or ids[-1] == eos
    sampled = [msrnn.generate(model, [PROMPT[0]], Full(), max_new_tokens=12, temperature=1.0,
                              seed=s, min_new_tokens=12)[0] for s in range(5)]
    assert all(len(r) == 12 and eos not in r.tolist() for r in sampled)


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_new_tokens=-1), "min_new_tokens must be an integer >= 0, got -1"),
    (dict(min_new_tokens=2.5), "min_new_tokens must be an integer >= 0, got 2.5"),
    (dict(max_new_tokens=4, min_new_tokens=5), r"min_new_tokens \(5\) must be at most "
     r"max_new_tokens \(4\)"),
    (dict(ignore_eos="yes"), "ignore_eos must be True or False"),
])
def test_bad_lengths(pair, kwargs, message):
    _, model = pair
    with pytest.raises(ValueError, match=message):
        msrnn.generate(model, torch.tensor([[1, 2, 3]]), TOVA(8), **kwargs)

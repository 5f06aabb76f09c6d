"""msrnn.hf: every msrnn policy inside transformers 5, as a Cache (MultiStateCache).

Checked against msrnn's own decoder (LLaMA, Mistral: every registered policy, 200 steps, logits
and kept positions after every step), against tests/reference.py's plain loops (Qwen2, Qwen3,
Phi3, Gemma2: families msrnn's decoder lacks) and against transformers' own DynamicCache (Full),
then on the real default model (generate, Paris), with left padding, in the sequential prompt
mode, and for bad input. Everything that compares numbers runs in float64.
"""

import copy
from pathlib import Path

import pytest
import torch
from transformers import (BertConfig, BertModel, DynamicCache, Gemma2Config, Gemma2ForCausalLM,
                          Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

import msrnn
import msrnn.experiments.evaluate
import msrnn.hf
from msrnn.hf import MultiStateCache
from msrnn.policies import H2O, REGISTRY, TOVA, Full, from_name
from msrnn.prompt import prefill
from reference_families import Reference, Rule
from tiny import save, tiny_hf

torch.set_num_threads(1)     # tiny models: threads only cost (and the machine is shared)

K = 16
STEPS = 200
TOL = 1e-4
VOCAB = 512
REPO = Path(__file__).resolve().parent.parent


def tokens(batch, length, seed=1):
    """Rows without repeated ids (KeyNorm's layer-0 scores would tie on a repeat)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(VOCAB, generator=g)[:length] for _ in range(batch)])


IDS = tokens(1, STEPS)


def kept(cache_or_state, layers):
    return [cache_or_state.positions(l)[0].tolist() for l in range(layers)]


@pytest.fixture(scope="module", params=["llama", "mistral"])
def pair(request, tmp_path_factory):
    """A tiny random HF model (float64) and msrnn's load of the same checkpoint."""
    kind = request.param
    extra = dict(sliding_window=None) if kind == "mistral" else {}
    hf = tiny_hf(kind, seed=0 if kind == "llama" else 2, vocab_size=VOCAB, **extra)
    directory = save(hf, tmp_path_factory.mktemp(kind))
    return hf.double(), msrnn.load(directory, dtype=torch.float64)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    hf = tiny_hf("llama", seed=0, vocab_size=VOCAB)
    directory = save(hf, tmp_path_factory.mktemp("llama1"))
    return hf.double(), msrnn.load(directory, dtype=torch.float64)


# ------------------------------------------------------- every policy vs msrnn's own decoder

@torch.inference_mode()
@pytest.mark.parametrize("name", list(REGISTRY))
def test_steps_equal_msrnn(pair, name):
    """Token by token, 200 steps, k = 16: logits within 1e-4 of msrnn's decoder and the same
    kept positions in every layer after every step."""
    hf, model = pair
    policy = from_name(name, K, 4 if name == "sinks" else None)
    cache, state = MultiStateCache(hf, policy), model.init_state(1, policy)
    layers = hf.config.num_hidden_layers
    for t in range(STEPS):
        ours = hf(IDS[:, t:t + 1], cache=cache).logits[:, -1]
        theirs, state = model.step(IDS[:, t], state)
        err = (ours - theirs).abs().max().item()
        assert err <= TOL, f"{name} step {t}: logits differ by {err:.3g}"
        assert kept(cache, layers) == kept(state, layers), f"{name} step {t}: kept positions"
    assert cache.get_seq_length() == STEPS                 # tokens seen, not kept
    if policy.bounded:
        assert cache.positions(0).shape[-1] == K


# ------------------------------------------------------- families msrnn's decoder lacks

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=4096)


def family(kind):
    """A tiny random model of a family msrnn's own decoder does not load, peaked attention."""
    torch.manual_seed(3)
    if kind == "qwen2":                                  # q/k/v biases
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL))
    elif kind == "qwen3":                                # q/k RMSNorm per head
        model = Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=16))
    elif kind == "phi3":                                 # fused qkv and gate_up
        model = Phi3ForCausalLM(Phi3Config(**SMALL, pad_token_id=0))
    else:                                                # norms, softcaps, scaling, window
        model = Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=16, sliding_window=8,
                                               query_pre_attn_scalar=24, pad_token_id=0,
                                               attn_logit_softcapping=20.0,
                                               final_logit_softcapping=10.0))
    model.eval()
    with torch.no_grad():
        for layer in model.model.layers:
            A = layer.self_attn
            for proj in ((A.qkv_proj,) if hasattr(A, "qkv_proj") else (A.q_proj, A.k_proj)):
                proj.weight.mul_(8)
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.5)
            if hasattr(A, "v_proj") and A.v_proj.bias is not None:
                A.v_proj.bias.normal_(0, 0.5)
            for norm in (getattr(A, "q_norm", None), getattr(A, "k_norm", None)):
                if norm is not None:
                    norm.weight.uniform_(0.5, 1.5)
    return model.double()


FAMILIES = ["qwen2", "qwen3", "phi3", "gemma2"]
FAMILY_STEPS = 48


@torch.inference_mode()
@pytest.mark.parametrize("kind", FAMILIES)
def test_family_full_equals_dynamic_cache(kind):
    """Full: the same logits as transformers' own attention and DynamicCache, token by token and
    for a prompt then steps."""
    theirs = family(kind)
    ours = copy.deepcopy(theirs)
    cache, dyn = MultiStateCache(ours, Full()), DynamicCache(config=theirs.config)
    ids = IDS[:, :FAMILY_STEPS]
    a = ours(ids[:, :10], cache=cache).logits
    b = theirs(ids[:, :10], cache=dyn, use_cache=True).logits
    assert (a - b).abs().max() <= 1e-5
    for t in range(10, FAMILY_STEPS):
        a = ours(ids[:, t:t + 1], cache=cache).logits
        b = theirs(ids[:, t:t + 1], cache=dyn, use_cache=True).logits
        assert (a - b).abs().max() <= 1e-5, f"{kind} step {t}"
    assert ours.config._attn_implementation.startswith("msrnn_")
    assert not theirs.config._attn_implementation.startswith("msrnn")   # the other untouched


@torch.inference_mode()
@pytest.mark.parametrize("policy", ["tova", "h2o"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_family_equals_reference(kind, policy):
    """TOVA and H2O on Qwen2 / Qwen3 / Phi3 / Gemma2 against the plain reference extended to the
    family: logits within 1e-4 and the same kept positions after every step."""
    hf = family(kind)
    ref = Reference(hf, Rule.tova(K) if policy == "tova" else Rule.h2o(K))
    cache = MultiStateCache(hf, TOVA(K) if policy == "tova" else H2O(K))
    for t in range(FAMILY_STEPS):
        ours = hf(IDS[:, t:t + 1], cache=cache).logits[0, -1]
        err = (ours - ref.step(int(IDS[0, t]))).abs().max().item()
        assert err <= TOL, f"{kind} {policy} step {t}: logits differ by {err:.3g}"
        for l in range(ref.n_layers):
            assert cache.positions(l)[0].tolist() == ref.kept(l), f"{kind} step {t} layer {l}"


# ------------------------------------------------------- prompts: sequential, oneshot, padding

@torch.inference_mode()
@pytest.mark.parametrize("name", ["tova", "h2o", "window", "keynorm", "tova-head", "full"])
def test_sequential_equals_msrnn_prefill(llama, name):
    """The first min(T, k + 1) tokens at once, then one at a time, is msrnn's sequential
    prefill: the same logits and kept positions; chunk_nll computes exactly that."""
    hf, model = llama
    policy = from_name(name, K)
    ids = IDS[:, :40]
    theirs, state = prefill(model, ids, model.init_state(1, policy), mode="sequential")
    cache = MultiStateCache(hf, policy)
    n = min(40, K + 1) if policy.bounded else 40
    ours = [hf(ids[:, :n], cache=cache).logits]
    ours += [hf(ids[:, i:i + 1], cache=cache).logits for i in range(n, 40)]
    ours = torch.cat(ours, 1)
    assert (ours - theirs).abs().max() <= TOL
    assert kept(cache, 2) == kept(state, 2)
    nll = msrnn.experiments.evaluate.chunk_nll(msrnn.hf.HFBackend(hf), ids, policy)
    expect = torch.nn.functional.cross_entropy(theirs[0, :-1].float(), ids[0, 1:],
                                               reduction="none")
    assert nll.shape == (1, 39) and (nll[0] - expect).abs().max() <= 1e-4


@torch.inference_mode()
@pytest.mark.parametrize("mode", ["oneshot", "sequential"])
def test_generate_equals_msrnn_generate(llama, mode):
    """msrnn.generate on the transformers backend, in both prompt modes, gives msrnn.generate's
    greedy tokens on msrnn's decoder."""
    hf, model = llama
    prompt = IDS[:, :30]
    ours = msrnn.generate(msrnn.hf.HFBackend(hf), prompt, TOVA(K), max_new_tokens=20,
                          prompt_mode=mode, eos_ids=[])
    theirs = msrnn.generate(model, prompt, TOVA(K), max_new_tokens=20, prompt_mode=mode,
                            eos_ids=[])
    assert ours.shape == (1, 20) and ours.tolist() == theirs.tolist()


@torch.inference_mode()
@pytest.mark.parametrize("name", ["tova", "h2o", "keynorm", "sinks"])
def test_oneshot_equals_msrnn(llama, name):
    """A prompt in one forward is msrnn's oneshot prefill; decoding then goes on step by step;
    the deprecated past_key_values= keyword works too."""
    hf, model = llama
    policy = from_name(name, K, 4 if name == "sinks" else None)
    ids = IDS[:, :50]
    theirs, state = prefill(model, ids[:, :40], model.init_state(1, policy), mode="oneshot")
    cache = MultiStateCache(hf, policy)
    ours = hf(ids[:, :40], past_key_values=cache).logits
    assert (ours - theirs).abs().max() <= TOL and kept(cache, 2) == kept(state, 2)
    for t in range(40, 50):
        a = hf(ids[:, t:t + 1], cache=cache).logits[:, -1]
        b, state = model.step(ids[:, t], state)
        assert (a - b).abs().max() <= TOL and kept(cache, 2) == kept(state, 2)


@torch.inference_mode()
@pytest.mark.parametrize("name", ["tova", "h2o"])
def test_left_padded_batch_equals_rows(llama, name):
    """Greedy generate on a left-padded batch of 3 prompts of different lengths: every row is
    its batch-1 run (pads never enter the multi-state, positions come from the mask)."""
    hf, _ = llama
    lengths = [30, 9, 21]
    rows = [tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    T = max(lengths)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    kw = dict(max_new_tokens=25, do_sample=False, pad_token_id=0, eos_token_id=None)
    cache = MultiStateCache(hf, from_name(name, K))
    batch = hf.generate(ids, attention_mask=mask, cache=cache, **kw)[:, T:]
    for i, r in enumerate(rows):
        one = MultiStateCache(hf, from_name(name, K))
        alone = hf.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long),
                            cache=one, **kw)[:, len(r):]
        assert batch[i].tolist() == alone[0].tolist(), f"row {i}"
        for l in range(2):
            p = cache.positions(l)[i]
            assert p[p >= 0].view(2, -1).tolist() == one.positions(l)[0].tolist()


@torch.inference_mode()
def test_generate_real_model_oneshot_paris():
    """TOVA(32) on the default model: transformers' own generate with a MultiStateCache (the
    oneshot prompt) gives msrnn's greedy tokens, and answers Paris."""
    from test_convert import default_model_dir

    directory = default_model_dir()
    tok = msrnn.load_tokenizer(directory)
    prompt = torch.tensor([tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]))])
    hf = msrnn.hf.load(directory, dtype=torch.float32)
    eos = [tok.eos_id]
    with MultiStateCache(hf, TOVA(32)) as cache:
        ours = hf.generate(prompt, attention_mask=torch.ones_like(prompt), cache=cache,
                           max_new_tokens=12, do_sample=False,
                           eos_token_id=eos)[:, prompt.shape[1]:]
    model = msrnn.load(directory, dtype=torch.float32)
    theirs = msrnn.generate(model, prompt, TOVA(32), max_new_tokens=12, prompt_mode="oneshot",
                            eos_ids=eos)
    assert ours.tolist() == theirs.tolist()
    assert "Paris" in tok.decode(ours[0].tolist())


# ------------------------------------------------------- bad input, other models unharmed

@torch.inference_mode()
def test_bad_input(llama, tmp_path):
    hf, _ = llama
    with pytest.raises(TypeError, match="msrnn.policies.Policy"):
        MultiStateCache(hf, "tova")
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, vocab_size=50))
    with pytest.raises(ValueError, match="decoder-only causal LM"):
        MultiStateCache(bert, TOVA(8))
    with pytest.raises(ValueError, match="never evict"):
        MultiStateCache(hf, TOVA(5000))
    cache = MultiStateCache(hf, TOVA(K))
    hf(IDS[:, :5], cache=cache)
    with pytest.raises(ValueError, match="empty cache"):
        hf(IDS[:, 5:8], cache=cache)
    with pytest.raises(ValueError, match="batch"):
        hf(tokens(2, 1), cache=cache)
    # One cache, two models: refused, whether or not the other model was prepared.
    other = tiny_hf("llama", seed=5, vocab_size=VOCAB).double()
    cache = MultiStateCache(hf, TOVA(K))
    with pytest.raises(ValueError, match="another model"):
        other(IDS[:, :3], cache=cache)
    MultiStateCache(other, TOVA(K))
    with pytest.raises(ValueError, match="another model"):
        other(IDS[:, :3], cache=MultiStateCache(hf, TOVA(K)))


@torch.inference_mode()
def test_prepared_model_still_runs_without_the_cache(llama):
    """A prepared model called without a MultiStateCache (no cache, DynamicCache, padding)
    computes what transformers' own attention computes; other models are untouched."""
    hf, _ = llama
    plain = tiny_hf("llama", seed=0, vocab_size=VOCAB).double()
    MultiStateCache(hf, TOVA(K))
    ids = IDS[:, :20].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    assert (hf(ids, attention_mask=mask).logits - plain(ids, attention_mask=mask).logits)[
        mask.bool()].abs().max() <= 1e-9
    a = hf.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    b = plain.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert a.tolist() == b.tolist()
    assert not plain.config._attn_implementation.startswith("msrnn")


# ------------------------------------------------------- scoped: threads, restore, beams

@torch.inference_mode()
def test_two_threads_two_models_never_cross():
    """Two threads, each with its own model and MultiStateCache, generate at the same time;
    each gives what it gives alone (the layer reaches the attention function through the
    forward's own arguments, never through shared state)."""
    import threading

    models = [tiny_hf("llama", seed=s, vocab_size=VOCAB).double() for s in (0, 5)]
    prompts = [IDS[:, :30], IDS[:, 40:70]]
    kw = dict(max_new_tokens=40, do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(i, out):
        with MultiStateCache(models[i], TOVA(K)) as cache:
            out[i] = models[i].generate(prompts[i], attention_mask=torch.ones_like(prompts[i]),
                                        cache=cache, **kw)

    alone = {}
    for i in range(2):
        run(i, alone)
    together = {}
    threads = [threading.Thread(target=run, args=(i, together)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert alone[0].tolist() != alone[1].tolist()
    for i in range(2):
        assert together[i].tolist() == alone[i].tolist(), f"thread {i}"


@torch.inference_mode()
def test_the_model_is_left_as_it_was_found():
    """After `with MultiStateCache(...)`, the model's attention implementation is its own again,
    and its plain forward equals an untouched copy's, padding included."""
    hf = tiny_hf("llama", seed=0, vocab_size=VOCAB).double()
    plain = copy.deepcopy(hf)
    before = hf.config._attn_implementation
    with MultiStateCache(hf, H2O(K)) as cache:
        assert hf.config._attn_implementation == "msrnn_" + before
        hf.generate(IDS[:, :20], attention_mask=torch.ones(1, 20, dtype=torch.long),
                    cache=cache, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert hf.config._attn_implementation == before
    ids = IDS[:, :20].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    assert torch.equal(hf(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)


BEAMS = dict(num_beams=3, num_return_sequences=3, max_new_tokens=12, do_sample=False,
             pad_token_id=0, eos_token_id=None, length_penalty=0.0, early_stopping=False)


@torch.inference_mode()
def test_beam_search_with_full_equals_transformers(llama):
    hf, _ = llama
    prompt = IDS[:, :20]
    mask = torch.ones_like(prompt)
    theirs = hf.generate(prompt, attention_mask=mask, **BEAMS)
    with MultiStateCache(hf, Full()) as cache:
        ours = hf.generate(prompt, attention_mask=mask, cache=cache, **BEAMS)
    assert ours.tolist() == theirs.tolist()


@torch.inference_mode()
@pytest.mark.parametrize("name", ["tova", "h2o"])
def test_beam_search_each_beam_keeps_its_own_multi_state(llama, name):
    """Bounded beam search: each returned beam's score (the sum of its tokens' log-probabilities,
    length_penalty 0) is what a fresh multi-state fed that beam's tokens gives, so every beam's
    multi-state followed its own history through the reorderings."""
    hf, _ = llama
    prompt = IDS[:, :40]
    with MultiStateCache(hf, from_name(name, K)) as cache:
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), cache=cache,
                          output_scores=True, return_dict_in_generate=True, **BEAMS)
    assert len({tuple(s) for s in out.sequences.tolist()}) == 3
    for seq, score in zip(out.sequences, out.sequences_scores):
        with MultiStateCache(hf, from_name(name, K)) as fresh:
            logits = hf(seq[None, :40], cache=fresh).logits[0, -1]
            total = 0.0
            for t in range(40, len(seq)):
                total += torch.log_softmax(logits, -1)[seq[t]].item()
                logits = hf(seq[None, t:t + 1], cache=fresh).logits[0, -1]
        assert abs(total - score.item()) <= 1e-4, (total, score.item())   # scores: float32

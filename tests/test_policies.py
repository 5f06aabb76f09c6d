"""msrnn's compression policies against an independent reference (tests/reference.py: plain
Python lists and loops over a Hugging Face model's weights, no msrnn code), and against
Hugging Face's own attention matrices for the `oneshot` prompt mode.

After every step, in every layer (and KV head), the positions msrnn keeps must be exactly the
reference's, and the logits must agree; sequential prefill must be exactly stepping; oneshot
must keep what docs/design.md says; property tests check bounds, order, Full, and batch rows.
Everything runs in float64 so that near-ties cannot make a comparison flaky.
"""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import msrnn
from msrnn.policies import REGISTRY, TOVA, Sinks, Window, from_name
from msrnn.prompt import prefill, prefill_shared
from reference_families import Reference, Rule, oneshot_keep
from tiny import save, tiny_hf

K = 16            # multi-state size of the reference runs
STEPS = 210       # tokens per reference run (>> K: about 190 evictions per layer)
TOL = 1e-4        # logits, msrnn vs the reference (float64; msrnn and HF norm in float32)
EXACT = 1e-9      # logits, msrnn vs msrnn computed another way (parallel prefill vs steps)
VOCAB = 512       # tokens never repeat within a run (see `tokens`)


RULES = {   # every name of the policy registry, and TOVA+i, as the reference's rules
    "full": lambda size, sinks: Rule.full(),
    "window": lambda size, sinks: Rule.window(size),
    "sinks": lambda size, sinks: Rule.sinks_(size, sinks),
    "h2o": lambda size, sinks: Rule.h2o(size),
    "h2o-layer": lambda size, sinks: Rule.h2o_layer(size),
    "tova": lambda size, sinks: Rule.tova(size),
    "tova-head": lambda size, sinks: Rule.tova_head(size),
    "keynorm": lambda size, sinks: Rule.keynorm(size),
    "tova-sinks": lambda size, sinks: Rule.tova(size, sinks=sinks),
}


def make(name, size=K, sinks=4):
    """The msrnn policy (from the registry the command line uses) and the reference's Rule for
    one policy name (docs/design.md's table)."""
    if name == "tova-sinks":
        return TOVA(size, sinks=sinks), RULES[name](size, sinks)
    return from_name(name, size, sinks if name == "sinks" else None), RULES[name](size, sinks)


def test_every_registered_policy_has_a_reference_rule():
    assert set(REGISTRY) <= set(RULES), set(REGISTRY) - set(RULES)


BOUNDED = [n for n in RULES if n != "full"]
LAYERWISE = {"window", "sinks", "h2o-layer", "tova", "tova-sinks"}   # one choice per layer


def tokens(batch, length, seed=1):
    """[batch, length] token ids, no id twice in a row: layer 0's key depends on the token
    alone and RoPE keeps its norm, so a repeated token would tie KeyNorm's scores exactly in
    theory and only up to rounding in practice, and rounding is not the tie rule."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(VOCAB, generator=g)[:length] for _ in range(batch)])


IDS = tokens(1, STEPS)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random LLaMA with GQA (2 layers, width 64, 4 query heads, 2 KV heads, vocabulary
    512, peaked attention): the HF model in float64, msrnn's load of it, and its directory."""
    hf = tiny_hf("llama", seed=0, vocab_size=VOCAB)
    directory = save(hf, tmp_path_factory.mktemp("llama"))
    return hf.double(), msrnn.load(directory, dtype=torch.float64), directory


def positions(state):
    """Every layer's kept positions for batch row 0: [layer][KV head] -> list of positions."""
    return [state.positions(l)[0].tolist() for l in range(len(state.layers))]


class Run:
    """One policy stepped STEPS times by msrnn and by the reference, step by step."""

    def __init__(self, hf, model, name):
        policy, rule = make(name)
        state, ref = model.init_state(1, policy), Reference(hf, rule)
        self.logits, self.positions, self.ref_logits, self.ref_positions = [], [], [], []
        for t in range(STEPS):
            out, state = model.step(IDS[:, t], state)
            self.logits.append(out[0])
            self.positions.append(positions(state))
            self.ref_logits.append(ref.step(int(IDS[0, t])))
            self.ref_positions.append([ref.kept(l) for l in range(ref.n_layers)])


@pytest.fixture(scope="module")
def runs(llama):
    hf, model, _ = llama
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Run(hf, model, name)
        return cache[name]
    return get


def assert_same_run(positions, ref_positions, logits, ref_logits, tol=TOL, start=0):
    """Step by step: logits within tol, positions exactly equal; says at which step they part."""
    assert len(positions) == len(ref_positions) == len(logits) == len(ref_logits)
    for i in range(len(positions)):
        err = (logits[i] - ref_logits[i]).abs().max().item()
        assert err <= tol, f"step t={start + i}: logits differ by {err:.3g}"
        assert positions[i] == ref_positions[i], (f"step t={start + i}: kept positions differ\n"
                                                  f" msrnn: {positions[i]}\n"
                                                  f" ref:   {ref_positions[i]}")


def step_along(model, state, ref, ids, start=0):
    """Step msrnn (from `state`) and the reference through ids [1, n] together; after every step
    the kept positions must be equal and the logits within TOL. Returns the last positions."""
    got_pos, got_logits, want_pos, want_logits = [], [], [], []
    for t in range(ids.shape[1]):
        out, state = model.step(ids[:, t], state)
        got_logits.append(out[0])
        got_pos.append(positions(state))
        want_logits.append(ref.step(int(ids[0, t])))
        want_pos.append([ref.kept(l) for l in range(ref.n_layers)])
    assert_same_run(got_pos, want_pos, got_logits, want_logits, start=start)
    return got_pos[-1]


# ------------------------------------------------------------------- stepping vs the reference

@pytest.mark.parametrize("name", BOUNDED)
def test_steps_equal_reference(runs, name):
    """After every one of 210 steps, every layer's (and KV head's) kept positions are exactly the
    reference's, and the logits agree within 1e-4."""
    run = runs(name)
    assert_same_run(run.positions, run.ref_positions, run.logits, run.ref_logits)
    # The run really evicted: every layer holds K states, and not just the last K tokens
    # (except Window, which must).
    last = run.positions[-1]
    assert all(len(head) == K for layer in last for head in layer)
    recent = list(range(STEPS - K, STEPS))
    assert all(head == recent for layer in last for head in layer) == (name == "window")
    if name in LAYERWISE:
        assert all(layer[0] == layer[g] for layer in last for g in range(len(layer)))


def test_headwise_policies_differ_between_kv_heads(runs):
    """A sanity check of the setup: head-wise H2O and TOVA-head do make different choices for the
    two KV heads at some step (otherwise per-head bookkeeping would go untested)."""
    for name in ("h2o", "tova-head"):
        assert any(layer[0] != layer[1] for step in runs(name).positions for layer in step), name


@pytest.mark.parametrize("prompt", [10, K + 1, 40])
@pytest.mark.parametrize("name", BOUNDED)
def test_sequential_prefill_equals_stepping(llama, runs, name, prompt):
    """prefill(mode="sequential") is exactly `prompt` steps: the same kept positions and the
    same logits (to rounding), and stepping on from it stays the same for 20 more tokens."""
    _, model, _ = llama
    run = runs(name)
    policy, _ = make(name)
    logits, state = prefill(model, IDS[:, :prompt], model.init_state(1, policy), mode="sequential")
    assert logits.shape == (1, prompt, VOCAB)
    assert positions(state) == run.positions[prompt - 1]
    err = (logits[0] - torch.stack(run.logits[:prompt])).abs().max().item()
    assert err <= EXACT, f"prompt logits differ from stepping by {err:.3g}"
    got_pos, got_logits = [], []
    for t in range(prompt, prompt + 20):
        out, state = model.step(IDS[:, t], state)
        got_logits.append(out[0])
        got_pos.append(positions(state))
    assert_same_run(got_pos, run.positions[prompt:prompt + 20], got_logits,
                    run.logits[prompt:prompt + 20], tol=EXACT, start=prompt)


@pytest.mark.parametrize("name", ["full", *BOUNDED])
def test_a_prompt_in_blocks_of_queries_is_the_same_pass(llama, runs, name, monkeypatch):
    """attention.fused attends a prompt's queries QUERY_BLOCK at a time, each block to only the
    keys it may see. In blocks of 7 (a 60-token prompt in 9 blocks, the window's keys a few
    blocks back): a sequential prompt is still exactly stepping, and a oneshot prompt keeps the
    same states with the same logits as in one block."""
    from msrnn import attention
    _, model, _ = llama
    policy, _ = make(name)
    ids = IDS[:, :60]
    whole, state = prefill(model, ids, model.init_state(1, policy), mode="oneshot")
    kept = positions(state)
    monkeypatch.setattr(attention, "QUERY_BLOCK", 7)
    logits, state = prefill(model, ids, model.init_state(1, policy), mode="sequential")
    assert positions(state) == runs(name).positions[59]
    assert (logits[0] - torch.stack(runs(name).logits[:60])).abs().max().item() <= EXACT
    logits, state = prefill(model, ids, model.init_state(1, policy), mode="oneshot")
    assert positions(state) == kept
    assert (logits - whole).abs().max().item() <= EXACT


# ------------------------------------------------------------------------------------ oneshot

PROMPT, MORE = tokens(1, 70, seed=7).split([40, 30], 1)


@pytest.fixture(scope="module")
def hf_attentions(llama):
    """Hugging Face's own causal attention on PROMPT (eager attention, float64): a list over
    layers of [H, T, T], its logits [T, V], and its cached keys' L2 norms per layer as
    [H_kv][T] (for KeyNorm)."""
    _, _, directory = llama
    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                              dtype=torch.float64).eval()
    with torch.no_grad():
        out = hf(PROMPT, output_attentions=True, use_cache=True)
    norms = [layer.keys[0].norm(dim=-1).tolist() for layer in out.past_key_values.layers]
    return [a[0] for a in out.attentions], out.logits[0], norms


def test_oneshot_tova_keeps_top_k_of_hf_last_row(llama, hf_attentions):
    """TOVA oneshot: each layer keeps exactly the K positions with the highest attention from the
    last prompt token, averaged over all query heads, as Hugging Face computes that attention."""
    _, model, _ = llama
    attentions, hf_logits, _ = hf_attentions
    logits, state = prefill(model, PROMPT, model.init_state(1, TOVA(K)), mode="oneshot")
    assert (logits[0] - hf_logits).abs().max() <= TOL     # the prompt ran with full attention
    for l, att in enumerate(attentions):
        row = att[:, -1, :].mean(0)                        # [T]: mean over all heads
        ranked = row.sort(descending=True).values
        assert ranked[K - 1] - ranked[K] > 1e-6, "near-tie at the cut: pick another seed"
        expected = row.topk(K).indices.sort().values
        got = state.positions(l)[0]                        # [H_kv, K], the same for each head
        assert torch.equal(got, expected.expand_as(got)), f"layer {l}"
    assert any(positions(state)[l][0] != list(range(40 - K, 40)) for l in range(len(attentions)))


@pytest.mark.parametrize("name", BOUNDED)
def test_oneshot_keeps_what_design_says(llama, hf_attentions, name):
    """oneshot for every policy, from Hugging Face's attention matrices: Window keeps the last K,
    Sinks the first i and the last K - i, TOVA(-head, +i) the best by the last row (mean over all
    heads / the KV head's group; sinks kept), H2O(-layer) the K//2 most recent plus the best of
    the rest by column sums (mean over the KV head's group / all heads), KeyNorm the smallest
    key norms. Ties keep the newer."""
    _, model, _ = llama
    attentions, _, norms = hf_attentions
    policy, rule = make(name)
    _, state = prefill(model, PROMPT, model.init_state(1, policy), mode="oneshot")
    n_kv = model.cfg.n_kv_heads
    for l, att in enumerate(attentions):
        expected = oneshot_keep(att, rule, n_kv, norms[l])
        assert positions(state)[l] == expected, f"layer {l}"
        if name == "window":
            assert expected == [list(range(40 - K, 40))] * n_kv
        if name == "sinks":
            assert expected == [list(range(4)) + list(range(40 - K + 4, 40))] * n_kv


@pytest.mark.parametrize("name", BOUNDED)
def test_oneshot_then_steps_equal_reference(llama, hf_attentions, name):
    """The reference's own oneshot (full causal attention by stepping without eviction, then the
    same ranking) keeps the same as Hugging Face's attention says, and decoding on from msrnn's
    oneshot state matches the reference for 30 steps (H2O goes on from the column sums)."""
    hf, model, _ = llama
    attentions, _, norms = hf_attentions
    policy, rule = make(name)
    logits, state = prefill(model, PROMPT, model.init_state(1, policy), mode="oneshot")
    ref = Reference(hf, rule)
    ref_logits = ref.oneshot(PROMPT[0].tolist())
    assert (logits[0] - ref_logits).abs().max() <= TOL
    for l, att in enumerate(attentions):
        assert ref.kept(l) == oneshot_keep(att, rule, model.cfg.n_kv_heads, norms[l]), \
            f"layer {l}"
    assert positions(state) == [ref.kept(l) for l in range(ref.n_layers)]
    more = MORE
    step_along(model, state, ref, more, start=40)


# ---------------------------------------------------------------------------------- sinks

@pytest.mark.parametrize("policy,sinks", [(Sinks(8, sinks=4), 4), (TOVA(8, sinks=3), 3),
                                          (Sinks(5, sinks=1), 1)])
def test_sinks_are_never_evicted(llama, policy, sinks):
    """Over 300 steps (two different rows), every layer's kept positions start with 0..i-1."""
    _, model, _ = llama
    ids = tokens(2, 300, seed=3)
    state = model.init_state(2, policy)
    for t in range(300):
        _, state = model.step(ids[:, t], state)
        for l in range(model.cfg.n_layers):
            pos = state.positions(l)
            head = torch.arange(min(sinks, t + 1)).expand(*pos.shape[:2], -1)
            assert torch.equal(pos[..., :head.shape[-1]], head), f"t={t} layer {l}: {pos}"
            if isinstance(policy, Sinks) and t + 1 > policy.size:   # and a window after them
                tail = torch.arange(t + 1 - (policy.size - sinks), t + 1)
                assert torch.equal(pos[..., sinks:], tail.expand(*pos.shape[:2], -1))


# ----------------------------------------------------------------------------------- ties

@pytest.fixture(scope="module")
def uniform(tmp_path_factory):
    """A tiny LLaMA whose queries are zero: every attention row is exactly uniform, so every
    TOVA score ties (1/|C| for each candidate) and only the tie rule decides."""
    hf = tiny_hf("llama", seed=3, vocab_size=VOCAB)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.zero_()
    directory = save(hf, tmp_path_factory.mktemp("uniform"))
    return hf.double(), msrnn.load(directory, dtype=torch.float64)


@pytest.mark.parametrize("name", ["tova", "tova-head", "tova-sinks", "h2o", "h2o-layer"])
def test_ties_break_toward_the_oldest(uniform, name):
    """docs/design.md: "ties break toward the oldest position". With all TOVA scores equal, TOVA(k)
    must evict like Window(k) and TOVA(k, sinks=i) like Sinks(k, i), after every step; H2O must
    match the reference (which implements the rule literally). In oneshot, ties keep the newer:
    TOVA keeps the last k (and the sinks)."""
    hf, model = uniform
    k, steps = 8, 40
    policy, rule = make(name, size=k, sinks=2)
    ids = tokens(1, steps, seed=4)
    state, ref = model.init_state(1, policy), Reference(hf, rule)
    for t in range(steps):
        _, state = model.step(ids[:, t], state)
        ref.step(int(ids[0, t]))
        got = positions(state)
        assert got == [ref.kept(l) for l in range(ref.n_layers)], f"t={t}"
        if name.startswith("tova"):
            i = 2 if name == "tova-sinks" else 0
            window = list(range(min(i, t + 1))) + list(range(max(i, t + 1 - (k - i)), t + 1))
            assert all(head == window for layer in got for head in layer), f"t={t}: {got}"
    if name.startswith("tova"):
        _, state = prefill(model, ids, model.init_state(1, policy), mode="oneshot")
        i = 2 if name == "tova-sinks" else 0
        expected = list(range(i)) + list(range(steps - (k - i), steps))
        assert all(head == expected for layer in positions(state) for head in layer)


# ------------------------------------------------------------------------------ properties

NAMES = ["full"] + BOUNDED


@st.composite
def specs(draw):
    """A random policy: (name, size, sinks), sinks < size where the policy has sinks."""
    name = draw(st.sampled_from(NAMES))
    size = draw(st.integers(1, 12))
    sinks = draw(st.integers(0, size - 1)) if name in ("sinks", "tova-sinks") else 0
    return name, size, sinks


def check_invariants(state, name, size, sinks, length, batch, n_kv):
    k = None if name == "full" else size
    n = length if k is None else min(length, k)
    for l in range(len(state.layers)):
        pos = state.positions(l)
        assert pos.dtype == torch.long and tuple(pos.shape) == (batch, n_kv, n), pos.shape
        assert (pos[..., 1:] > pos[..., :-1]).all(), "positions not unique and ascending"
        assert ((pos >= 0) & (pos < length)).all()
        if name == "full":                       # Full never evicts
            assert torch.equal(pos, torch.arange(length).expand_as(pos))
        if name == "window":
            assert torch.equal(pos, torch.arange(length - n, length).expand_as(pos))
        if name in ("sinks", "tova-sinks"):
            first = min(sinks, length)
            assert torch.equal(pos[..., :first], torch.arange(first).expand(batch, n_kv, first))
        if name in ("h2o", "h2o-layer"):         # the k//2 most recent are never evicted
            recent = torch.arange(max(0, length - k // 2), length)
            for b in range(batch):
                for g in range(n_kv):
                    assert torch.isin(recent, pos[b, g]).all()
        if name in LAYERWISE:
            assert (pos == pos[:, :1]).all(), "a layer-wise policy differs between KV heads"


def run_msrnn(model, policy, ids, prompt, on_step=None):
    """Prefill ids[:, :prompt] sequentially (if prompt > 0), then step the rest."""
    state = model.init_state(ids.shape[0], policy)
    outs = []
    if prompt:
        logits, state = prefill(model, ids[:, :prompt], state, mode="sequential")
        outs.extend(logits.unbind(1))
        if on_step:
            on_step(state, prompt)
    for t in range(prompt, ids.shape[1]):
        logits, state = model.step(ids[:, t], state)
        outs.append(logits)
        if on_step:
            on_step(state, t + 1)
    return torch.stack(outs, 1), state


@settings(max_examples=35, deadline=None)
@given(spec=specs(), batch=st.integers(1, 3), length=st.integers(1, 40),
       prompt=st.integers(0, 40), seed=st.integers(0, 2 ** 31 - 1))
@example(spec=("h2o", 1, 0), batch=3, length=12, prompt=0, seed=1)
@example(spec=("tova-sinks", 2, 1), batch=2, length=15, prompt=5, seed=2)
@example(spec=("full", 1, 0), batch=3, length=30, prompt=7, seed=3)
def test_properties_and_batch_independence(llama, spec, batch, length, prompt, seed):
    """Any policy, size, sinks, batch size, length (prompt prefilled or not): never more than k
    states per layer and KV head, positions unique and ascending, Full keeps everything, Window
    the last k, sinks stay, H2O keeps the k//2 most recent, layer-wise policies agree across KV
    heads; and B sequences in one batch give row by row what B batch-1 runs give."""
    _, model, _ = llama
    name, size, sinks = spec
    prompt = min(prompt, length)
    ids = tokens(batch, length, seed=seed)
    n_kv = model.cfg.n_kv_heads

    def check(state, t):
        check_invariants(state, name, size, sinks, t, batch, n_kv)

    logits, state = run_msrnn(model, make(name, size, sinks)[0], ids, prompt, on_step=check)
    assert logits.shape == (batch, length, VOCAB)
    for b in range(batch):
        row_logits, row_state = run_msrnn(model, make(name, size, sinks)[0], ids[b:b + 1], prompt)
        for l in range(model.cfg.n_layers):
            assert torch.equal(state.positions(l)[b], row_state.positions(l)[0]), f"row {b}"
        assert (logits[b] - row_logits[0]).abs().max() <= 1e-5, f"row {b}"


@settings(max_examples=35, deadline=None)
@given(spec=specs(), length=st.integers(1, 36), prompt=st.integers(0, 36))
@example(spec=("h2o", 1, 0), length=20, prompt=0)           # k//2 = 0: nothing protected
@example(spec=("h2o-layer", 3, 0), length=25, prompt=10)
@example(spec=("tova", 1, 0), length=20, prompt=2)          # prefill of k + 1 tokens
@example(spec=("tova-head", 2, 0), length=20, prompt=0)
@example(spec=("sinks", 2, 1), length=20, prompt=20)
@example(spec=("tova-sinks", 5, 4), length=30, prompt=3)    # a single unprotected slot
def test_random_sizes_equal_reference(llama, spec, length, prompt):
    """Any policy, size (1..12, so k//2 = 0 and k = 1 are covered) and sinks against the
    reference: kept positions after the prompt and after every step exactly equal, logits
    within 1e-4."""
    hf, model, _ = llama
    name, size, sinks = spec
    prompt = min(prompt, length)
    policy, rule = make(name, size, sinks)
    ids = tokens(1, length, seed=size * 100 + length)
    ref = Reference(hf, rule)
    ref_logits, ref_pos = [], {}
    for t in range(length):
        ref_logits.append(ref.step(int(ids[0, t])))
        ref_pos[t + 1] = [ref.kept(l) for l in range(ref.n_layers)]
    seen = {}
    logits, _ = run_msrnn(model, policy, ids, prompt,
                          on_step=lambda state, t: seen.__setitem__(t, positions(state)))
    for t, got in seen.items():
        assert got == ref_pos[t], f"after {t} tokens:\n msrnn: {got}\n ref:   {ref_pos[t]}"
    assert (logits[0] - torch.stack(ref_logits)).abs().max() <= TOL


# ------------------------------------------------------------------------------ bad input

def test_bad_policy_arguments():
    with pytest.raises(ValueError, match="multi-state size must be a positive integer, got 0"):
        Window(0)
    with pytest.raises(ValueError, match="multi-state size must be a positive integer, got -3"):
        TOVA(-3)
    with pytest.raises(ValueError, match="size 4 must be larger than sinks 4"):
        Sinks(4, sinks=4)
    with pytest.raises(ValueError, match="size 8 must be larger than sinks 9"):
        TOVA(8, sinks=9)
    with pytest.raises(ValueError, match="sinks must be a non-negative integer"):
        Sinks(8, sinks=-1)
    with pytest.raises(ValueError, match="unknown policy 'lru'; choose one of full, window"):
        from_name("lru", 8)
    with pytest.raises(ValueError, match="policy 'tova' needs a multi-state size"):
        from_name("tova")


# ------------------------------------------------------------------------------ Mistral

def test_mistral_tova_equals_reference(tmp_path):
    """The same check on a tiny MistralForCausalLM (no native sliding window), TOVA(16)."""
    hf = tiny_hf("mistral", seed=2, sliding_window=None, vocab_size=VOCAB)
    model = msrnn.load(save(hf, tmp_path), dtype=torch.float64)
    assert model.cfg.model_type == "mistral"
    ref = Reference(hf.double(), Rule.tova(K))
    state = model.init_state(1, TOVA(K))
    ids = tokens(1, 200, seed=5)
    last = step_along(model, state, ref, ids)
    assert last[0][0] != list(range(200 - K, 200))


# ------------------------------------------------------------------------------ Qwen2, Qwen3

@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def qwen(request, tmp_path_factory):
    """Tiny random Qwen2 (q/k/v biases) and Qwen3 (q/k norms) loaded by msrnn, float64."""
    hf = tiny_hf(request.param, seed=4, vocab_size=VOCAB)
    model = msrnn.load(save(hf, tmp_path_factory.mktemp(request.param)), dtype=torch.float64)
    return hf.double(), model


@pytest.mark.parametrize("name", [n for n in REGISTRY if n != "full"])
def test_qwen_families_run_every_policy_like_the_reference(qwen, name):
    """msrnn's decoder loads the Qwen families and runs every policy as the plain reference does
    (which computes the biases and norms itself): 80 steps, k = 8."""
    hf, model = qwen
    policy, rule = make(name, size=8)
    state, ref = model.init_state(1, policy), Reference(hf, rule)
    ids = tokens(1, 80, seed=9)
    step_along(model, state, ref, ids)


def test_prefill_shared_equals_oneshot_for_each_policy(llama):
    """One oneshot prompt pass for every policy at once keeps, for each, what its own oneshot
    prefill keeps, with the same logits; decoding on from it is the same too."""
    _, model, _ = llama
    names = list(RULES)
    shared = [model.init_state(2, make(name)[0]) for name in names]
    ids = tokens(2, 40, seed=11)
    logits = prefill_shared(model, ids, shared)
    for name, state in zip(names, shared):
        alone, own = prefill(model, ids, model.init_state(2, make(name)[0]), mode="oneshot")
        assert (logits - alone).abs().max() <= EXACT, name
        for l in range(model.cfg.n_layers):
            assert torch.equal(state.positions(l), own.positions(l)), (name, l)
        a, _ = model.step(ids[:, 0], state)
        b, _ = model.step(ids[:, 0], own)
        assert (a - b).abs().max() <= EXACT, name


# ----------------------------------------------------------------- the observation window

@pytest.mark.parametrize("w", [4, 40, 100])
@pytest.mark.parametrize("per_head", [False, True])
def test_observation_window_ranks_by_the_mean_of_the_last_rows(llama, hf_attentions, w,
                                                               per_head):
    """TOVA(K, observation=w) oneshot keeps the K positions with the highest attention from the
    last w prompt queries (all of them when w >= T), mean over those rows and over the heads
    that share the choice, from Hugging Face's own attention matrices."""
    _, model, _ = llama
    attentions, _, _ = hf_attentions
    _, state = prefill(model, PROMPT, model.init_state(1, TOVA(K, per_head=per_head,
                                                              observation=w)), mode="oneshot")
    n_kv = model.cfg.n_kv_heads
    for l, att in enumerate(attentions):                 # [H, T, T]
        rows = att[:, -w:, :].mean(1)                     # [H, T]
        groups = rows.view(n_kv, -1, rows.shape[-1]).mean(1) if per_head else \
            rows.mean(0, keepdim=True).expand(n_kv, -1)
        for g, row in enumerate(groups):
            expected = row.topk(K).indices.sort().values
            assert state.positions(l)[0, g].tolist() == expected.tolist(), (l, g)


def test_observation_one_is_todays_oneshot_and_others_refuse_it(llama):
    """observation=1 is the default (the same policy, printed the same); a window changes what
    TOVA keeps; a policy that never ranks by rows refuses it; sequential prompts are unchanged
    (their parallel prefix never ranks)."""
    _, model, _ = llama
    assert TOVA(K, observation=1) == TOVA(K) and repr(TOVA(K, observation=1)) == "TOVA(16)"
    assert repr(TOVA(K, observation=8)) == "TOVA(16, observation=8)"
    assert from_name("tova", K, observation=8) == TOVA(K, observation=8)
    assert from_name("h2o", K, observation=8) == from_name("h2o", K)     # ignored: no row
    for bad in (lambda: TOVA(K, observation=0), lambda: Window(K, observation=2)):
        with pytest.raises(ValueError, match="observation"):
            bad()
    ids = tokens(1, 40, seed=3)
    one, _ = prefill(model, ids, model.init_state(1, TOVA(K)), mode="sequential")
    eight, _ = prefill(model, ids, model.init_state(1, TOVA(K, observation=8)), mode="sequential")
    assert (one - eight).abs().max() <= EXACT
    _, a = prefill(model, ids, model.init_state(1, TOVA(K)), mode="oneshot")
    _, b = prefill(model, ids, model.init_state(1, TOVA(K, observation=8)), mode="oneshot")
    assert any(not torch.equal(a.positions(l), b.positions(l)) for l in range(len(a.layers)))

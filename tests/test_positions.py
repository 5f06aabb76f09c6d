"""Past the context window: the position schemes (msrnn.positions, docs/design.md "Positions").

A tiny LLaMA whose range is 64 positions runs 128 tokens (twice its range). For every registered
policy and every scheme, both backends (msrnn's decoder and transformers through msrnn.hf) keep
exactly the positions the plain reference keeps (tests/reference.py: un-rotated keys, ranks and
compressed gaps recomputed from the kept positions at every step) and give its logits, in
float64. Then: the renumbering against a plain-Python one, Full under any scheme = original, the
refusals (one line, before any work where the length is known), the compiled step (no recompiles
as positions grow) and ragged rows.
"""

import math

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import msrnn
import msrnn.hf
from msrnn.policies import REGISTRY, TOVA, Full, Window, from_name
from msrnn.positions import NAMES, Scheme, check_range, gap, reach, renumber
from msrnn.prompt import fill
from reference_families import Reference, Rule, State, rotary_positions
from test_policies import RULES
from tiny import save, tiny_hf

RANGE = 64        # the tiny model's max_position_embeddings
STEPS = 128       # 2 x RANGE: every run goes past the range, and as far again past it
K = 16
TOL = 1e-4        # logits against the reference (as tests/test_policies.py)
VOCAB = 512


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny LLaMA (range 64) in float64: the HF model, msrnn's load, transformers as a
    backend, and its directory."""
    hf = tiny_hf("llama", seed=0, vocab_size=VOCAB, max_position_embeddings=RANGE).double()
    directory = save(hf, tmp_path_factory.mktemp("positions"))
    return hf, msrnn.load(directory, dtype=torch.float64), msrnn.hf.HFBackend(hf), directory


def ids(n=STEPS, seed=3):
    return torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))[:n]


def policy_and_rule(name):
    return from_name(name, K, 4 if name == "sinks" else None), RULES[name](K, 4)


def allowed(policy, scheme, end=STEPS):
    """Whether the run would be refused without the opt-in (original past the range; Full;
    compressed when its positions could pass it), so that the opt-in is passed only then."""
    try:
        check_range(policy, scheme, RANGE, end)
        return False
    except ValueError:
        return True


@torch.inference_mode()
@pytest.mark.parametrize("scheme", NAMES)
@pytest.mark.parametrize("name", [n for n in REGISTRY if n != "random"])
def test_both_backends_equal_the_reference_past_the_range(models, name, scheme):
    hf, ours, theirs, _ = models
    policy, rule = policy_and_rule(name)
    tokens = ids()
    ref = Reference(hf, rule, positions=scheme)
    allow = allowed(policy, scheme)
    states = [b.init_state(1, policy, capacity=STEPS, positions=scheme, allow_past_range=allow)
              for b in (ours, theirs)]
    for t, token in enumerate(tokens):
        expected = ref.step(int(token))
        for backend, state in zip((ours, theirs), states):
            logits, _ = backend.step(token[None], state)
            err = (logits[0] - expected).abs().max().item()
            assert err <= TOL, f"{name} {scheme} {type(backend).__name__} step {t}: {err:.3g}"
            for layer in range(len(state.layers)):
                assert state.positions(layer)[0].tolist() == ref.kept(layer), \
                    f"{name} {scheme} step {t} layer {layer}"
    if scheme != "original" and policy.bounded:    # the numbers did differ from the positions
        at, _ = rotary_positions(ref.H[0][0], scheme)
        assert max(at.values()) < max(at) and RANGE <= max(at)
        assert scheme != "cache" or max(at.values()) < RANGE


@torch.inference_mode()
@pytest.mark.parametrize("scheme", ["cache", "compressed"])
@pytest.mark.parametrize("name", ["tova", "h2o", "keynorm", "window"])
def test_oneshot_prompt_then_steps_equal_the_reference(models, name, scheme):
    """A 40-token oneshot prompt (numbered by absolute positions: nothing has left yet), then
    steps past the range under the scheme."""
    hf, ours, theirs, _ = models
    policy, rule = policy_and_rule(name)
    tokens = ids(120, seed=5)
    ref = Reference(hf, rule, positions=scheme)
    expected = [ref.oneshot([int(x) for x in tokens[:40]])[-1]]
    expected += [ref.step(int(x)) for x in tokens[40:]]
    for backend in (ours, theirs):
        state, logits = fill(backend, [tokens[:40]], policy, "oneshot", 0, scheme,
                             allowed(policy, scheme, 120))
        got = [logits[0]] + [backend.step(x[None], state)[0][0] for x in tokens[40:]]
        err = (torch.stack(got) - torch.stack(expected)).abs().max().item()
        assert err <= TOL, f"{name} {scheme} {type(backend).__name__}: {err:.3g}"
        assert [state.positions(l)[0].tolist() for l in range(2)] == [ref.kept(l) for l in
                                                                       range(2)]


def test_renumbering_equals_the_plain_one():
    """positions.renumber (sorted slots, cumsum, scatter) against the reference's loop, on
    random kept sets: empty slots anywhere, heads keeping different positions, big gaps."""
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        B, H, S = 2, 3, 9
        pos = torch.full((B, H, S), -1)
        for b in range(B):
            for h in range(H):
                n = int(torch.randint(1, S + 1, (1,), generator=g))
                spread = [1, 12, 5000][trial % 3]
                p = torch.randperm(S * spread, generator=g)[:n].sort().values
                pos[b, h, torch.randperm(S, generator=g)[:n]] = p
        for scheme in (Scheme.CACHE, Scheme.COMPRESSED):
            keys, query = renumber(pos, scheme)
            for b in range(B):
                for h in range(H):
                    states = [State(int(p), None, None) for p in pos[b, h] if p >= 0]
                    at, q = rotary_positions(states, scheme.value)
                    got = {int(p): int(r) for p, r in zip(pos[b, h], keys[b, h]) if p >= 0}
                    assert got == at and int(query[b, h]) == q


def test_the_compressed_gap():
    assert [gap(d) for d in (0, 1, 10)] == [0, 1, 10]
    assert gap(11) == math.ceil(10 + math.log(math.log(1 + math.e))) == 11
    assert gap(10**6) == math.ceil(10 + math.log(math.log(10**6 - 10 + math.e))) == 13
    d = torch.tensor([0, 5, 10, 11, 40, 10**6])
    assert gap(d).tolist() == [gap(int(x)) for x in d]


@torch.inference_mode()
def test_full_under_any_scheme_is_original(models):
    _, ours, _, _ = models
    tokens = ids(40)
    runs = []
    for scheme in NAMES:
        state = ours.init_state(1, Full(), positions=scheme)
        runs.append(torch.stack([ours.step(x[None], state)[0] for x in tokens]))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_a_window_is_the_same_under_cache(tmp_path):
    """Window keeps consecutive positions: renumbering them 0..k shifts every difference by
    nothing, so Window's logits under `cache` equal `original`'s (StreamingLLM without sinks),
    up to the rounding of RoPE's angles, which are float32 (as transformers') in any dtype."""
    hf = tiny_hf("llama", seed=1, vocab_size=VOCAB)
    model = msrnn.load(save(hf, tmp_path), dtype=torch.float64)
    tokens = ids(60)
    out = []
    for scheme in ("original", "cache"):
        state = model.init_state(1, Window(8), positions=scheme)
        out.append(torch.stack([model.step(x[None], state)[0] for x in tokens]))
    assert (out[0] - out[1]).abs().max() < 1e-5


# ------------------------------------------------------------------------------ refusals

@torch.inference_mode()
def test_original_past_the_range_is_refused_before_any_work(models):
    _, ours, _, _ = models
    with pytest.raises(ValueError, match="past the model's range of 64.*'cache' or "
                       "'compressed'.*allow_past_range"):
        msrnn.generate(ours, ids(10)[None], TOVA(8), max_new_tokens=100)
    with pytest.raises(ValueError, match="Full keeps every state"):
        msrnn.generate(ours, ids(10)[None], Full(), max_new_tokens=100, positions="cache")
    with pytest.raises(ValueError, match="oneshot"):               # the pass itself is too long
        msrnn.generate(ours, ids(80)[None], TOVA(8), max_new_tokens=1, positions="cache")
    out = msrnn.generate(ours, ids(10)[None], TOVA(8), max_new_tokens=100, positions="cache",
                         eos_ids=set())
    assert out.shape == (1, 100)
    out = msrnn.generate(ours, ids(10)[None], TOVA(8), max_new_tokens=100, eos_ids=set(),
                         allow_past_range=True)
    assert out.shape == (1, 100)


@torch.inference_mode()
def test_the_step_that_reaches_the_range_is_refused(models):
    _, ours, theirs, _ = models
    for backend in (ours, theirs):
        state = backend.init_state(1, TOVA(8))
        for token in ids(RANGE):
            backend.step(token[None], state)
        with pytest.raises(ValueError, match="position 64, past the model's range"):
            backend.step(ids(1), state)
        assert state.length == RANGE                # refused before anything changed


def test_compressed_is_refused_where_its_positions_could_pass_the_range():
    """compressed numbers at most min(end - 1, (k + 1) ceil(g(end - 1))): with k = 16 and 400
    tokens that is 17 * 12 = 204 > 64, so it needs the opt-in; with k = 3 (4 * 13 = 52 even for
    a billion tokens) it runs."""
    assert reach(TOVA(16), Scheme.COMPRESSED, 400) == 17 * 12
    assert reach(TOVA(16), Scheme.COMPRESSED, 100) == 99
    with pytest.raises(ValueError, match="compressed positions of TOVA\\(16\\) may reach 204"):
        check_range(TOVA(16), "compressed", RANGE, 400)
    check_range(TOVA(3), "compressed", RANGE, 10**9)
    check_range(TOVA(63), "cache", RANGE, 10**9)
    with pytest.raises(ValueError, match="unknown position scheme 'absolute'"):
        check_range(TOVA(3), "absolute", RANGE, 10)


def test_a_rotary_rule_that_does_not_compose_is_refused():
    hf = tiny_hf("llama", seed=0, rope_parameters={"rope_type": "yarn", "factor": 2.0,
                                                   "rope_theta": 10000.0,
                                                   "original_max_position_embeddings": 2048})
    with pytest.raises(ValueError, match="does not compose exactly"):
        msrnn.hf.MultiStateCache(hf, TOVA(8), positions="cache")
    msrnn.hf.MultiStateCache(hf, TOVA(8)).release()           # original needs no renumbering


# ------------------------------------------------------------------------------ compiled, ragged

@pytest.mark.parametrize("scheme", ["cache", "compressed"])
def test_compiled_step_renumbers_without_recompiling(models, scheme):
    """Ragged rows (at their own positions), 70 steps, past the range: the compiled step equals
    the eager one, compiled once."""
    _, _, _, directory = models
    eager = msrnn.load(directory, dtype=torch.float64)
    compiled = eager.compile_step()
    rows = [ids(20, seed=1), ids(7, seed=2)]
    feed = torch.stack([ids(70, seed=8), ids(70, seed=9)], 1)     # to positions 89 and 76
    policy = TOVA(8, per_head=True)
    out = []
    for model in (eager, compiled):
        state, _ = fill(eager, rows, policy, "sequential", 0, scheme, True)
        torch._dynamo.reset()
        counters.clear()
        got = [model.step(feed[0], state)[0]]                       # compiles here, once
        with torch._dynamo.config.patch(error_on_recompile=True):   # ... and never again
            got += [model.step(x, state)[0] for x in feed[1:]]
        out.append(torch.stack(got))
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    # RoPE's angles are float32 in any dtype (as transformers'), and inductor's cos and sin
    # round them a little differently from eager's.
    assert (out[0] - out[1]).abs().max() < 1e-5


@torch.inference_mode()
@pytest.mark.parametrize("scheme", ["cache", "compressed"])
def test_ragged_rows_keep_their_own_positions(models, scheme):
    """Each row of a ragged batch equals that prompt run alone (both backends)."""
    _, ours, theirs, _ = models
    rows = [ids(30, seed=1), ids(9, seed=2), ids(21, seed=4)]
    feed = torch.stack([ids(50, seed=s) for s in (5, 6, 7)], 1)     # rows end at 80, 59, 71
    for backend in (ours, theirs):
        state, _ = fill(backend, rows, TOVA(8), "sequential", 0, scheme, True)
        together = torch.stack([backend.step(x, state)[0] for x in feed])
        for b, row in enumerate(rows):
            alone, _ = fill(backend, [row], TOVA(8), "sequential", 0, scheme, True)
            expected = torch.stack([backend.step(x[b:b + 1], alone)[0][0] for x in feed])
            assert (together[:, b] - expected).abs().max() < 1e-9


# ------------------------------------------------------------------------------ msrnn ppl

def test_ppl_past_the_range_reports_buckets(tmp_path, capsys):
    """`msrnn ppl --context` three times a tiny model's range (32): a bounded policy with
    `--positions cache` runs (the same perplexity as msrnn.experiments.evaluate's), with each
    block of `--buckets` positions in the JSON; original is refused unless `--past-range`; Full too."""
    import json

    from msrnn import cli
    from msrnn.experiments import evaluate
    from tiny import save_char_tokenizer

    hf = tiny_hf("llama", seed=2, max_position_embeddings=32)
    model_dir = save(hf, tmp_path / "model")
    save_char_tokenizer(model_dir)
    text = tmp_path / "a.txt"
    text.write_text(("The lighthouse keeper counted the ships, and the ships counted him. " * 6)
                    [:2 * 96 + 5])
    argv = ["ppl", model_dir, "--text", str(text), "--context", "96", "--policies", "tova",
            "--sizes", "8", "--buckets", "40", "--json"]
    assert cli.main(argv + ["--positions", "cache"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["policy"], r["size"], r["positions"]) for r in rows] == [("tova", 8, "cache")]
    buckets = rows[0]["buckets"]
    assert [b[:2] for b in buckets] == [[1, 41], [41, 81], [81, 96]]
    mean = sum(math.log(p) * (end - start) for start, end, p in buckets) / 95
    assert math.isclose(math.exp(mean), rows[0]["ppl"], rel_tol=1e-9)
    chunks = evaluate.load_chunks(msrnn.load_tokenizer(model_dir), [str(text)], 96)
    expected, _ = evaluate.perplexity(msrnn.load(model_dir), chunks, TOVA(8), positions="cache")
    assert math.isclose(rows[0]["ppl"], expected, rel_tol=1e-6)

    assert cli.main(argv) == 2                                  # original, past the range
    err = capsys.readouterr().err
    assert "past the model's range of 32" in err and "--positions" in err and \
        "--past-range" in err and "Traceback" not in err
    assert cli.main(argv[:7] + ["full"] + argv[8:] + ["--positions", "cache"]) == 2
    assert "Full keeps every state" in capsys.readouterr().err
    assert cli.main(argv + ["--past-range", "--positions", "original,cache"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["positions"] for r in rows] == ["original", "cache"]


def test_generate_command_streams_past_the_range(tmp_path, capsys):
    """`msrnn generate --positions cache` on a tiny model whose range is 32: 120 new tokens, a
    bounded multi-state all the way (no end token: the model's EOS is not in its vocabulary)."""
    from msrnn import cli
    from tiny import save_char_tokenizer

    hf = tiny_hf("llama", seed=2, max_position_embeddings=32, eos_token_id=None)
    model_dir = save(hf, tmp_path / "model")
    save_char_tokenizer(model_dir)
    argv = ["generate", model_dir, "--prompt", "The keeper", "--policy", "tova", "--size", "8",
            "--max-new-tokens", "120"]
    assert cli.main(argv + ["--positions", "cache"]) == 0
    out, err = capsys.readouterr()
    assert "120 new tokens" in err and "129 tokens seen" in err and "9 slots" in err
    assert cli.main(argv) == 2 and "--past-range" in capsys.readouterr().err

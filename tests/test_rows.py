"""Rows with policies of their own: `init_state(B, policy=[p_0, ..., p_{B-1}])`.

A sweep's configurations run as the rows of one batch, so each row must be exactly its own
policy's run alone: row b's logits equal (float64, 1e-10) those of p_b's batch-1 run on the
same prompt and tokens, and every layer keeps the same positions, at every step. Checked for
a mix of every built-in policy, a budgeted one (PyramidKV's per-layer and DuoAttention's
per-head budgets from examples/policies/) and Full, on both backends, ragged prompts in both
prompt modes, the three position schemes, the compiled step (one graph) and two
tensor-parallel ranks; and the bad inputs.
"""

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch._dynamo.utils import counters

import msrnn
import msrnn.hf
from msrnn.policies import H2O, REGISTRY, TOVA, Full, KeyNorm, Sinks, Window, import_file
from msrnn.prompt import fill, prefill
from tiny import save, tiny_hf

torch.set_num_threads(1)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "policies"
VOCAB, STEPS = 256, 8
LENGTHS = [21, 9, 21, 14, 21, 30, 21, 12]       # ragged; rows 0, 2, 4 and 6 alike
NEW = torch.randint(0, VOCAB, (STEPS, len(LENGTHS)), generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def examples():
    """The budgeted policies of examples/policies/, out of the registry afterwards."""
    before = dict(REGISTRY)
    mods = {f.stem: import_file(str(f)) for f in sorted(EXAMPLES.glob("*.py"))}
    yield mods
    REGISTRY.clear()
    REGISTRY.update(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny LLaMA in float64: msrnn's decoder, transformers as a backend, the directory."""
    hf = tiny_hf("llama", seed=5, vocab_size=VOCAB)
    directory = save(hf, tmp_path_factory.mktemp("rows"))
    return msrnn.load(directory, dtype=torch.float64), msrnn.hf.HFBackend(hf.double()), directory


def mix(examples, full: bool = True) -> list:
    """Eight rows: every built-in kind, two sizes of TOVA (one repeated, not as neighbours),
    an observation window, per-layer and per-head budgets, and Full."""
    duo = examples["duo_attention"].DuoAttention(8, sinks=2, window=4, kv_heads=2,
                                                 retrieval=((0, 0), (1, 1)))
    return [TOVA(6), H2O(8), TOVA(6), Sinks(7, sinks=2),
            examples["pyramidkv"].PyramidKV(6), TOVA(10, observation=3, per_head=True),
            Full() if full else KeyNorm(9), duo if full else Window(5)]


def prompts(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(VOCAB, generator=g)[:n] for n in LENGTHS]


def kept(state, b):
    """Row b's positions per layer and KV head, without empty slots."""
    return [[sorted(p for p in head if p >= 0) for head in state.layers[l].pos[b].tolist()]
            for l in range(len(state.layers))]


def run(backend, policy, rows, mode, positions="original", feed=NEW, step=None):
    """[(logits [B, V], [row][layer][head] kept positions)] after the prompts and each step."""
    state, logits = fill(backend, rows, policy, mode, STEPS, positions)
    out = [(logits, [kept(state, b) for b in range(len(rows))])]
    for ids in feed:
        logits, state = (step or backend).step(ids, state)
        out.append((logits, [kept(state, b) for b in range(len(rows))]))
    return out


def assert_rows_alone(backend, policies, mode, positions="original", tol=1e-10, got=None):
    """Each row of the batch equals its own policy's batch-1 run."""
    rows = prompts()
    got = got or run(backend, policies, rows, mode, positions)
    for b, (policy, row) in enumerate(zip(policies, rows)):
        alone = run(backend, policy, [row], mode, positions, NEW[:, b:b + 1])
        for t, ((la, ka), (lb, kb)) in enumerate(zip(got, alone)):
            err = (la[b] - lb[0]).abs().max().item()
            assert err <= tol, f"row {b} ({policy}) step {t}: logits differ by {err:.3g}"
            assert ka[b] == kb[0], f"row {b} ({policy}) step {t}: kept positions differ"


@torch.inference_mode()
@pytest.mark.parametrize("mode", ["sequential", "oneshot"])
def test_each_row_is_its_policy_alone(examples, models, mode):
    assert_rows_alone(models[0], mix(examples), mode)


@torch.inference_mode()
@pytest.mark.parametrize("positions", ["cache", "compressed"])
def test_rows_alone_under_renumbered_positions(examples, models, positions):
    assert_rows_alone(models[0], mix(examples), "sequential", positions)


@torch.inference_mode()
@pytest.mark.parametrize("mode", ["sequential", "oneshot"])
def test_rows_alone_inside_transformers(examples, models, mode):
    assert_rows_alone(models[1], mix(examples), mode)


@torch.inference_mode()
def test_equal_rows_are_one_policy_bit_for_bit(models):
    """A list of one policy is that policy: the same multi-state, the same logits."""
    ours, rows = models[0], prompts()
    one = run(ours, TOVA(6), rows, "sequential")
    listed = run(ours, [TOVA(6)] * len(rows), rows, "sequential")
    for (la, ka), (lb, kb) in zip(one, listed):
        assert torch.equal(la, lb) and ka == kb


def test_compiled_rows_are_one_graph_and_equal_eager(examples, models):
    ours = models[0]
    policies = mix(examples)
    with torch.inference_mode():
        eager = run(ours, policies, prompts(), "sequential")
    compiled = ours.compile_step()
    torch._dynamo.reset()
    counters.clear()
    with torch.inference_mode():
        got = run(ours, policies, prompts(), "sequential", step=compiled)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    for t, ((la, ka), (lb, kb)) in enumerate(zip(got, eager)):
        # 1e-6, as every compiled test: inductor computes RoPE's float32 cos and sin with
        # its own kernels, which round otherwise (2e-8 here); the rows' equality is above.
        assert (la - lb).abs().max().item() <= 1e-6, f"step {t}"
        assert ka == kb, f"step {t}: kept positions differ"


def test_a_saved_multi_state_of_rows_resumes(models, tmp_path):
    ours = models[0]
    policies = [TOVA(6), H2O(8), TOVA(6), Sinks(7, sinks=2), KeyNorm(9), TOVA(10, per_head=True),
                Full(), Window(5)]
    with torch.inference_mode():
        state, _ = fill(ours, prompts(), policies, "sequential", STEPS)
        for ids in NEW[:3]:
            ours.step(ids, state)
        state.save(str(tmp_path / "rows.msrnn"))
        loaded = msrnn.MultiState.load(str(tmp_path / "rows.msrnn"), ours)
        assert loaded.policies == state.policies
        for ids in NEW[3:]:
            a, _ = ours.step(ids, state)
            b, _ = ours.step(ids, loaded)
            assert torch.equal(a, b)


def rank_main(rank, port, directory, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", TORCHELASTIC_USE_AGENT_STORE="True")   # test_tp.store's
    torch.set_num_threads(1)
    ex = {f.stem: import_file(str(f)) for f in sorted(EXAMPLES.glob("*.py"))}
    model = msrnn.load(directory, dtype=torch.float64, tp=2)
    with torch.inference_mode():
        result = run(model, mix(ex), prompts(), "sequential")
    torch.save({"run": result, "kv": model.plan.kv}, os.path.join(out, f"rank{rank}.pt"))
    model.close()


def test_tensor_parallel_rows_keep_what_one_process_keeps(examples, models, tmp_path):
    ours, _, directory = models
    from test_tp import store
    server = store()                                  # served by this process until the end
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, server.port, directory, str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
        if p.exitcode is None:
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    with torch.inference_mode():
        want = run(ours, mix(examples), prompts(), "sequential")
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        a, b = got["kv"]
        for t, ((la, ka), (lb, kb)) in enumerate(zip(got["run"], want)):
            assert (la - lb).abs().max().item() <= 1e-10, f"rank {r} step {t}"
            assert ka == [[layer[a:b] for layer in row] for row in kb], f"rank {r} step {t}"


# ------------------------------------------------------------------ bad input

def test_a_list_of_the_wrong_length_is_refused(models):
    with pytest.raises(ValueError, match=r"3 policies for a batch of 4 rows: give one policy "
                                         r"per row"):
        models[0].init_state(4, [TOVA(4), TOVA(8), H2O(4)])


def test_full_beside_bounded_rows_needs_a_capacity(models):
    with pytest.raises(ValueError, match=r"rows 1, 2 keep every token \(Full\) beside bounded "
                                         r"rows.*give capacity="):
        models[0].init_state(3, [TOVA(4), Full(), Full()])
    state = models[0].init_state(2, [TOVA(4), Full()], capacity=5)
    with pytest.raises(ValueError, match=r"6 tokens do not fit the Full rows of this "
                                         r"multi-state, made with capacity=5.*capacity >= 6"):
        prefill(models[0], torch.zeros(2, 6, dtype=torch.long), state)

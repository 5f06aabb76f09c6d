"""Tensor parallelism (msrnn.tp, msrnn.group): a model split by KV head over 2 processes (gloo on
the CPU) computes what one process computes.

For a tiny LLaMA with 4 KV heads in float64, every registered policy, both prompt modes and a
ragged batch of three prompts, over 40 steps: the logits on every rank equal the one-process
logits within 1e-10, and each rank keeps, in every layer, exactly the positions the one-process
run keeps for the KV heads that rank holds; the same for the compiled step, for an uneven split
(3 KV heads on 2 ranks) and inside transformers (its own tensor parallelism, msrnn.hf). The new
tokens are fixed in advance (not sampled), so no run's choice steers another's.

Every group ends: the models' `with` blocks and close() end the group msrnn.load made, a group
the caller made is left to the caller, and every command run with --tp (in-process, on both
ranks; and under torchrun) ends its group on success, a clear error, Ctrl-C and a dead peer.
"""

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._dynamo.utils import counters

import msrnn
import msrnn.cli
import msrnn.group
import msrnn.tp
from msrnn.config import read_config
from msrnn.policies import REGISTRY, TOVA, from_name
from msrnn.prompt import fill
from tiny import save, save_char_tokenizer, tiny_hf

ROOT = str(Path(__file__).resolve().parent.parent)
K, VOCAB, STEPS, LENGTHS, TOL = 12, 256, 40, [30, 9, 21], 1e-10


def policies():
    return [from_name(name, K, 4 if name == "sinks" else None) for name in REGISTRY]


def run(model, policy, mode, steps=STEPS, compiled=None):
    """[(logits [B, V], kept positions per layer [B, Hkv, n])] after the prompts and each step."""
    g = torch.Generator().manual_seed(7)
    rows = [torch.randperm(VOCAB, generator=g)[:n] for n in LENGTHS]
    feed = torch.randint(0, VOCAB, (steps, len(LENGTHS)), generator=g)
    state, logits = fill(model, rows, policy, mode, steps)
    layers = range(state.shape.layers)
    out = [(logits, [state.positions(l) for l in layers])]
    for ids in feed:
        logits, state = (compiled or model).step(ids, state)
        out.append((logits, [state.positions(l) for l in layers]))
    return out


# ------------------------------------------------------------------ what each rank runs

def ranks_msrnn(directory):
    """Every policy and prompt mode, eager, and every policy's compiled step (sequential)."""
    with msrnn.load(directory, dtype=torch.float64, tp=2) as model:    # the group ends after
        out = {(repr(p), mode): run(model, p, mode) for p in policies()
               for mode in ("oneshot", "sequential")}
        compiled = model.compile_step()
        counters.clear()
        for p in policies():
            torch._dynamo.reset()
            out[(repr(p), "compiled")] = run(model, p, "sequential", 30, compiled)
        out["graph breaks"] = dict(counters["graph_break"])  # the all-reduces are in the graph
        out["kv"] = model.plan.kv
        out["group during"] = dist.is_initialized()
    out["group after"] = dist.is_initialized()
    return out


def ranks_uneven(directory):
    """On a group the caller made: the models' close() leaves it to the caller."""
    dist.init_process_group("gloo")
    model = msrnn.load(directory, dtype=torch.float64, tp=2)
    out = {(repr(p), mode): run(model, p, mode, 40) for p in policies()
           for mode in ("oneshot", "sequential")}
    int8 = msrnn.load(directory, dtype=torch.float64, tp=2, quantize="int8")
    out["int8"] = run(int8, TOVA(K), "sequential", 40)
    out["kv"] = model.plan.kv
    model.close(), int8.close()
    out["group after close"] = dist.is_initialized()      # the caller's: still there
    dist.barrier(timeout=timedelta(seconds=60))
    dist.destroy_process_group()                          # the caller ends it
    return out


def ranks_int4(directory):
    """int4 weights on two ranks: each rank's groups of 32 lie inside its own columns."""
    with msrnn.load(directory, dtype=torch.float64, tp=2, quantize="int4") as model:
        return {"int4": run(model, TOVA(K), "sequential", 40), "kv": model.plan.kv}


def ranks_hf(directory):
    import msrnn.hf
    with msrnn.hf.HFBackend(msrnn.hf.load(directory, dtype=torch.float64, tp=2)) as backend:
        out = {(repr(p), mode): run(backend, p, mode, 30) for p in policies()
               for mode in ("oneshot", "sequential")}
        rank = dist.get_rank()
        out["kv"] = (2 * rank, 2 * rank + 2)
    out["group after"] = dist.is_initialized()
    return out


def ranks_errors(directory):
    """The clear errors: too many ranks; prompts that differ between ranks; a rank that dies."""
    out = {}
    cfg = read_config(directory)
    try:
        msrnn.tp.Plan(cfg, 0, cfg.n_kv_heads + 1)
    except ValueError as e:
        out["too many"] = str(e)
    model = msrnn.load(directory, dtype=torch.float64, tp=2)
    rank = dist.get_rank()
    try:
        msrnn.generate(model, torch.tensor([[1, 2, 3 + rank]]), TOVA(4), max_new_tokens=2)
    except ValueError as e:
        out["different"] = str(e)
    if rank == 1:
        os._exit(3)                                       # dies without a word
    time.sleep(1)
    started = time.perf_counter()
    try:
        msrnn.generate(model, torch.tensor([[1, 2, 3]]), TOVA(4), max_new_tokens=2)
    except RuntimeError as e:
        out["dead"] = (str(e), time.perf_counter() - started)
    started = time.perf_counter()
    try:
        model.close()                                     # its barrier fails: the peer is gone
    except RuntimeError as e:
        out["closed"] = (str(e), time.perf_counter() - started, dist.is_initialized())
    return out


def ranks_commands(directory, text, ports, tmp):
    """Each --tp command through msrnn.cli.main in this process, each on a fresh group (on its
    own store's port), then a clear error, Ctrl-C and a dead peer -> {run: (exit code or the exception,
    whether a group is left, seconds, the lines printed to stderr)}; rank 1, which dies in the
    last, saves what it saw before."""
    import io
    rank = int(os.environ["RANK"])
    tp = ["--tp", "2"]
    gen = ["generate", directory, "--policy", "tova", "--size", "8", "--max-new-tokens", "4"]
    grid = ["--policies", "tova", "--sizes", "8", "--json"]
    runs = {"generate": gen + ["--prompt", "Once upon a time"] + tp,
            "ppl": ["ppl", directory, "--text", text, "--context", "48", *grid, *tp],
            "retention": ["retention", directory, "--text", text, "--context", "48", "--size",
                          "8", "--json", *tp],
            "needle": ["needle", directory, "--haystack", text, "--lengths", "200", "--depths",
                       "0.5", "--samples", "1", "--max-new-tokens", "2", *grid, *tp],
            "different prompts": gen + ["--prompt", f"Once upon a time {rank}"] + tp,
            "interrupted": gen + ["--prompt", "Once upon a time"] + tp,
            "dead peer": gen + ["--prompt", "Once upon a time"] + tp}
    loops = sys.modules["msrnn.generate"]             # the module (msrnn.generate is the function)
    real = loops.stream

    def interrupted(*args, **kwargs):                 # Ctrl-C after the group was made
        raise KeyboardInterrupt
        yield

    def dead(*args, **kwargs):
        if rank == 1:
            torch.save(out, os.path.join(tmp, "rank1.pt"))
            os._exit(3)                               # rank 1 dies without a word
        yield from real(*args, **kwargs)

    out = {}
    for (name, argv), port in zip(runs.items(), ports):
        os.environ["MASTER_PORT"] = str(port)
        loops.stream = {"interrupted": interrupted, "dead peer": dead}.get(name, real)
        sys.__stderr__ = sys.stderr = err = io.StringIO()
        started = time.perf_counter()
        try:
            code = msrnn.cli.main(argv)
        except KeyboardInterrupt:
            code = "KeyboardInterrupt"
        out[name] = (code, dist.is_initialized(), time.perf_counter() - started,
                     err.getvalue().splitlines())
    return out


def rank_main(rank, port, task, args, out):
    # torchrun's environment, with its agent's store: the ranks join the store at MASTER_PORT
    # as clients (TORCHELASTIC_USE_AGENT_STORE), and none of them serves it.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            result = globals()[task](*args)
    finally:
        if dist.is_initialized():            # a task that failed midway: its group ends here,
            try:                             # not in the interpreter's exit
                dist.barrier(timeout=timedelta(seconds=60))
            finally:
                dist.destroy_process_group()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def store() -> dist.TCPStore:
    """A rendezvous store served by this process for two ranks, as torchrun's agent serves one,
    on a port the system picks (0) and this process holds until the store goes. A port found
    free and let go for rank 0 to bind could be taken in between (by the ranks of a test that
    another pytest-xdist worker runs at the same time); a held one cannot."""
    return dist.TCPStore("127.0.0.1", 0, world_size=2, is_master=True, wait_for_workers=False)


def on_two_ranks(task, *args, tmp):
    """Run task(*args) in 2 fresh processes forming one gloo group -> ([rank 0's result, rank
    1's], their exit codes); a rank that saved nothing gives None."""
    server = store()                                 # served until the ranks are done
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, server.port, task, args, str(tmp)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(900)
        if p.exitcode is None:                       # a hang: the test fails, nothing lingers
            p.kill()
    files = [tmp / f"rank{r}.pt" for r in range(2)]
    return ([torch.load(f, weights_only=False) if f.exists() else None for f in files],
            [p.exitcode for p in procs])


# ------------------------------------------------------------------ the tests

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaMA with 4 KV heads (8 query heads), and one with 3 (6 query heads)."""
    even = save(tiny_hf("llama", seed=4, vocab_size=VOCAB, num_attention_heads=8,
                        num_key_value_heads=4), tmp_path_factory.mktemp("tp4"))
    odd = save(tiny_hf("llama", seed=5, vocab_size=VOCAB, num_attention_heads=6,
                       num_key_value_heads=3, hidden_size=48), tmp_path_factory.mktemp("tp3"))
    return even, odd


def kept(positions):
    """[row][KV head] -> the positions kept, without the -1s that pad shorter rows."""
    return [[[p for p in head if p >= 0] for head in row] for row in positions.tolist()]


def assert_same(ranks, reference, keys):
    for rank, got in enumerate(ranks):
        a, b = got["kv"]
        for key in keys:
            want = reference[key]
            assert len(got[key]) == len(want)
            for t, ((la, ka), (lb, kb)) in enumerate(zip(got[key], want)):
                err = (la - lb).abs().max().item()
                assert err <= TOL, f"{key} rank {rank} step {t}: logits differ by {err:.3g}"
                for layer, (pa, pb) in enumerate(zip(ka, kb)):
                    assert kept(pa) == kept(pb[:, a:b]), f"{key} rank {rank} step {t} " \
                                                         f"layer {layer}: kept positions differ"


@torch.inference_mode()
def test_msrnn_on_two_ranks_equals_one_process(tiny, tmp_path):
    directory = tiny[0]
    ranks, codes = on_two_ranks("ranks_msrnn", directory, tmp=tmp_path)
    assert codes == [0, 0]
    one = msrnn.load(directory, dtype=torch.float64)
    reference = {(repr(p), mode): run(one, p, mode) for p in policies()
                 for mode in ("oneshot", "sequential")}
    compiled = one.compile_step()       # inductor's cos/sin round unlike eager's: compare the
    for p in policies():                # compiled step with the compiled step
        torch._dynamo.reset()
        reference[(repr(p), "compiled")] = run(one, p, "sequential", 30, compiled)
    assert [r["kv"] for r in ranks] == [(0, 2), (2, 4)]
    assert ranks[0]["graph breaks"] == {} == ranks[1]["graph breaks"]
    assert all(r["group during"] and not r["group after"] for r in ranks)   # `with` ended it
    assert_same(ranks, reference, list(reference))
    for p in policies():                                  # evictions happened
        if p.bounded:
            assert ranks[0][(repr(p), "sequential")][-1][1][0].shape[-1] == K


@torch.inference_mode()
def test_an_uneven_split_equals_one_process(tiny, tmp_path):
    directory = tiny[1]
    ranks, codes = on_two_ranks("ranks_uneven", directory, tmp=tmp_path)
    assert codes == [0, 0]
    one = msrnn.load(directory, dtype=torch.float64)
    reference = {(repr(p), mode): run(one, p, mode, 40) for p in policies()
                 for mode in ("oneshot", "sequential")}
    # int8 weights: a row-parallel shard's rows take the whole row's scale, as one process's
    reference["int8"] = run(msrnn.load(directory, dtype=torch.float64, quantize="int8"),
                            TOVA(K), "sequential", 40)
    assert [r["kv"] for r in ranks] == [(0, 2), (2, 3)]
    assert ranks[0]["group after close"] and ranks[1]["group after close"]  # the caller's
    assert_same(ranks, reference, list(reference))


@torch.inference_mode()
def test_int4_split_equals_one_process(tmp_path):
    """int4 (Q4_1 groups of 32 along the input) on two ranks: a row-parallel projection's
    groups are its rank's own, so the ranks hold one process's blocks, and compute its logits."""
    directory = save(tiny_hf("llama", seed=6, vocab_size=VOCAB, hidden_size=128,
                             intermediate_size=128, num_attention_heads=8,
                             num_key_value_heads=4), tmp_path / "m")
    ranks, codes = on_two_ranks("ranks_int4", directory, tmp=tmp_path)
    assert codes == [0, 0]
    reference = {"int4": run(msrnn.load(directory, dtype=torch.float64, quantize="int4"),
                             TOVA(K), "sequential", 40)}
    assert [r["kv"] for r in ranks] == [(0, 2), (2, 4)]
    assert_same(ranks, reference, ["int4"])


@torch.inference_mode()
def test_transformers_tensor_parallel_equals_one_process(tiny, tmp_path):
    import msrnn.hf
    directory = tiny[0]
    ranks, codes = on_two_ranks("ranks_hf", directory, tmp=tmp_path)
    assert codes == [0, 0]
    assert not ranks[0]["group after"] and not ranks[1]["group after"]     # `with` ended it
    one = msrnn.hf.HFBackend(msrnn.hf.load(directory, dtype=torch.float64))
    reference = {(repr(p), mode): run(one, p, mode, 30) for p in policies()
                 for mode in ("oneshot", "sequential")}
    assert_same(ranks, reference, list(reference))


def test_clear_errors_and_no_hang(tiny, tmp_path):
    (out, _), codes = on_two_ranks("ranks_errors", tiny[0], tmp=tmp_path)
    assert codes == [0, 3]                                # rank 1 died, on purpose
    assert "at most 4 ranks" in out["too many"]
    assert "different token ids" in out["different"]
    message, seconds = out["dead"]                        # an error, at once: no hang
    assert "Connection closed" in message and seconds < 60
    message, seconds, left = out["closed"]                # close() still ends the group
    assert "Connection closed" in message and seconds < 60 and not left


def test_every_command_ends_its_group(tiny, tmp_path):
    """After msrnn.cli.main returns (or raises KeyboardInterrupt) on each rank, no group is
    left (the next command could not make its own otherwise), on every way out."""
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession "
                    "of a good fortune, must be in want of a wife. " * 6)
    directory = tiny[0]
    save_char_tokenizer(directory, VOCAB)
    stores = [store() for _ in range(7)]                  # one per command, served until done
    (zero, one), codes = on_two_ranks("ranks_commands", directory, str(text),
                                      [s.port for s in stores], str(tmp_path), tmp=tmp_path)
    assert codes == [0, 3]                                # rank 1 died, on purpose, last
    for name in ("generate", "ppl", "retention", "needle"):
        assert zero[name][:2] == (0, False), (name, zero[name])
        assert one[name][:2] == (0, False), (name, one[name])
    for rank in (zero, one):
        assert rank["different prompts"][:2] == (2, False)
        assert rank["interrupted"][:2] == ("KeyboardInterrupt", False)
    assert "different token ids" in zero["different prompts"][3][0]
    code, left, seconds, lines = zero["dead peer"]        # one line, at once, the group gone
    assert (code, left) == (1, False) and seconds < 60
    assert len(lines) == 1 and "the tensor-parallel group broke" in lines[0], lines


def test_the_command_line_under_torchrun(tiny, tmp_path):
    """`torchrun --nproc-per-node 2 msrnn generate --tp 2` prints once, what one process prints."""
    directory = tiny[0]
    save_char_tokenizer(directory, VOCAB)
    args = ["generate", directory, "--prompt", "Once upon a time", "--policy", "tova", "--size",
            "8", "--max-new-tokens", "30", "--dtype", "float64"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "msrnn.cli", *args], capture_output=True,
                         text=True, timeout=300, env=env, cwd=ROOT)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "msrnn.cli", *args, "--tp", "2"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert "terminate called" not in two.stderr and "Traceback" not in two.stderr, two.stderr
    assert len(one.stdout) == 31 and two.stdout == one.stdout
    bad = subprocess.run([sys.executable, "-m", "msrnn.cli", *args, "--tp", "2"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert bad.returncode == 2 and "torchrun" in bad.stderr

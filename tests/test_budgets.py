"""Budgets per layer and per KV head (Policy.budget), what a policy sees (Candidates.layer, the
ordered view), and the policies of examples/policies/ against the plain reference.

Each example runs on msrnn's decoder and inside transformers (msrnn.hf), in float64, with a
ragged batch of two prompts entered `sequential`ly and `oneshot`, then fixed new tokens: the
logits and the positions every layer and KV head keeps equal tests/reference_budgets.py's (a
list of k per layer, a list of states per KV head) at every step. A policy whose budget is a
uniform k is the plain policy bit for bit; the compiled step is one graph and equals the eager
one; two ranks (tensor parallel, gloo) keep what one process keeps.
"""

import os
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.multiprocessing as mp
from torch._dynamo.utils import counters

import msrnn
import msrnn.hf
from msrnn.policies import REGISTRY, TOVA, Candidates, import_file
from msrnn.prompt import fill
from reference_families import Rule
from reference_budgets import Budgeted
from tiny import save, tiny_hf

torch.set_num_threads(1)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "policies"
VOCAB, K, STEPS, LENGTHS = 256, 8, 10, [22, 13]
TOL = 1e-5          # transformers rotates in float32 even for a float64 model (test_backends)


@pytest.fixture(scope="module")
def examples():
    """The example files, imported as a user's --policy-module would be; their names leave the
    registry afterwards, so that the other tests see the built-in registry only."""
    before = dict(REGISTRY)
    mods = {f.stem: import_file(str(f)) for f in sorted(EXAMPLES.glob("*.py"))}
    yield mods
    REGISTRY.clear()
    REGISTRY.update(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny LLaMA (2 layers, 4 query heads, 2 KV heads) in float64: the HF model, msrnn's
    decoder and transformers as a backend, and the checkpoint's directory."""
    hf = tiny_hf("llama", seed=3, vocab_size=VOCAB)
    directory = save(hf, tmp_path_factory.mktemp("budgets"))
    hf = hf.double()
    return hf, msrnn.load(directory, dtype=torch.float64), msrnn.hf.HFBackend(hf), directory


def cases(ex):
    """name -> (the policy for the tiny model, the reference's rule and arguments)."""
    duo = ex["duo_attention"].DuoAttention(K, sinks=2, window=4, kv_heads=2,
                                           retrieval=((0, 0), (1, 1)))
    return {
        "pyramidkv": (ex["pyramidkv"].PyramidKV(K), Rule.tova(K), dict(budgets=[12, 4])),
        "snapkv": (ex["snapkv"].SnapKV(K, observation=4, kernel=3), Rule.tova_head(K),
                   dict(budgets=[K, K], observation=4, kernel=3)),
        "duo": (duo, Rule("duo", K, sinks=2, per_head=True),
                dict(budgets=[[K, 4], [4, K]], retrieval={(0, 0), (1, 1)})),
        "streaming-llm": (ex["streaming_llm"].StreamingLLM(K), Rule.sinks_(K, 4),
                          dict(budgets=[K, K], positions="cache")),
        "random": (ex["random_evict"].RandomEvict(K, seed=5, sinks=1),
                   Rule("hash", K, sinks=1, seed=5), dict(budgets=[K, K])),
    }


def rows(seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(VOCAB, generator=g)[:n] for n in LENGTHS]


FEED = torch.randint(0, VOCAB, (STEPS, len(LENGTHS)), generator=torch.Generator().manual_seed(9))


def kept(positions):
    """[B, Hkv, n] -> [row][KV head] -> positions, without the -1s of shorter rows."""
    return [[[p for p in head if p >= 0] for head in row] for row in positions.tolist()]


def run(backend, policy, mode, positions="original", step=None):
    """[(logits [B, V], kept positions per layer)] after the prompts and after each step."""
    state, logits = fill(backend, rows(), policy, mode, STEPS, positions)
    layers = range(state.shape.layers)
    out = [(logits, [kept(state.positions(l)) for l in layers])]
    for ids in FEED:
        logits, state = (step or backend).step(ids, state)
        out.append((logits, [kept(state.positions(l)) for l in layers]))
    return out


def reference(hf, rule, args, mode):
    """The same run by the reference, one prompt (row) at a time."""
    args = dict(args)
    positions = args.pop("positions", "original")
    out = [([], []) for _ in range(STEPS + 1)]
    for b, row in enumerate(rows()):
        ref = Budgeted(hf, rule, positions=positions, **args)
        logits = ref.oneshot(row.tolist())[-1] if mode == "oneshot" else \
            [ref.step(int(x)) for x in row][-1]
        for t in range(STEPS + 1):
            if t:
                logits = ref.step(int(FEED[t - 1, b]))
            out[t][0].append(logits)
            out[t][1].append([ref.kept(l) for l in range(ref.n_layers)])
    return [(torch.stack(la), [[row[l] for row in ka] for l in range(len(ka[0]))])
            for la, ka in out]


def assert_same(got, want, what, tol=TOL):
    for t, ((la, ka), (lb, kb)) in enumerate(zip(got, want)):
        err = (la - lb).abs().max().item()
        assert err <= tol, f"{what} step {t}: logits differ by {err:.3g}"
        assert ka == kb, f"{what} step {t}: kept positions differ\n {ka}\n {kb}"


@torch.inference_mode()
@pytest.mark.parametrize("mode", ["sequential", "oneshot"])
@pytest.mark.parametrize("name", ["pyramidkv", "snapkv", "duo", "streaming-llm", "random"])
def test_example_equals_reference_on_both_backends(examples, models, name, mode):
    hf, ours, theirs, _ = models
    policy, rule, args = cases(examples)[name]
    want = reference(hf, rule, args, mode)
    positions = args.get("positions", "original")
    for backend in (ours, theirs):
        assert_same(run(backend, policy, mode, positions), want,
                    f"{name} {mode} {type(backend).__module__}")
    evicted = sum(len(h) for h in want[-1][1][0][0]) < LENGTHS[0] + STEPS
    assert evicted                                       # the run saw evictions


def test_examples_are_short_cite_their_paper_and_register(examples):
    for f in EXAMPLES.glob("*.py"):
        text = f.read_text()
        body = text.split('"""', 2)[2]                   # after the module docstring
        code = [line for line in body.splitlines() if line.strip() and
                not line.strip().startswith("#")]
        assert len(code) <= 25, (f.name, len(code))
        assert "import msrnn." not in text.replace("from msrnn.policies import", "")
        assert "et al., 20" in text.split('"""')[1], f.name      # the paper, in the docstring
        assert "@register(" in text, f.name
    for name in ("snapkv", "pyramidkv", "duo", "streaming-llm", "random"):
        assert name in REGISTRY


# ------------------------------------------------------------------ uniform is plain

@torch.inference_mode()
@pytest.mark.parametrize("mode", ["sequential", "oneshot"])
def test_uniform_budget_is_the_plain_policy_bit_for_bit(models, mode):
    from dataclasses import dataclass

    @dataclass(frozen=True, repr=False)
    class Layered(TOVA):
        def budget(self, layer, layers):
            return self.size

    @dataclass(frozen=True, repr=False)
    class Headed(TOVA):
        def budget(self, layer, layers):
            return (self.size, self.size)

    _, ours, theirs, _ = models
    for plain, budgeted in ((TOVA(K), Layered(K)),
                            (TOVA(K, per_head=True), Headed(K, per_head=True))):
        for backend in (ours, theirs):
            a, b = run(backend, plain, mode), run(backend, budgeted, mode)
            for (la, ka), (lb, kb) in zip(a, b):
                assert torch.equal(la, lb) and ka == kb


# ------------------------------------------------------------------ compiled, tensor parallel

def test_compiled_step_with_budgets_is_one_graph(examples, models):
    """Layers of different sizes and heads of different budgets (DuoAttention's heads, with
    PyramidKV's falling budgets on top) in one graph, compiled once."""
    from dataclasses import dataclass

    @dataclass(frozen=True, repr=False)
    class Both(examples["duo_attention"].DuoAttention):
        def budget(self, layer, layers):
            return tuple(b + 2 * (layers - 1 - layer) for b in super().budget(layer, layers))

    _, ours, _, _ = models
    name, policy = "duo+pyramid", Both(K, sinks=2, window=4, kv_heads=2,
                                        retrieval=((0, 0), (1, 1)))
    assert [policy.budget(l, 2) for l in range(2)] == [(10, 6), (4, 8)]
    with torch.inference_mode():
        eager = run(ours, policy, "sequential")
    compiled = ours.compile_step()
    torch._dynamo.reset()
    counters.clear()
    got = run(ours, policy, "sequential", step=compiled)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert_same(got, eager, f"compiled {name}", 1e-6)   # fused kernels round otherwise


def rank_main(rank, port, directory, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", TORCHELASTIC_USE_AGENT_STORE="True")   # test_tp.store's
    torch.set_num_threads(1)
    ex = {f.stem: import_file(str(f)) for f in sorted(EXAMPLES.glob("*.py"))}
    model = msrnn.load(directory, dtype=torch.float64, tp=2)
    with torch.inference_mode():
        result = {name: run(model, case[0], "sequential") for name, case in cases(ex).items()
                  if name in ("duo", "pyramidkv")}
    result["kv"] = model.plan.kv
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_tensor_parallel_keeps_each_heads_budget(examples, models, tmp_path):
    """Two ranks of one KV head each: each keeps its own head's budget and the positions one
    process keeps for that head."""
    _, ours, _, directory = models
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
        for name in ("duo", "pyramidkv"):
            want = run(ours, cases(examples)[name][0], "sequential")
            for r in range(2):
                got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
                a, b = got["kv"]
                mine = [(la, [[row[a:b] for row in layer] for layer in ka]) for la, ka in want]
                assert_same(got[name], mine, f"{name} rank {r}", 1e-10)


# ------------------------------------------------------------------ what a policy sees

def test_ordered_view_of_the_slots():
    g = torch.Generator().manual_seed(0)
    pos = torch.stack([torch.randperm(12, generator=g)[:7] * 3 for _ in range(6)]).view(2, 3, 7)
    pos[0, 1, 2] = pos[1, 2, 0] = pos[1, 2, 5] = -1                     # empty slots
    x = torch.rand(2, 3, 7, generator=g)
    c = Candidates(x, x, pos, torch.tensor(40), None, None, {}, layer=1, heads=(0, 1, 2))
    y = c.by_position(x)
    for b in range(2):
        for h in range(3):
            slots = sorted(range(7), key=lambda s: (pos[b, h, s] < 0, pos[b, h, s]))
            assert y[b, h].tolist() == [x[b, h, s].item() for s in slots]
    assert torch.equal(c.to_slots(y), x)
    layerwise = c.by_position(x[:, :1])                                  # [B, 1, S]: head 0's
    assert torch.equal(layerwise, y[:, :1])


# ------------------------------------------------------------------ bad budgets

def bad(returned, each_head=True):
    from dataclasses import dataclass, field

    @dataclass(frozen=True, repr=False)
    class Bad(TOVA):
        per_head: bool = field(default=each_head, kw_only=True)

        def budget(self, layer, layers):
            return returned if layer == 1 else self.size
    return Bad(K)


@pytest.mark.parametrize("returned, per_head, message", [
    (0, True, "a budget must be a positive integer"),
    (-3, True, "a budget must be a positive integer"),
    (2.5, True, "a budget must be a positive integer"),
    (True, True, "a budget must be a positive integer"),
    ((4, 4, 4), True, "3 budgets, but the layer has 2 KV heads"),
    ((4, 0), True, "a budget must be a positive integer"),
    ((4, 6), False, "per_head"),
])
def test_bad_budgets_are_refused_before_any_work(models, returned, per_head, message):
    _, ours, theirs, _ = models
    policy = bad(returned, per_head)
    for make in (lambda: ours.init_state(1, policy),
                 lambda: msrnn.hf.MultiStateCache(theirs.model, policy)):
        with pytest.raises(ValueError, match=message) as e:
            make()
        text = str(e.value)
        assert "Bad(8" in text and "layer=1" in text and f"returned {returned!r}" in text


def test_budget_ranges_use_the_largest_budget(examples):
    from msrnn.positions import Scheme, reach
    pyramid = examples["pyramidkv"].PyramidKV(16)
    assert [pyramid.budget(l, 4) for l in range(4)] == [24, 19, 13, 8]   # sum 64 = 4 x 16
    assert reach(pyramid, Scheme.CACHE, 10**6, layers=4) == 24
    assert reach(pyramid, Scheme.CACHE, 10**6) == 16                     # layers unknown


# ------------------------------------------------------------------ a user's policy everywhere

USER = '''
from dataclasses import dataclass
from msrnn.policies import TOVA, register


@register("halves", "TOVA with the lower layer keeping twice the upper")
@dataclass(frozen=True, repr=False)
class Halves(TOVA):
    def budget(self, layer, layers):
        return self.size if layer else 2 * self.size
'''


def cli(*args):
    """`python -m msrnn.cli ARGS` in a fresh process (a fresh registry): (code, out, err)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "msrnn.cli", *args], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out.returncode, out.stdout, out.stderr


ROOT = EXAMPLES.parent.parent


def test_a_policy_registered_later_is_in_the_registry_help_and_checks(tmp_path):
    from msrnn.policies import NAMES, describe, from_name
    before = dict(REGISTRY)
    path = tmp_path / "user_policy.py"
    path.write_text(USER)
    try:
        import_file(str(path))
        assert "halves" in NAMES and "halves" in describe()
        assert from_name("halves", 4).budget(0, 2) == 8
    finally:
        REGISTRY.clear()
        REGISTRY.update(before)
    code, out, _ = cli("generate", "--policy-module", str(path), "--help")
    assert code == 0 and "halves" in out and "--policy-module FILE.py" in out
    code, out, _ = cli("ppl", "--policy-module", str(path), "--help")
    assert code == 0 and "halves" in out


def test_a_users_policy_runs_through_a_command(tmp_path):
    from tiny import save_char_tokenizer
    directory = tmp_path / "model"
    save(tiny_hf("llama", eos_token_id=None), directory)
    save_char_tokenizer(directory)
    code, out, err = cli("generate", str(directory), "--prompt", "Once upon a time, there",
                         "--policy", "pyramidkv", "--size", "8", "--max-new-tokens", "12",
                         "--policy-module", str(EXAMPLES / "pyramidkv.py"))
    assert code == 0, err
    assert "PyramidKV(8)" in err and "13 slots x 2 layers" in err
    assert "32 states at most" in err                    # (12 + 4) x 2 KV heads: 2 x 8 x 2


def test_bad_policy_modules_are_one_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import nothing_by_this_name\n")
    for path, what in ((tmp_path / "missing.py", "no such file"),
                       (broken, "ModuleNotFoundError: No module named 'nothing_by_this_name'")):
        code, out, err = cli("ppl", "--policy-module", str(path), "--policies", "tova")
        assert code == 2 and not out
        assert err.strip() == f"msrnn ppl: error: --policy-module {path}: {what}" or \
            (err.count("\n") == 1 and str(path) in err and what in err), err


def test_two_policies_under_one_name_are_refused_naming_both():
    from dataclasses import dataclass

    from msrnn.policies import register
    with pytest.raises(ValueError, match=r"'tova' is taken by msrnn\.policies\.TOVA; "
                       r"test_budgets\..*Mine must register another name"):
        @register("tova", "mine")
        @dataclass(frozen=True, repr=False)
        class Mine(TOVA):
            pass
    assert REGISTRY["tova"][0] is TOVA


def test_installed_plugins_register_through_the_entry_point_group(monkeypatch, tmp_path):
    import importlib.metadata
    import sys

    from msrnn.policies import load_plugins
    (tmp_path / "plugin_policies.py").write_text(USER)
    monkeypatch.syspath_prepend(str(tmp_path))
    point = importlib.metadata.EntryPoint("halves", "plugin_policies", "msrnn.policies")
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [point] if group == "msrnn.policies" else [])
    before = dict(REGISTRY)
    try:
        load_plugins()
        assert "halves" in REGISTRY
    finally:
        REGISTRY.clear()
        REGISTRY.update(before)
        sys.modules.pop("plugin_policies", None)
    bad = importlib.metadata.EntryPoint("gone", "no_such_plugin_module", "msrnn.policies")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [bad])
    with pytest.raises(ValueError, match=r"policy plugin gone \(no_such_plugin_module\): "
                       r"ModuleNotFoundError"):
        load_plugins()

"""Long-range evaluation (msrnn/experiments/evaluate.py, `msrnn ppl`, `msrnn retention`) on a tiny model.

Perplexity with Full must be transformers' own (one parallel forward pass per chunk); with a
bounded policy it must be what stepping the plain reference (tests/reference.py) gives; the
masked parallel shortcut for Window and Sinks must equal stepping; a sweep must resume without
recomputing and never leave half-written files; bad input must fail clearly.
"""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import msrnn
from msrnn import cli
from msrnn.experiments import evaluate
from msrnn.experiments import output
from msrnn.policies import TOVA, Sinks, Window
from reference_families import Reference, Rule
from tiny import save, save_char_tokenizer, tiny_hf

CONTEXT = 48
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. However little known the feelings or views of such "
        "a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
        "minds of the surrounding families, that he is considered as the rightful property of "
        "some one or other of their daughters.\n")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaMA (vocabulary 128) with a character tokenizer, and two text files: 3 + 2
    chunks of CONTEXT tokens (and a remainder that is dropped)."""
    directory = tmp_path_factory.mktemp("ppl")
    hf = tiny_hf("llama", seed=2)
    save(hf, directory / "model")
    save_char_tokenizer(directory / "model")
    a, b = directory / "a.txt", directory / "b.txt"
    a.write_text(TEXT[: 3 * CONTEXT + 7])
    b.write_text(TEXT[100: 100 + 2 * CONTEXT + 20])
    return hf, str(directory / "model"), [str(a), str(b)]


def ppl_cli(capsys, model, texts, *extra):
    """Run `msrnn ppl ... --json`; (exit code, parsed stdout or None, stderr)."""
    code = cli.main(["ppl", model, "--text", *texts, "--context", str(CONTEXT), "--json", *extra])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def chunks_of(texts):
    """The chunks `msrnn ppl` should cut: character ids, whole chunks of CONTEXT, per text."""
    out = []
    for path in texts:
        ids = [ord(c) for c in open(path).read()]
        out += [ids[i:i + CONTEXT] for i in range(0, len(ids) - CONTEXT + 1, CONTEXT)]
    return torch.tensor(out)


def test_full_equals_transformers_forward(tiny, capsys):
    hf, model, texts = tiny
    code, rows, _ = ppl_cli(capsys, model, texts, "--policies", "full")
    assert code == 0
    chunks = chunks_of(texts)
    assert len(chunks) == 5
    with torch.no_grad():
        logits = hf(chunks).logits[:, :-1]                      # one parallel pass per chunk
    nll = F.cross_entropy(logits.transpose(1, 2).double(), chunks[:, 1:], reduction="mean")
    ppl = pytest.approx(math.exp(nll), rel=1e-5)
    assert rows == [{"policy": "full", "size": None, "positions": "original", "ppl": ppl,
                     "tokens": 5 * (CONTEXT - 1), "buckets": [[1, CONTEXT, ppl]]}]


@pytest.mark.parametrize("cells", [1, 7, 300, 512])
def test_loss_in_pieces_equals_the_whole(tiny, cells):
    """token_nll computes the logits a few row-positions at a time (so that memory does not grow
    with the context); any piece size must give the loss of the whole [B, n, V] logits."""
    _, model, _ = tiny
    m = msrnn.load(model, dtype=torch.float64)
    hidden = torch.randn(3, 29, m.cfg.dim, dtype=torch.float64)
    targets = torch.randint(0, 128, (3, 29))
    whole = F.cross_entropy(m.logits(hidden).transpose(1, 2), targets, reduction="none")
    got = evaluate.token_nll(m, hidden, targets, cells=cells)      # float32, as the sweeps sum it
    torch.testing.assert_close(got.double(), whole, rtol=1e-6, atol=1e-6)


def reference_ppl(hf, chunks, rule):
    """exp(mean NLL) of tokens 2..N of every chunk, each stepped by the plain reference from an
    empty multi-state."""
    total, count = 0.0, 0
    for chunk in chunks.tolist():
        ref = Reference(hf, rule)
        for t in range(len(chunk) - 1):
            logits = ref.step(chunk[t])
            total -= torch.log_softmax(logits, -1)[chunk[t + 1]].item()
            count += 1
    return math.exp(total / count)


@pytest.mark.parametrize("name, rule", [("tova", Rule.tova(8)), ("h2o", Rule.h2o(8)),
                                        ("sinks", Rule.sinks_(8, 4)), ("window", Rule.window(8))])
def test_bounded_equals_stepping_the_reference(tiny, capsys, name, rule):
    """Run in float64 on both sides: near-ties then cannot send the two down different paths."""
    hf, model, texts = tiny
    code, rows, _ = ppl_cli(capsys, model, texts, "--policies", name, "--sizes", "8",
                            "--dtype", "float64", "--batch", "2")
    assert code == 0, _
    expected = reference_ppl(hf.double(), chunks_of(texts), rule)
    assert rows[0]["ppl"] == pytest.approx(expected, rel=1e-6)
    assert rows[0]["tokens"] == 5 * (CONTEXT - 1)


@pytest.mark.parametrize("policy", [Window(6), Sinks(9, sinks=3), Window(1), Sinks(5, sinks=4)],
                         ids=repr)
def test_window_shortcut_equals_stepping(tiny, policy):
    """Window and Sinks run as one masked parallel pass (Window.visible); stepping them must
    give the same negative log-likelihoods."""
    _, model_dir, texts = tiny
    model = msrnn.load(model_dir)
    ids = chunks_of(texts)[:3]
    shortcut = evaluate.chunk_nll(model, ids, policy)
    state = model.init_state(3, policy)
    stepped = []
    for t in range(CONTEXT - 1):
        logits, state = model.step(ids[:, t], state)
        stepped.append(F.cross_entropy(logits, ids[:, t + 1], reduction="none"))
    assert (shortcut - torch.stack(stepped, 1)).abs().max() <= 1e-5


def test_batches_and_jobs_change_nothing(tiny, capsys):
    _, model, texts = tiny
    args = ["--policies", "full,tova,sinks", "--sizes", "6,12"]
    _, one, _ = ppl_cli(capsys, model, texts, *args, "--batch", "1")
    _, many, _ = ppl_cli(capsys, model, texts, *args, "--batch", "4", "--jobs", "2")
    assert [(r["policy"], r["size"]) for r in one] == [
        ("full", None), ("tova", 6), ("tova", 12), ("sinks", 6), ("sinks", 12)]
    for a, b in zip(one, many):
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-5)


def test_interrupted_sweep_resumes_without_recomputing(tiny, capsys, tmp_path, monkeypatch):
    _, model, texts = tiny
    out = tmp_path / "sweep"
    args = ["--policies", "full,window,tova", "--sizes", "6,12", "--out", str(out),
            "--batch-configs", "1"]                     # a configuration at a time
    computed = []
    real = evaluate.position_nll

    def interrupted_after_three(model, chunks, policy, *a, **k):
        if len(computed) == 3:
            raise KeyboardInterrupt
        computed.append(repr(policy))
        return real(model, chunks, policy, *a, **k)

    monkeypatch.setattr(evaluate, "position_nll", interrupted_after_three)
    with pytest.raises(KeyboardInterrupt):
        ppl_cli(capsys, model, texts, *args)
    saved = json.loads((out / "results.json").read_text())["results"]
    assert [(r["policy"], r["size"]) for r in saved] == [("full", None), ("window", 6),
                                                         ("window", 12)]
    assert (out / "results.csv").read_text().count("\n") == 4          # header + 3 rows
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]    # no half-written file

    computed.clear()
    monkeypatch.setattr(evaluate, "position_nll", lambda *a, **k: (computed.append(repr(a[2])),
                                                                   real(*a, **k))[1])
    code, rows, _ = ppl_cli(capsys, model, texts, *args)
    assert code == 0 and computed == ["[TOVA(6)]", "[TOVA(12)]"]       # only what was missing
    assert [r["ppl"] for r in rows[:3]] == [r["ppl"] for r in saved]
    assert (out / "ppl.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "ppl-position.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((out / "results.json").read_text())["results"]) == 5

    # Another setup in the same directory is refused, not mixed in.
    code, _, err = ppl_cli(capsys, model, texts[:1], *args)
    assert code == 2 and "another setup" in err


def test_two_runs_sharing_a_directory_keep_each_others_rows(tmp_path):
    """Two runs with one --out directory (say `--positions cache` and `compressed`, in two
    terminals), both started before either saved a row: each save keeps the other's rows."""
    a, b = (output.Results(str(tmp_path), {"s": 1}, ("i",), ["i", "who"]) for _ in range(2))
    for i in range(3):
        a.add({"i": f"a{i}", "who": "a"})
        b.add({"i": f"b{i}", "who": "b"})
    saved = json.loads((tmp_path / "results.json").read_text())["results"]
    assert sorted(r["i"] for r in saved) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert (tmp_path / "results.csv").read_text().count("\n") == 7
    assert len(a.rows) == 5 and len(b.rows) == 6              # each knows what it has seen


@pytest.mark.parametrize("make", [True, False])
def test_runs_making_one_directory_at_once(tmp_path, monkeypatch, make):
    """Two runs started together with one new --out directory: the other run makes it between
    this one's look and its own make (played here by a make that finds it made). Neither may
    fail with "file exists" (both did, before)."""
    from msrnn import paths

    out = tmp_path / "grid" / "results"
    name = "makedirs" if make else "mkdir"                      # what writable_dir calls
    real, calls = getattr(os, name), []

    def raced(path, *args, **kwargs):
        if not calls:                                # the other run makes it, just now
            calls.append(path)
            out.mkdir(parents=True)
        return real(path, *args, **kwargs)           # FileExistsError

    monkeypatch.setattr(os, name, raced)
    assert paths.writable_dir(str(out), "--out", make=make) == str(out)
    assert out.is_dir()


WRITER = """
import sys
from msrnn.experiments.output import Results
results = Results(sys.argv[1], {"s": 1}, ("i",), ["i"])
for i in range(200):
    results.add({"i": sys.argv[2] + str(i)})
"""


def test_runs_saving_at_once_lose_no_row(tmp_path):
    """Processes that save rows into one directory at the same time (a lock around each
    read-merge-write): every row of every one is in the file."""
    import subprocess
    import sys

    runs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), who])
            for who in "abc"]
    assert [r.wait(timeout=120) for r in runs] == [0, 0, 0]
    saved = json.loads((tmp_path / "results.json").read_text())["results"]
    assert sorted(r["i"] for r in saved) == sorted(w + str(i) for w in "abc" for i in range(200))


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    output.write_atomic(str(path), "old")

    def fail(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        output.write_atomic(str(path), "new and longer")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]


@pytest.mark.parametrize("args, message", [
    (["--text", "missing.txt"], "text file not found: missing.txt"),
    (["--context", "4096"], "fewer than one chunk of --context 4096"),
    (["--sizes", "48"], "size 48 is not smaller than the context 48"),
    (["--policies", "tova,lru"], "unknown policy 'lru'"),
    (["--sizes", "8,x"], "--sizes must be comma-separated integers"),
    (["--jobs", "0"], "--jobs must be a positive integer, got 0"),
    (["--max-chunks", "0"], "--max-chunks must be a positive integer, got 0"),
])
def test_bad_input(tiny, capsys, args, message):
    _, model, texts = tiny
    argv = ["ppl", model, "--text", *texts, "--context", str(CONTEXT), "--policies", "tova",
            "--sizes", "8"]
    code = cli.main(argv + args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_retention_counts_what_stepping_keeps(tiny, capsys, tmp_path):
    """`retention` against a plain count: step TOVA(k) and read state.positions after every step."""
    _, model_dir, texts = tiny
    model = msrnn.load(model_dir)
    chunks, k = chunks_of(texts), 10
    r = evaluate.retention(model, chunks, k, batch_size=2, horizon=CONTEXT // 2)
    L, N, T = model.cfg.n_layers, len(chunks), CONTEXT
    lifetime = torch.zeros(L, N, T, dtype=torch.long)
    first_kept = torch.ones(L, N, dtype=torch.bool)
    recent = torch.zeros(L, dtype=torch.float64)
    for n in range(N):
        state = model.init_state(1, TOVA(k))
        for t in range(T):
            model.step(chunks[n:n + 1, t], state)
            for layer in range(L):
                kept = state.positions(layer)[0, 0].tolist()
                for p in kept:
                    lifetime[layer, n, p] += 1
                first_kept[layer, n] &= 0 in kept
                if t >= k:
                    recent[layer] += sum(p > t - k for p in kept) / k
    recent /= N * (T - k)
    assert torch.equal(r["lifetime"], lifetime.clamp(max=CONTEXT // 2)[:, :, :T - CONTEXT // 2])
    assert torch.equal(r["first_kept"], first_kept)
    assert torch.allclose(r["recent"], recent)

    code = cli.main(["retention", model_dir, "--text", *texts, "--context", str(CONTEXT),
                     "--size", str(k), "--out", str(tmp_path), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["size"] == k and len(summary["layers"]) == L
    assert json.loads((tmp_path / "retention.json").read_text()) == summary
    assert (tmp_path / "retention.png").read_bytes()[:4] == b"\x89PNG"


def test_transformers_backend_gives_the_same_perplexity(tiny, capsys):
    """`msrnn ppl --backend transformers` runs each policy inside transformers (msrnn.hf)."""
    _, model, texts = tiny
    args = ["--policies", "full,tova,h2o,sinks", "--sizes", "8", "--dtype", "float64"]
    _, ours, _ = ppl_cli(capsys, model, texts, *args)
    code, theirs, err = ppl_cli(capsys, model, texts, *args, "--backend", "transformers")
    assert code == 0, err
    assert [(r["policy"], r["size"], r["tokens"]) for r in ours] == \
        [(r["policy"], r["size"], r["tokens"]) for r in theirs]
    for a, b in zip(ours, theirs):
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-6), (a, b)


def test_transformers_backend_gives_the_same_retention(tiny, capsys):
    """`msrnn retention --backend transformers` follows TOVA inside transformers: the same
    numbers as msrnn's decoder (float64)."""
    _, model, texts = tiny
    argv = ["retention", model, "--text", *texts, "--context", str(CONTEXT), "--size", "10",
            "--dtype", "float64", "--json"]
    summaries = []
    for backend in ("msrnn", "transformers"):
        code = cli.main(argv + ["--backend", backend])
        out, err = capsys.readouterr()
        assert code == 0, err
        summaries.append(json.loads(out))
    ours, theirs = summaries
    assert (ours.pop("backend"), theirs.pop("backend")) == ("msrnn", "transformers")
    assert ours == theirs

"""The teaching reference stays true: docs/msrnn.md's worked trace is what the library computes,
the page names only functions that exist, and scripts/step_by_step.py draws the multi-state and
runs a prompt either way (sequential or oneshot); `msrnn retention --plot` draws it too."""

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import torch

import msrnn
from msrnn import cli, evaluate, trace
from msrnn.policies import TOVA
from msrnn.prompt import prefill
from tiny import save, save_char_tokenizer, tiny_hf

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs/msrnn.md"
PNG = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the worked trace


def test_trace_tables_are_in_the_doc_verbatim():
    """Regenerate the trace with the library (python -m msrnn.trace) and find it in the page."""
    doc = DOC.read_text()
    tova, comparison = trace.tables().split("\n\n")
    assert tova in doc, "docs/msrnn.md's TOVA trace is stale: paste `python -m msrnn.trace`"
    assert comparison in doc, "docs/msrnn.md's policy comparison is stale"


def test_trace_shows_what_the_doc_says_it_shows():
    """Fill phase, an ordinary eviction, the new token leaving, a tie to the oldest."""
    steps = trace.run(TOVA(trace.K))
    assert len(steps) == 6 and all(len(s["slots"]) == trace.K + 1 for s in steps)
    assert [s["evicted"] for s in steps[:3]] == [None] * 3                 # filling
    assert [s["kept"] for s in steps[:3]] == [[0], [0, 1], [0, 1, 2]]
    assert steps[3]["evicted"] not in (0, 3)                               # an ordinary eviction
    assert steps[4]["evicted"] == 4 and steps[4]["kept"] == steps[3]["kept"]   # the new token
    s = steps[5]
    a = dict(zip(s["slots"], s["attention"]))
    tied = [p for p in a if p >= 0 and a[p] == a[s["evicted"]]]
    assert len(tied) == 2 and s["evicted"] == min(tied)                     # oldest on ties
    for s in steps:                                   # attention over the filled slots sums to 1
        assert sum(a for p, a in zip(s["slots"], s["attention"]) if p >= 0) == pytest.approx(1)
        assert all(a == 0 for p, a in zip(s["slots"], s["attention"]) if p < 0)
    # The freed slot takes the next token: slot of position 2 holds 4, then 5.
    assert [steps[t]["slots"][2] for t in (3, 4, 5)] == [2, 4, 5]


# ----------------------------------------------------------------------------- names in the doc

INSTANCES = {"model": "Transformer", "state": "MultiState", "policy": "Policy", "cfg": "Config"}
MISSING = object()


def resolve(name: str):
    """Find a dotted name of the doc in msrnn: a module path (msrnn.trace.run), a class or
    function of one of msrnn's modules (LayerState.evict, visible), or an instance alias
    (policy.size, cfg.dim: a class attribute or a dataclass field). MISSING if not found."""
    parts = name.split(".")
    if parts[0] == "msrnn":
        obj, rest = msrnn, parts[1:]
    else:
        first = INSTANCES.get(parts[0], parts[0])
        modules = ["msrnn.model", "msrnn.state", "msrnn.attention", "msrnn.prompt",
                   "msrnn.policies", "msrnn.generate", "msrnn.evaluate", "msrnn.trace",
                   "msrnn.loading", "msrnn.config", "msrnn"]
        if parts[0] in {"model", "state", "attention", "prompt", "policies", "generate",
                        "evaluate", "trace"} and \
                len(parts) > 1 and parts[0] not in INSTANCES:
            modules = [f"msrnn.{parts[0]}"]
            first, parts = None, parts[1:]
        obj = None
        for m in modules:
            mod = importlib.import_module(m)
            if first is None:
                obj = mod
                break
            if hasattr(mod, first):
                obj = getattr(mod, first)
                break
        if obj is None:
            return MISSING
        rest = parts[1:] if first is not None else parts
    for attr in rest:
        if hasattr(obj, attr):
            obj = getattr(obj, attr)
        elif attr in getattr(obj, "__annotations__", {}):
            obj = None                             # a field every instance has
        else:
            return MISSING
    return obj


def code_names(text: str) -> set[str]:
    """The names of code in backticks: `Class.method`, `module.function`, `function(...)` and
    bare class names (`LayerState`); symbols of the equations (`H_t`, `k`, `E`) are skipped."""
    names = set()
    for span in re.findall(r"`([^`\n]+)`", text):
        m = re.fullmatch(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(\(.*\))?", span.strip())
        if not m:
            continue
        name, call = m.groups()
        if "." in name and not re.fullmatch(r"[a-z]\.\w+", name):
            names.add(name)
        elif call is not None and len(name) > 3:  # rotate(x, cos, sin), not min(t, k)
            names.add(name)
        elif re.fullmatch(r"[A-Z][a-z]+[A-Z]?\w*", name) and len(name) > 3:
            names.add(name)                       # LayerState, Candidates, Window, KeyNorm
        elif name in {"TOVA", "H2O"}:
            names.add(name)
    # The code blocks' right-hand column names functions too: Class.method there.
    for block in re.findall(r"^```\n(.*?)^```", text, re.M | re.S):
        names |= set(re.findall(r"\b([A-Z]\w*\.[a-z_]\w*)\b", block))
    return names


def test_doc_names_only_functions_that_exist():
    names = code_names(DOC.read_text())
    # The page must cite the functions the issue asked about, by their current names.
    for needed in ["Attention.qkv", "RoPE.forward", "LayerState.priority", "LayerState.evict",
                   "Policy.score", "Policy.observe", "MultiState.advance",
                   "prompt.parallel_prefix", "Attention.prefill", "attention.column_sums",
                   "attention.step", "attention.prompt",
                   "H2O.observe", "msrnn.trace.run", "msrnn.generate"]:
        assert needed in names, needed
    missing = sorted(n for n in names if resolve(n) is MISSING)
    assert not missing, f"docs/msrnn.md names what does not exist: {missing}"
    assert resolve("LayerState.nonexistent") is MISSING          # the check can fail
    assert resolve("RoPE.rotate") is MISSING and resolve("nowhere") is MISSING


def test_doc_numbers_the_papers_equations():
    doc = DOC.read_text()
    for n in range(1, 10):
        assert f"Eq. {n}" in doc, n
    assert "g(t) = min(t, k)" in doc
    assert "![" in doc and (REPO / "docs/img/multistate.png").read_bytes()[:8] == PNG


# ----------------------------------------------------------------------------- the pictures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaMA (2 layers, 2 KV heads) with a character tokenizer, and a text file."""
    directory = tmp_path_factory.mktemp("teaching")
    save(tiny_hf("llama", seed=3), directory / "model")
    save_char_tokenizer(directory / "model")
    text = directory / "a.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession "
                    "of a good fortune, must be in want of a wife. " * 2)
    return str(directory / "model"), str(text)


def step_by_step():
    spec = importlib.util.spec_from_file_location("step_by_step", REPO / "scripts/step_by_step.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_step_by_step_plot(tiny, tmp_path, capsys):
    model_dir, _ = tiny
    path = tmp_path / "kept.png"
    step_by_step().main([model_dir, "--prompt", "Once upon a time", "--size", "4", "--compact",
                         "--max-new-tokens", "5", "--plot", str(path), "--layers", "0,1"])
    out = capsys.readouterr().out
    assert "prompt mode: sequential" in out and f"plot: {path}" in out
    assert path.read_bytes()[:8] == PNG
    assert not list(tmp_path.glob("*.tmp*"))                     # written under a temporary name


def test_step_by_step_oneshot(tiny, capsys):
    """--prompt-mode oneshot says so, runs the prompt as one pass and keeps what
    Transformer.prefill(mode="oneshot") keeps, then steps the new tokens."""
    model_dir, _ = tiny
    prompt = "Once upon a time there was"
    step_by_step().main([model_dir, "--prompt", prompt, "--size", "6", "--compact",
                         "--prompt-mode", "oneshot", "--max-new-tokens", "4", "--layer", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("prompt mode: oneshot")
    steps = [l for l in lines if l.startswith("t=")]
    n = len(prompt)
    assert steps[0].startswith(f"t={n - 1:4d}") and 1 <= len(steps) <= 4
    model, tok = msrnn.load(model_dir), msrnn.load_tokenizer(model_dir)
    state = model.init_state(1, TOVA(6))
    with torch.inference_mode():
        prefill(model, torch.tensor([tok.encode(prompt)]), state, mode="oneshot")
    kept = " ".join(map(str, state.positions(1)[0, 0].tolist()))
    assert steps[0].endswith(f"| kept {kept}")
    assert "| evicted [" in steps[0]            # 26 prompt tokens, 6 kept: the rest are listed


def test_step_by_step_rejects_bad_layers(tiny, capsys):
    model_dir, _ = tiny
    with pytest.raises(SystemExit):
        step_by_step().main([model_dir, "--prompt", "abc", "--plot", "x.png", "--layers", "0,7"])
    assert "--layers must name layers in 0..1" in capsys.readouterr().err


def test_retention_plot(tiny, tmp_path, capsys):
    """`msrnn retention --plot` draws, for the first chunk, what stepping TOVA(k) keeps."""
    model_dir, text = tiny
    model, tok = msrnn.load(model_dir), msrnn.load_tokenizer(model_dir)
    chunks = evaluate.load_chunks(tok, [text], 40)
    k = 8
    r = evaluate.retention(model, chunks, k, batch_size=2, record=[1])
    state = model.init_state(1, TOVA(k))
    for t in range(40):
        model.step(chunks[:1, t], state)
        expect = torch.zeros(40, dtype=torch.bool)
        expect[state.positions(1)[0, 0]] = True
        assert torch.equal(r["kept"][1][:, t], expect), t
    path = tmp_path / "kept.png"
    code = cli.main(["retention", model_dir, "--text", text, "--context", "40", "--size", str(k),
                     "--plot", str(path), "--layers", "0,1", "--json"])
    assert code == 0 and path.read_bytes()[:8] == PNG
    capsys.readouterr()

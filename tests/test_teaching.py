"""The teaching reference stays true: docs/msrnn.md's worked trace is what the library computes,
the page names only functions that exist, and scripts/step_by_step.py draws the multi-state and
runs a prompt either way (sequential or oneshot); `msrnn retention --plot` draws it too."""

import importlib
import importlib.util
import inspect
import io
import re
import tokenize
from pathlib import Path

import pytest
import torch

import msrnn
from msrnn import cli, trace
from msrnn.experiments import evaluate
from msrnn.policies import H2O, TOVA
from msrnn.prompt import prefill
from tiny import save, save_char_tokenizer, tiny_hf

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs/msrnn.md"
PNG = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the worked trace


def test_trace_tables_are_in_the_doc_verbatim():
    """Regenerate the trace with the library (python -m msrnn.trace) and find it in the page."""
    doc = DOC.read_text()
    tables = trace.tables()
    assert len(tables) == 4
    for name, table in zip(["TOVA trace", "step 4 head by head", "TOVA against TOVA-head",
                            "other policies"], tables):
        assert table in doc, f"docs/msrnn.md's {name} is stale: paste `python -m msrnn.trace`"


def test_trace_shows_what_the_doc_says_it_shows():
    """In the paper's time (steps and tokens from 1, H_0 empty): fill phase, an ordinary
    eviction, the new token leaving, a tie to the oldest; per layer against per KV head."""
    steps = trace.run(TOVA(trace.K))
    assert [s["t"] for s in steps] == [1, 2, 3, 4, 5, 6]
    assert all(len(slots) == trace.K + 1 for s in steps for slots in s["slots"])
    assert all(s["kept"][0] == s["kept"][1] for s in steps)          # one choice per layer
    kept = [s["kept"][0] for s in steps]
    evicted = [s["evicted"][0] for s in steps]
    assert evicted[:3] == [None] * 3 and kept[:3] == [[1], [1, 2], [1, 2, 3]]   # filling
    assert all(len(h) == min(t, trace.K) for t, h in enumerate(kept, 1))         # g(t)
    assert evicted[3] not in (1, 4)                                  # an ordinary eviction
    assert evicted[4] == 5 and kept[4] == kept[3]                    # the new token leaves
    s = steps[5]
    a = dict(zip(s["slots"][0], s["score"][0]))
    tied = [j for j in a if j is not None and a[j] == a[evicted[5]]]
    assert len(tied) == 2 and evicted[5] == min(tied)                # oldest on ties
    for s in steps:                           # each head's attention over the filled slots is 1
        for h, row in enumerate(s["attention"]):
            slots = s["slots"][h // (trace.HQ // trace.HKV)]
            assert sum(x for j, x in zip(slots, row) if j is not None) == pytest.approx(1)
            assert all(x == 0 for j, x in zip(slots, row) if j is None)
    # The freed slot takes the next token: the slot of token 3 holds 5, then 6.
    assert [steps[t - 1]["slots"][0][2] for t in (4, 5, 6)] == [3, 5, 6]
    # Step 4: each KV head's group would drop its own token, the layer's mean a third one.
    head = trace.run(TOVA(trace.K, per_head=True))[3]["evicted"]
    assert len({*head, evicted[3]}) == 3
    # H2O's KV heads choose differently at some step.
    assert any(s["evicted"][0] != s["evicted"][1] for s in trace.run(H2O(trace.K)))
    doc = DOC.read_text()
    assert "H_0 = ∅" in doc and "| 0 | empty, empty, empty, empty | — | — | ∅ |" in doc


# ----------------------------------------------------------------------------- names in the doc

INSTANCES = {"model": "Transformer", "state": "MultiState", "policy": "Policy", "cfg": "Config"}
MISSING = object()


def resolve(name: str):
    """Find a dotted name of the doc in msrnn: a module path (msrnn.trace.run), a class or
    function of one of msrnn's modules (LayerState.evict, visible) or of the plain reference
    (Reference.evict, tests/reference.py), or an instance alias
    (policy.size, cfg.dim: a class attribute or a dataclass field). MISSING if not found."""
    parts = name.split(".")
    if parts[0] == "msrnn":
        n = 1                         # the longest prefix that is a module (msrnn.hf too)
        while n < len(parts) and (REPO / "/".join(parts[:n + 1])).with_suffix(".py").is_file():
            n += 1
        obj, rest = importlib.import_module(".".join(parts[:n])), parts[n:]
    else:
        first = INSTANCES.get(parts[0], parts[0])
        modules = ["msrnn.model", "msrnn.state", "msrnn.attention", "msrnn.prompt",
                   "msrnn.policies", "msrnn.generate", "msrnn.experiments.evaluate", "msrnn.trace",
                   "msrnn.checkpoint.loading", "msrnn.config", "msrnn",
                   "reference"]       # tests/reference.py, the plain reference
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
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```$", text, re.M | re.S):
        if not lang:
            names |= set(re.findall(r"\b([A-Z]\w*\.[a-z_]\w*)\b", block))
    return names


def test_doc_names_only_functions_that_exist():
    names = code_names(DOC.read_text())
    # The page must cite the functions the issue asked about, by their current names.
    for needed in ["Attention.qkv", "RoPE.forward", "msrnn.state.priority", "LayerState.evict",
                   "Policy.score", "Policy.observe", "MultiState.advance",
                   "prompt.parallel_prefix", "Attention.parallel", "attention.column_sums",
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


# ----------------------------------------------------------------------------- the doc's claims

READ_FIRST = REPO / "tests/reference.py"


def test_the_plain_reference_is_the_first_read():
    """msrnn.md and the README send a reader to tests/reference.py before model.py, and the
    branch msrnn.md quotes next to Eq. 9 is the reference's, verbatim."""
    doc, readme = DOC.read_text(), (REPO / "README.md").read_text()
    for text in (doc, readme):
        first = text.index("tests/reference.py")
        assert first < text.index("msrnn/model.py") and first < text.index("Read it")
        assert "`Reference.layer_step`" in text and "`Reference.evict`" in text
    # README's first ten minutes: the step, Full = forward, the trace (no weights), the plain
    # reference, model.py; installing comes after.
    order = [readme.index(x) for x in ["(x_t, H_{t-1}) -> (y_t, H_t)",
                                       "## Full steps equal forward", "`python -m msrnn.trace`",
                                       "tests/reference.py", "msrnn/model.py", "## Install",
                                       "make demo"]]
    assert order == sorted(order), order
    quoted = re.search(r"^```python\n(.*?)^```$", doc[doc.index("(Eq. 9)"):], re.M | re.S)[1]
    lines = [line.strip() for line in quoted.splitlines()]
    assert lines == ["if k is None or len(C[0]) <= k:      # Full, or |C| <= k: nothing leaves",
                     "return C"]
    source = [line.strip() for line in READ_FIRST.read_text().splitlines()]
    i = source.index(lines[0])
    assert source[i + 1] == lines[1], "tests/reference.py's branch changed: quote it again"
    import reference
    assert "def evict" in inspect.getsource(reference.Reference.evict)


def test_the_plain_reference_runs_from_plain_weights(tmp_path):
    """tests/reference.py is under 150 lines, imports neither transformers nor msrnn, and runs
    from a checkpoint's safetensors and config.json alone: TOVA there keeps what msrnn keeps,
    with the same logits, and what reference_families.py (which extends it) computes."""
    import json

    from safetensors.torch import load_file

    import reference
    import reference_families

    source = READ_FIRST.read_text()
    assert len(source.splitlines()) < 150
    assert not re.search(r"^(import|from) (transformers|msrnn)", source, re.M)
    assert "import reference" in (REPO / "tests/reference_families.py").read_text()
    hf = tiny_hf("llama", seed=5)
    directory = save(hf, tmp_path)
    weights = load_file(f"{directory}/model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    core = reference.Reference(weights, cfg, reference.Rule("tova", 4))
    full = reference_families.Reference(hf.double(), reference_families.Rule.tova(4))
    model = msrnn.load(directory, dtype=torch.float64)
    state = model.init_state(1, TOVA(4))
    ids = torch.randperm(128, generator=torch.Generator().manual_seed(0))[:40]
    for t, x in enumerate(ids.tolist()):
        ours, _ = model.step(torch.tensor([x]), state)
        y = core.step(x)
        assert (ours[0] - y).abs().max() <= 1e-4, t
        assert (full.step(x) - y).abs().max() <= 1e-10, t
        for l in range(core.n_layers):
            assert core.kept(l) == full.kept(l) == state.positions(l)[0].tolist(), (t, l)
    assert core.kept(0)[0] != list(range(36, 40))          # TOVA, not a window, chose them
    assert all(s.key.shape == (16,) for s in core.H[0][0])   # K_j stored per KV head, unrotated


def test_the_hops_from_step_to_score():
    """msrnn.md lists the calls from Backend.step down to TOVA.score: each calls the next."""
    from msrnn import attention as multistate
    from msrnn.backend import Backend
    from msrnn.model import Attention, Block, Transformer
    from msrnn import state
    from msrnn.state import LayerState

    doc = DOC.read_text()
    block = doc[doc.index("```\nBackend.step"):]
    listed = [line.split()[0] for line in block.split("```")[1].strip().splitlines()]
    hops = [(Backend.step, "self._step("), (Backend._step, "self.compute_step("),
            (Transformer.compute_step, "block.step("),
            (Block.step, "self.attn.step("), (Attention.step, "attention.step("),
            (multistate.step, "state.evict("), (LayerState.evict, "rank("),
            (state.rank, "priority("), (state.priority, "policy.score(")]
    assert listed == ["Backend.step", "Backend._step", "Transformer.compute_step", "Block.step",
                      "Attention.step", "attention.step", "LayerState.evict", "state.rank",
                      "state.priority", "TOVA.score"]
    for function, call in hops:
        assert call in inspect.getsource(function), (function.__qualname__, call)
    assert inspect.getsource(TOVA.score).strip().splitlines()[-1].strip() == "return c.a"


def test_g_of_t_is_what_the_doc_says(tiny):
    """g(t) = min(t, k) comes from k + 1 slots and one eviction a step: after step t,
    MultiState.length is t and MultiState.positions lists min(t, k) positions (0-based: token
    j at j - 1); a ragged batch pads the shorter row with -1s in front."""
    model = msrnn.load(tiny[0])
    k = 3
    state = model.init_state(1, TOVA(k))
    assert state.length == 0 and state.positions(0).shape[-1] == 0             # H_0 = ∅
    for t in range(1, 8):
        model.step(torch.tensor([t]), state)
        assert state.length == t and state.slots == k + 1
        for l in range(model.cfg.n_layers):
            kept = state.positions(l)
            assert kept.shape == (1, model.cfg.n_kv_heads, min(t, k))
            assert int(kept.max()) <= t - 1                                     # positions j - 1
    doc = DOC.read_text()
    assert "[B, Hkv, min(t, k)]" in doc and "starts with `-1`s" in doc
    rows = []
    for n in (3, 1):
        row = model.init_state(1, TOVA(k))
        for t in range(n):
            model.step(torch.tensor([5 + t]), row)
        rows.append(row)
    batch = model.init_state(2, TOVA(k))
    for b, row in enumerate(rows):
        batch.set_rows(b, row)
    kept = batch.positions(0)
    assert kept.shape[-1] == 3 and (kept[1, :, :2] == -1).all() and (kept[1, :, 2] == 0).all()


def test_the_policy_table_says_who_chooses_per_head():
    """The "per" column of msrnn.md's policy table is each policy's per_head."""
    from msrnn.policies import H2O, KeyNorm, Sinks, Window

    doc = DOC.read_text()
    rows = {"`TOVA` (Eq. 9)": TOVA(4), "`TOVA(k, per_head=True)`": TOVA(4, per_head=True),
            "`Window`": Window(4), "`Sinks` (Window+i)": Sinks(4, 1), "`H2O`": H2O(4),
            "`KeyNorm`": KeyNorm(4)}
    for name, policy in rows.items():
        row = re.search(r"^\| " + re.escape(name) + r" \|.*$", doc, re.M)[0]
        per = row.split(" | ")[2]
        assert per == ("KV head" if policy.per_head else "layer"), (name, per)
    assert H2O.memory == ("acc",) and "(`H2O.memory` names it, `\"acc\"`)" in doc


def test_one_meaning_per_symbol():
    """The symbol table names each symbol once, and the spellings it retired are gone from the
    teaching text (msrnn.md, README, design.md, model.py's and policies.py's docstrings)."""
    doc = DOC.read_text()
    table = doc[doc.index("| symbol | meaning | code | renamed from |"):]
    table = table[:table.index("\n\n")].splitlines()[2:]
    symbols = [row.split(" | ")[0].lstrip("| ") for row in table]
    assert len(symbols) == len(set(symbols)) > 25, symbols
    import msrnn.model
    import msrnn.policies

    prose = doc.replace("\n".join(table), "")        # the table names what it renamed
    texts = {"docs/msrnn.md": prose, "README.md": (REPO / "README.md").read_text(),
             "docs/design.md": (REPO / "docs/design.md").read_text(),
             "docs/policies.md": (REPO / "docs/policies.md").read_text(),
             "msrnn/model.py": msrnn.model.__doc__, "msrnn/policies.py": msrnn.policies.__doc__
             + msrnn.policies.H2O.__doc__ + msrnn.policies.TOVA.__doc__}
    retired = ["sqrt(d)", "A_j", "k_t", "min(t + 1, k)", "y = sum", "y = Σ", "y_t = Σ",
               "s(j)", "H_0 = {0}", "a^s_h"]
    for name, text in texts.items():
        for old in retired:
            assert old not in text, f"{name} still writes {old!r}"

    # g is g(t), the state count, only: the gap function of `compressed` positions is φ, and a
    # KV head is kv; w is a checkpoint's sliding window only: the observation window is ω.
    import msrnn.positions

    rows = dict(zip(symbols, table))
    assert "sliding window" in rows["`w`"] and "observation window" in rows["`ω`"]
    assert "compressed" in rows["`φ`"] and "states a layer holds" in rows["`g(t)`"]
    texts |= {name: (REPO / name).read_text() for name in
              ["docs/results.md", "docs/performance.md", "tests/reference.py",
               "tests/reference_families.py", "scripts/step_by_step.py"]}
    texts |= {"msrnn/positions.py": inspect.getsource(msrnn.positions),
              "msrnn/policies.py (Policy)": msrnn.policies.Policy.__doc__}
    for name, text in texts.items():
        gap = re.search(r"\bg\((?!t\))", text)                # g(d), ceil(g(P)): not g(t)
        assert not gap, f"{name} writes the gap function as g: {text[gap.start():][:30]!r}"
        window = re.search(r"(observ\w*|--observe)\W{1,3}[wW]\b|\b[wW] = (1|16|64)\b", text)
        assert not window, f"{name} writes the observation window as w: " \
                           f"{text[window.start():][:40]!r}"
    for name in ["tests/reference.py", "tests/reference_families.py"]:
        names = {t.string for t in tokenize.generate_tokens(io.StringIO(texts[name]).readline)
                 if t.type == tokenize.NAME}
        assert "g" not in names, f"{name} names something g (a KV head is kv)"
    assert "φ(d)" in texts["msrnn/positions.py"] and "φ" in texts["docs/design.md"]
    assert re.search(r"\bg\((?!t\))", "ceil(g(P))")                # the checks can fail
    assert re.search(r"(observ\w*|--observe)\W{1,3}[wW]\b", "`--observe w`")


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
    prefill(mode="oneshot") keeps, then steps the new tokens."""
    model_dir, _ = tiny
    prompt = "Once upon a time there was"
    step_by_step().main([model_dir, "--prompt", prompt, "--size", "6", "--compact",
                         "--prompt-mode", "oneshot", "--max-new-tokens", "4", "--layer", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("prompt mode: oneshot")
    steps = [l for l in lines if l.startswith("t=")]
    n = len(prompt)
    assert steps[0].startswith(f"t={n:4d}") and 1 <= len(steps) <= 4     # the prompt's last step
    model, tok = msrnn.load(model_dir), msrnn.load_tokenizer(model_dir)
    state = model.init_state(1, TOVA(6))
    with torch.inference_mode():
        prefill(model, torch.tensor([tok.encode(prompt)]), state, mode="oneshot")
    kept = " ".join(str(p + 1) for p in state.positions(1)[0, 0].tolist())   # tokens j = p + 1
    assert steps[0].endswith(f"| kept {kept}")
    assert "| evicted [" in steps[0]            # 26 prompt tokens, 6 kept: the rest are listed


def test_step_by_step_counts_from_one(tiny, capsys):
    """Steps and tokens from 1, as in the paper and msrnn.trace: the first step is step 1 and
    reads token 1; with k = 3 the fill phase keeps tokens 1..t, and the first eviction is at
    step k + 1 = 4 (never a step 0 or a token [0])."""
    model_dir, _ = tiny
    prompt = "Once upon"
    step_by_step().main([model_dir, "--prompt", prompt, "--size", "3", "--compact",
                         "--max-new-tokens", "2", "--layer", "0", "--policy", "window"])
    steps = [l for l in capsys.readouterr().out.splitlines() if l.startswith("t=")]
    assert [int(l[2:6]) for l in steps] == list(range(1, len(steps) + 1))
    assert len(steps) >= len(prompt)
    kept = [l.split("| kept ")[1] for l in steps]
    assert kept[:4] == ["1", "1 2", "1 2 3", "2 3 4"]              # Window(3): token 1 leaves at 4
    assert "evicted nothing" in steps[2] and "evicted [1]'O'" in steps[3]
    step_by_step().main([model_dir, "--prompt", prompt, "--size", "3", "--max-new-tokens", "1",
                         "--layer", "0"])
    out = capsys.readouterr().out
    assert "\nstep 1: read 'O'" in out and "step 0" not in out and "[0]" not in out


def test_step_by_step_rejects_bad_layers(tiny, capsys):
    model_dir, _ = tiny
    with pytest.raises(SystemExit):
        step_by_step().main([model_dir, "--prompt", "abc", "--plot", "x.png", "--layers", "0,7"])
    assert "--layers must name layers in 0..1" in capsys.readouterr().err


def test_multistate_picture(tmp_path):
    """The picture msrnn.md describes: a panel per layer and a Window(k) panel beside them, a
    legend that says what "kept" and the new token's diagonal look like; labelled axes."""
    from msrnn.cli.evaluate import kept_matrix, plot_multistate, plot_retention

    # A hand-made run of k = 2: token 1 stays throughout, token 3 leaves at once.
    m = kept_matrix(list(enumerate([[0], [0, 1], [0, 1], [0, 3], [0, 4]])))
    assert m[:, 2].tolist() == [True, True, False, False, False]
    titles, legend = plot_multistate({7: m}, str(tmp_path / "m.png"), "t", prompt=2, window=2)
    assert (tmp_path / "m.png").read_bytes()[:8] == PNG
    assert titles == ["layer 7", "Window(2), every layer"]
    assert legend == ["kept: j in H_t", "new token x_t (j = t), kept",
                      "new token x_t, evicted at once", "last prompt token"]
    summary = {"layers": [{"layer": 0, "recent": 0.5, "first_kept": 1.0}]}
    labels = plot_retention(summary, {"lifetime": torch.tensor([[1, 2, 3]])},
                            str(tmp_path / "r.png"), "t")
    assert len(labels) == 2 and all(x and y for x, y in labels), labels


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


def test_step_by_step_rejects_an_unwritable_plot(tiny, capsys):
    """--plot is checked before the steps run: one line that says what failed and why."""
    model_dir, _ = tiny
    with pytest.raises(SystemExit):
        step_by_step().main([model_dir, "--prompt", "abc", "--plot", "/proc/nope/x.png"])
    err = capsys.readouterr().err
    assert "--plot /proc/nope/x.png: its directory /proc/nope: cannot create the directory in " \
           "/proc (" in err and "Traceback" not in err and "kept" not in err

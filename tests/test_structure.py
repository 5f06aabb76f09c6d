"""The package's layers: the library (msrnn.*) below, the command line (msrnn.cli.*) above.

Imports are read from the source (function-level imports included): the library never imports
the command line, and no chain of imports between modules comes back to where it started."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "msrnn"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def exists(name: str) -> bool:
    base = PACKAGE.parent.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """The msrnn modules a file imports, anywhere in it."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "msrnn"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "msrnn":
                base = node.module
            else:
                continue
            for alias in node.names:                 # `from . import policies`: a submodule
                sub = f"{base}.{alias.name}"
                found.add(sub if exists(sub) else base)
    return found - {here}


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_the_library_never_imports_the_command_line():
    # msrnn/__main__.py (`python -m msrnn`) is the command line's entry point, not the library.
    upward = {(m, d) for m, deps in GRAPH.items()
              if not m.startswith("msrnn.cli") and m != "msrnn.__main__"
              for d in deps if d.startswith("msrnn.cli")}
    assert not upward, upward


def test_no_import_cycle():
    # msrnn/__init__.py only re-exports the library; a module importing "msrnn" itself (e.g.
    # `from .. import load`) depends on those re-exports, so the package counts as a module.
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", " -> ".join(path + [m])
        state[m] = "open"
        for d in GRAPH.get(m, ()):
            visit(d, path + [m])
        state[m] = "done"

    for m in GRAPH:
        visit(m, [])


def test_the_graph_was_read():
    assert "msrnn.state" in GRAPH["msrnn.model"]
    assert "msrnn.experiments.evaluate" in GRAPH["msrnn.cli.evaluate"]


def test_no_library_class_is_over_150_lines():
    """One class per concept, each short enough to read at a sitting."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 150:
                long.append(f"{module_name(path)}.{node.name}: "
                            f"{node.end_lineno - node.lineno + 1} lines")
    assert not long, long


def calls(path: Path):
    """(name, positional arguments, enclosing function) of every call in a file whose callee is
    a name or an attribute (`x.evict(a, t)` -> ("evict", 2, ...)), read from the AST."""
    tree = ast.parse(path.read_text())
    scopes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef,
                                                                    ast.AsyncFunctionDef))]
    seen = set()
    for scope in reversed(scopes):                  # innermost functions first
        for node in ast.walk(scope):
            if isinstance(node, ast.Call) and id(node) not in seen:
                seen.add(id(node))
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if name:
                    yield name, len(node.args), scope


def callers(test) -> set:
    """The modules (besides msrnn.state, which defines them) with a call for which test(name,
    number of positional arguments, node) holds."""
    return {module_name(p) for p in PACKAGE.rglob("*.py") if module_name(p) != "msrnn.state"
            for name, n, node in calls(p) if test(name, n, node)}


def test_the_step_is_written_once():
    """Only msrnn.attention drives the multi-state's step: LayerState.insert(k, v, t),
    .evict(probs, t) and .keep_best(...); both backends call it, and neither holds a copy.
    Calls are read from the AST by their arity (list.insert(i, x) is innocent)."""
    step = {"insert": 3, "evict": 2}
    drivers = callers(lambda name, n, _: step.get(name) == n or name == "keep_best")
    assert drivers == {"msrnn.attention"}, drivers
    assert "msrnn.attention" in GRAPH["msrnn.model"] and "msrnn.attention" in GRAPH["msrnn.hf"]


def is_attention(name: str, scope) -> bool:
    """A call that computes attention: PyTorch's fused attention, or a softmax in a function
    that also multiplies two matrices (q @ K^T, matmul, einsum, bmm) however it is spelled."""
    if name in ("scaled_dot_product_attention", "flash_attention",
                "multi_head_attention_forward"):
        return True
    if name != "softmax":
        return False
    for sub in ast.walk(scope):
        if isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.MatMult):
            return True
        if isinstance(sub, ast.Call):
            f = sub.func
            if (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")) in \
                    ("matmul", "einsum", "bmm", "baddbmm"):
                return True
    return False


def test_attention_is_computed_once():
    """Attention (a softmax of q K^T, or PyTorch's fused kernel) is computed in msrnn.attention
    and nowhere else; a softmax over logits (sampling) is not attention."""
    attending = callers(lambda name, _, node: is_attention(name, node))
    assert attending <= {"msrnn.attention"}, attending
    assert "msrnn.attention" in {module_name(p) for p in PACKAGE.rglob("*.py")
                                 for name, _, node in calls(p) if is_attention(name, node)}


def test_the_bookkeeping_is_written_once():
    """MultiState.reserve and .advance (room for tokens, counting them) are called from one
    module besides state.py: the backend base (msrnn.backend), for every backend."""
    keepers = callers(lambda name, _, scope: name in ("reserve", "advance"))
    assert keepers == {"msrnn.backend"}, keepers


LAYERS = {"msrnn.checkpoint": 1, "msrnn": 2, "msrnn.experiments": 3, "msrnn.cli": 4,
          "msrnn.__main__": 5}


def layer(module: str) -> int:
    """The core (msrnn's own modules: config, policies, state, attention, ...) is layer 0;
    checkpoints 1; the package's re-exports 2; experiments 3; the command line 4."""
    if module in LAYERS:
        return LAYERS[module]
    parent = module.rsplit(".", 1)[0]
    return LAYERS[parent] if parent in LAYERS and parent != "msrnn" else 0


def test_no_upward_import():
    """Each layer imports only its own and those below: the core never reads checkpoints,
    experiments or the command line; experiments never import the command line."""
    upward = {(m, d) for m, deps in GRAPH.items() for d in deps if layer(d) > layer(m)}
    assert not upward, upward


def test_the_layout_shows_the_architecture():
    """The core at msrnn/, checkpoints in msrnn/checkpoint/, experiments in msrnn/experiments/."""
    core = {"config", "policies", "state", "attention", "positions", "prompt", "generate",
            "backend", "model", "hf", "tp", "group", "quantize", "trace", "paths", "statefile",
            "chat"}
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert top == core, top ^ core
    assert {p.stem for p in (PACKAGE / "checkpoint").glob("*.py")} >= {"loading", "convert",
                                                                       "tokenizer"}
    assert {p.stem for p in (PACKAGE / "experiments").glob("*.py")} >= {
        "evaluate", "needle", "tasks", "drift", "bench", "text", "sweep"}

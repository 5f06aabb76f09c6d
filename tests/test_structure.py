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


def test_the_step_is_written_once():
    """Only msrnn.attention drives the multi-state's step (insert, evict, keep_best): both
    backends call it, and neither holds a copy."""
    drivers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("insert", "evict", "keep_best") \
                    and isinstance(getattr(node, "ctx", None), ast.Load):
                if module_name(path) != "msrnn.state":
                    drivers.add(module_name(path))
    assert drivers == {"msrnn.attention"}, drivers
    assert "msrnn.attention" in GRAPH["msrnn.model"] and "msrnn.attention" in GRAPH["msrnn.hf"]

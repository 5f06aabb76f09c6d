"""The repository stands alone: a clone in an empty directory passes its tests and reproduces
its docs with nothing beside it.

No tracked file may point outside the repository (a sibling data directory, a machine's absolute
path, a design file that lives elsewhere), and every text under msrnn/data/ that the docs cite
must be in the clone."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Built from pieces so that this file does not match itself.
FORBIDDEN = [".." + "/shared", "/wo" + "rk/", "shared" + "/data", "shared" + "/notes",
             "DESIGN" + ".md"]


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / name for name in out.stdout.decode().split("\0") if name]


def test_no_file_refers_outside_the_repository():
    hits = []
    for path in tracked_files():
        if not path.is_file():                       # deleted in the working tree
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:                   # binary (images)
            continue
        for number, line in enumerate(text.splitlines(), 1):
            hits += [f"{path.relative_to(REPO)}:{number}: {s}" for s in FORBIDDEN if s in line]
    assert not hits, "references outside the repository:\n" + "\n".join(hits)


def test_texts_cited_by_the_docs_exist():
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    cited = {(doc.name, m) for doc in docs
             for m in re.findall(r"(?:tests|msrnn)/data/[\w.-]*\w",
                                 doc.read_text(encoding="utf-8"))}
    assert any(name == "results.md" for name, _ in cited)     # the perplexity commands
    missing = sorted(f"{name}: {path}" for name, path in cited if not (REPO / path).is_file())
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)

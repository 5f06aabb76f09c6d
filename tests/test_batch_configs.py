"""Configurations as the rows of one batch (`--batch-configs N`, experiments.sweep.batches).

Every sweep command gives the same results whether its configurations run one at a time or
together: perplexities equal to 1e-4 (relative, float32), the same answers and outputs; a run
resumed with another N mixes freely with what was saved; and the bad values are refused.
"""

import json
import os

import pytest
import torch

from msrnn.experiments.sweep import Config, batches, fit, spread
from msrnn.policies import H2O, TOVA, Full, Window
from test_hostile import refused, run
from tiny import save, save_char_tokenizer, tiny_hf

TEXT = ("All happy families are alike; each unhappy family is unhappy in its own way. Everything "
        "was in confusion in the Oblonskys' house. The wife had discovered that the husband was "
        "carrying on an intrigue with a French girl, who had been a governess in their family. ")
GRID = ["--policies", "full,tova,h2o,window,sinks", "--sizes", "8,16"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaMA (no EOS) with a character tokenizer, and a text of ~2,300 characters."""
    directory = tmp_path_factory.mktemp("rows")
    save(tiny_hf("llama", seed=6, eos_token_id=None, max_position_embeddings=1024),
         directory / "model")
    save_char_tokenizer(directory / "model")
    text = directory / "hay.txt"
    text.write_text(TEXT * 10)
    return str(directory / "model"), str(text)


def json_rows(capsys, *argv):
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    return json.loads(out), err


def saved(directory):
    return json.load(open(directory / "results.json"))["results"]


def test_ppl_one_at_a_time_equals_together_and_resumes_mixed(tiny, capsys, tmp_path):
    model, text = tiny
    argv = ["ppl", model, "--text", text, "--context", "64", "--max-chunks", "6", "--batch",
            "3", *GRID, "--positions", "original,cache", "--json"]
    one, _ = json_rows(capsys, *argv, "--batch-configs", "1", "--out", tmp_path / "one")
    many, err = json_rows(capsys, *argv, "--batch-configs", "16", "--out", tmp_path / "many")
    assert "(8 together)" in err          # 8 bounded configurations of each scheme
    assert [{k: r[k] for k in ("policy", "size", "positions")} for r in one] == \
        [{k: r[k] for k in ("policy", "size", "positions")} for r in many]
    assert len(one) == 1 + 2 * 8
    for a, b in zip(one, many):
        assert abs(a["ppl"] - b["ppl"]) <= 1e-4 * a["ppl"], (a, b)
        assert all(abs(x[2] - y[2]) <= 1e-4 * x[2] for x, y in zip(a["buckets"], b["buckets"]))
    # Half the grid one at a time, then the rest together: the same rows as a fresh run.
    mixed = tmp_path / "mixed"
    json_rows(capsys, "ppl", model, "--text", text, "--context", "64", "--max-chunks", "6",
              "--batch", "3", "--policies", "tova,window", "--sizes", "8,16", "--positions",
              "original", "--batch-configs", "1", "--out", mixed, "--json")
    rest, err = json_rows(capsys, *argv, "--batch-configs", "5", "--out", mixed)
    assert "4 done before" in err
    assert [r["policy"] for r in rest] == [r["policy"] for r in one]
    for a, b in zip(one, rest):
        assert abs(a["ppl"] - b["ppl"]) <= 1e-4 * a["ppl"]
    # One at a time: 4, then Full and Window+4's two (a positional policy's sequential prompt
    # is one masked pass: it runs alone); together: H2O's two, and 5 + 3 of `cache`.
    assert sorted(r["batched"] for r in saved(mixed)) == [1] * 7 + [2] * 2 + [3] * 3 + [5] * 5


def test_needle_one_at_a_time_equals_together(tiny, capsys, tmp_path):
    model, text = tiny
    for mode in ("oneshot", "sequential"):
        argv = ["needle", model, "--haystack", text, "--lengths", "200", "--depths", "0.5",
                *GRID, "--samples", "2", "--max-new-tokens", "4", "--prompt-mode", mode]
        json_rows(capsys, *argv, "--batch-configs", "1", "--out", tmp_path / f"one-{mode}",
                  "--json")
        json_rows(capsys, *argv, "--out", tmp_path / f"all-{mode}", "--json")   # the default
        a, b = saved(tmp_path / f"one-{mode}"), saved(tmp_path / f"all-{mode}")
        assert [(r["policy"], r["size"], r["answers"], r["correct"]) for r in a] == \
            [(r["policy"], r["size"], r["answers"], r["correct"]) for r in b]


def test_tasks_and_drift_one_at_a_time_equal_together(tiny, capsys, tmp_path):
    model, text = tiny
    argv = ["tasks", model, "--tasks", "niah_single,vt", "--lengths", "500",
            "--depths", "0.5", "--policies", "tova,h2o,window", "--sizes", "16,32", "--samples",
            "2", "--max-new-tokens", "4", "--json"]
    json_rows(capsys, *argv, "--batch-configs", "1", "--out", tmp_path / "t1")
    json_rows(capsys, *argv, "--batch-configs", "6", "--out", tmp_path / "t6")
    assert [r["answers"] for r in saved(tmp_path / "t1")] == \
        [r["answers"] for r in saved(tmp_path / "t6")]
    argv = ["drift", model, "--text", text, "--policies", "full,window,tova,h2o", "--sizes",
            "12", "--samples", "2", "--new-tokens", "8", "--prompt-tokens", "30", "--json"]
    json_rows(capsys, *argv, "--batch-configs", "1", "--out", tmp_path / "d1")
    json_rows(capsys, *argv, "--batch-configs", "3", "--out", tmp_path / "d3")
    assert [r["outputs"] for r in saved(tmp_path / "d1")] == \
        [r["outputs"] for r in saved(tmp_path / "d3")]


def test_retention_sizes_one_at_a_time_equal_together(tiny, capsys, tmp_path):
    model, text = tiny
    argv = ["retention", model, "--text", text, "--context", "64", "--max-chunks", "3",
            "--batch", "2", "--size", "8,12,20", "--dtype", "float64", "--json"]
    one, _ = json_rows(capsys, *argv, "--batch-configs", "1", "--out", tmp_path / "one")
    together, _ = json_rows(capsys, *argv, "--batch-configs", "3", "--plot",
                            tmp_path / "kept.png", "--layers", "0")
    assert one == together and [r["size"] for r in one] == [8, 12, 20]
    alone, _ = json_rows(capsys, *argv[:-4], "12", "--dtype", "float64", "--json")
    assert alone == one[1]                                      # one size: one summary, as before
    assert {f"retention-{k}.json" for k in (8, 12, 20)} <= set(os.listdir(tmp_path / "one"))
    assert {f"kept-{k}.png" for k in (8, 12, 20)} <= set(os.listdir(tmp_path))


def test_batches_group_by_scheme_keep_full_apart_and_keep_order():
    cfg = [Config("full", None, Full()), Config("tova", 8, TOVA(8)),
           Config("tova", 8, TOVA(8), "cache"), Config("h2o", 8, H2O(8)),
           Config("window", 8, Window(8)), Config("tova", 16, TOVA(16), "cache")]
    items = batches([({"length": 1}, cfg)], 2)
    assert [[(c.name, c.positions) for c in group] for _, group in items] == [
        [("full", "original")], [("tova", "original"), ("h2o", "original")],
        [("window", "original")], [("tova", "cache"), ("tova", "cache")]]
    assert [len(g) for _, g in batches([({}, cfg)], 1)] == [1] * 6
    # Sequential prompts: Window at the original positions is one masked pass, alone.
    items = batches([({}, cfg)], 4, sequential=True)
    assert [[(c.name, c.positions) for c in group] for _, group in items] == [
        [("full", "original")], [("tova", "original"), ("h2o", "original")],
        [("tova", "cache"), ("tova", "cache")], [("window", "original")]]
    items = batches([({}, cfg[1:2] + cfg[4:5] + cfg[3:4])], 4, sequential=True)
    assert [[c.name for c in group] for _, group in items] == [["tova", "h2o"], ["window"]]


def test_spread_splits_the_largest_items_until_every_worker_has_one():
    cfg = [Config("tova", k, TOVA(k)) for k in (8, 9, 10, 11, 12)]
    one = [({"length": 1}, cfg), ({"length": 2}, cfg[:2])]
    names = lambda items: [(cell["length"], [c.size for c in group]) for cell, group in items]
    assert names(spread(one, 2)) == names(one)                     # enough items already
    assert names(spread(one, 3)) == [(1, [8, 9, 10]), (1, [11, 12]), (2, [8, 9])]
    assert names(spread(one, 5)) == [(1, [8]), (1, [9]), (1, [10]), (1, [11, 12]), (2, [8, 9])]
    # Never below one configuration an item, whatever the workers.
    assert names(spread(one, 100)) == [(1, [k]) for k in (8, 9, 10, 11, 12)] + [(2, [8]),
                                                                                  (2, [9])]


def test_the_default_fits_a_quarter_of_memory(tiny):
    from msrnn.config import Config as ModelConfig
    cfg = ModelConfig.from_hf(json.load(open(f"{tiny[0]}/config.json")))
    n, each = fit(cfg, rows=8, slots=257, tokens=2048, budget=1 << 30)
    state = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * 257 * 4
    assert each == 8 * (state + 4 * 2048 * cfg.dim * 4)
    assert n == (1 << 30) // each and fit(cfg, 8, 257, 2048, budget=1)[0] == 1


def test_ppl_fits_the_chunks_there_are_not_the_batch(tiny, capsys):
    """One chunk under --batch 8 is one row per configuration: the default counts one."""
    from msrnn.config import Config as ModelConfig
    model, text = tiny
    cfg = ModelConfig.from_hf(json.load(open(f"{model}/config.json")))
    _, err = json_rows(capsys, "ppl", model, "--text", text, "--context", "1000", "--max-chunks",
                       "1", "--batch", "8", "--policies", "tova", "--sizes", "8,16", "--json")
    said = int(err.split(" MiB each")[0].rsplit("(", 1)[1])
    one, eight = (round(fit(cfg, rows, 17, 1000)[1] / 2**20) for rows in (1, 8))
    assert said == one != eight


@pytest.mark.parametrize("command", ["ppl", "retention", "needle", "tasks", "drift"])
def test_batch_configs_must_be_positive(tiny, capsys, command):
    model, text = tiny
    extra = {"ppl": ["--text", text], "needle": ["--haystack", text], "tasks": [],
             "drift": ["--text", text], "retention": ["--text", text]}[command]
    refused(capsys, "--batch-configs must be a positive integer", command, model, *extra,
            "--batch-configs", "0")

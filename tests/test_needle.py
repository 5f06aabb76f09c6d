"""Needle retrieval (msrnn/experiments/needle.py, `msrnn needle`): prompts of exactly the requested length
with the fact at the requested depth, the same for every policy; scoring; the command line's
files, resume and refusals on a tiny model; and on the default model, Full finds the fact and a
window that cannot see it does not."""

import json
import os

import pytest
import torch

import msrnn
from msrnn.experiments import needle
from msrnn.experiments import text as texts
from msrnn.data import BOOKS                      # the two books msrnn ships
from msrnn.policies import TOVA, Full, Window
from test_hostile import refused, run
from tiny import save, save_char_tokenizer, tiny_hf

RANGE = 1024
TEXT = ("All happy families are alike; each unhappy family is unhappy in its own way. Everything "
        "was in confusion in the Oblonskys' house. The wife had discovered that the husband was "
        "carrying on an intrigue with a French girl, who had been a governess in their family. ")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaMA (range 1024) with a character tokenizer (no chat template), and a
    haystack text of about 2,300 characters (= tokens)."""
    directory = tmp_path_factory.mktemp("needle")
    save(tiny_hf("llama", eos_token_id=None, max_position_embeddings=RANGE), directory / "model")
    save_char_tokenizer(directory / "model")
    text = directory / "hay.txt"
    text.write_text(TEXT * 10)
    return str(directory / "model"), str(text)


def hay(model_dir, text):
    tok = msrnn.load_tokenizer(model_dir)
    return tok, texts.haystacks(tok, [open(text).read()])


@pytest.mark.parametrize("length", [517, 800])
@pytest.mark.parametrize("depth", [0.25, 0.5, 0.75])
def test_prompt_length_and_depth(tiny, length, depth):
    tok, haystacks = hay(*tiny)
    ids, numbers, where = needle.build_prompts(tok, haystacks, length, depth, 3, seed=1)
    assert ids.shape == (3, length)
    for row, n, i in zip(ids.tolist(), numbers, where):
        assert abs(i - depth * length) <= 1
        fact = texts.plain(tok, " " + needle.NEEDLE[0].format(n=n))
        assert row[i:i + len(fact)] == fact and 10000 <= n <= 99999
        assert tok.decode(row).endswith(needle.NEEDLE[1])      # no chat template: raw prompt


def test_depth_ends_and_passkey(tiny):
    tok, haystacks = hay(*tiny)
    ids, numbers, where = needle.build_prompts(tok, haystacks, 300, 0.0, 2, seed=0)
    assert where == [0, 0]                                    # no template head, no BOS
    ids, numbers, where = needle.build_prompts(tok, haystacks, 300, 1.0, 2, seed=0)
    text = tok.decode(ids[0].tolist())
    assert text.endswith(needle.NEEDLE[0].format(n=numbers[0]) + "\n\n" + needle.NEEDLE[1])
    filler = texts.filler(tok, 300)
    ids, numbers, _ = needle.build_prompts(tok, filler, 300, 0.5, 2, seed=0, task="passkey")
    text = tok.decode(ids[0].tolist())
    assert "The sky is blue." in text and f"The pass key is {numbers[0]}." in text


def test_same_prompts_for_every_policy_and_seed(tiny):
    tok, haystacks = hay(*tiny)
    a = needle.build_prompts(tok, haystacks, 300, 0.5, 4, seed=3)
    b = needle.build_prompts(tok, haystacks, 300, 0.5, 4, seed=3)
    c = needle.build_prompts(tok, haystacks, 300, 0.5, 4, seed=4)
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    assert not torch.equal(a[0], c[0])
    # One shared prompt pass for several policies answers as each policy alone does.
    model = msrnn.load(tiny[0])
    together = needle.answer(model, a[0], [Full(), TOVA(32), Window(16)], max_new_tokens=4)
    for policy, (new, _) in zip([Full(), TOVA(32), Window(16)], together):
        alone = needle.answer(model, a[0], [policy], max_new_tokens=4)[0][0]
        assert torch.equal(new, alone), policy


def test_score():
    assert needle.score("The secret number is 48213.", 48213)
    assert needle.score("48213", 48213)
    assert not needle.score("The secret number is 48214.", 48213)
    assert not needle.score("The secret number is 482130.", 48213)      # six digits
    assert not needle.score("The secret number is 4821.", 48213)
    assert not needle.score("12345, no: 48213", 48213)                  # the first one counts


def test_command_json_files_and_resume(tiny, capsys, tmp_path):
    model, text = tiny
    argv = ["needle", model, "--haystack", text, "--lengths", "200,300", "--depths", "0,0.5",
            "--policies", "full,tova", "--sizes", "32,64", "--samples", "2", "--max-new-tokens",
            "3", "--out", tmp_path / "out", "--json"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "no chat template" in err and "raw prompt" in err
    rows = json.loads(out)
    assert len(rows) == 2 * 2 * (1 + 2)
    assert set(rows[0]) == {"policy", "size", "length", "depth", "accuracy", "samples"}
    assert rows[0]["policy"] == "full" and rows[0]["size"] is None
    assert all(0 <= r["accuracy"] <= 1 and r["samples"] == 2 for r in rows)
    files = set(os.listdir(tmp_path / "out"))
    assert {"results.json", "results.csv", "needle-full-full.png", "needle-tova-32.png",
            "needle-tova-64.png", "needle-grid.png", "needle-sizes.png"} <= files
    saved = json.load(open(tmp_path / "out" / "results.json"))["results"]
    assert all(r["seconds"] >= 0 and r["tokens_per_s"] > 0 for r in saved)
    code, again, err = run(capsys, *argv)                      # nothing left to run
    assert code == 0 and json.loads(again) == rows and "0 cells to run" in err


def test_a_budgeted_policy_runs_where_its_smallest_layer_evicts(tiny, capsys, tmp_path):
    """PyramidKV(256) on two layers keeps 384 and 128 states: at 200 tokens its top layer
    evicts, so the cell runs; TOVA(256) keeps all 200 and is
    skipped."""
    model, text = tiny
    pyramid = os.path.join(os.path.dirname(__file__), "..", "examples", "policies",
                           "pyramidkv.py")
    code, out, err = run(capsys, "needle", model, "--haystack", text, "--lengths", "200,300",
                         "--depths", "0.5", "--policies", "tova,pyramidkv", "--sizes", "256",
                         "--policy-module", pyramid, "--samples", "1", "--max-new-tokens", "2",
                         "--json")
    assert code == 0, err
    ran = sorted((r["policy"], r["length"]) for r in json.loads(out))
    assert ran == [("pyramidkv", 200), ("pyramidkv", 300), ("tova", 300)]
    assert "tova 256 at length 200: the multi-state holds the whole prompt, skipped" in err
    assert "pyramidkv 256 at length 200" not in err


def test_the_shipped_books_are_the_default_haystack(tiny, capsys, tmp_path, monkeypatch):
    """Without --haystack, the needle hides in the two books inside the package: from any
    directory."""
    model, _ = tiny
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "needle", model, "--lengths", "300", "--depths", "0.5",
                         "--policies", "tova", "--sizes", "32", "--samples", "1",
                         "--max-new-tokens", "2", "--out", "out", "--json")
    assert code == 0, err
    assert [r["policy"] for r in json.loads(out)] == ["tova"]
    setup = json.load(open(tmp_path / "out" / "results.json"))["setup"]
    assert setup["haystack"] == [os.path.basename(b) for b in BOOKS]


@pytest.mark.parametrize("args, message", [
    (["--haystack", "SHORT"], "tokens, shorter than the longest --lengths 300"),
    (["--depths", "0,1.5"], "--depths must be in [0, 1]"),
    (["--depths", "0,x"], "--depths must be comma-separated numbers"),
    (["--lengths", "2000", "--haystack", "BIG"], "past the model's range of 1024"),
    (["--sizes", "300"], "--sizes 300 is not smaller than --lengths 300"),
    (["--policies", "full,tova,bogus"], "unknown policy 'bogus'"),
    (["--out", "FILE"], "is a file, not a directory; give a directory"),
    (["--lengths", "100"], "--lengths 100 is too short"),
    (["--haystack", "MISSING"], "text file not found"),
    (["--samples", "0"], "--samples must be a positive integer"),
    (["--policies", "h2o", "--sinks", "2"], "policy 'h2o' has no sinks"),
])
def test_refuses(capsys, tiny, tmp_path, args, message):
    model, text = tiny
    big = tmp_path / "big.txt"
    big.write_text(TEXT * 20)
    (tmp_path / "file").write_text("x")
    (tmp_path / "short.txt").write_text(TEXT)
    swap = {"SHORT": str(tmp_path / "short.txt"), "BIG": str(big), "FILE": str(tmp_path / "file"), "MISSING": str(tmp_path / "no.txt")}
    args = [swap.get(a, a) for a in args]
    base = {"--haystack": text, "--lengths": "300", "--depths": "0.5", "--policies": "tova",
            "--sizes": "32", "--samples": "2"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    argv = [x for kv in base.items() for x in kv]
    refused(capsys, message, "needle", model, *argv)


# ----------------------------------------------------------------------------- the default model

@pytest.fixture(scope="module")
def default():
    from test_convert import default_model_dir
    directory = default_model_dir()
    tok = msrnn.load_tokenizer(directory)
    haystacks = texts.haystacks(tok, [open(p, encoding="utf-8").read() for p in BOOKS])
    return msrnn.load(directory), tok, haystacks


def test_default_model_full_retrieves_and_a_short_window_cannot(default):
    model, tok, haystacks = default
    full, = needle.retrieval(model, tok, haystacks, [Full()], 512, 0.5, samples=5, seed=0)
    assert full["correct"] >= 4, full["answers"]
    window, = needle.retrieval(model, tok, haystacks, [Window(32)], 512, 0.5, samples=2,
                               seed=0)                # at Full's length: the needle ~250 back
    assert window["correct"] == 0, window["answers"]


def test_transformers_backend_gives_the_same_answers(tiny, capsys, tmp_path):
    """`msrnn needle --backend transformers` runs every policy inside transformers (msrnn.hf):
    the same rows as msrnn's decoder, in both prompt modes (float64)."""
    model, text = tiny
    for mode in ("oneshot", "sequential"):
        argv = ["needle", model, "--haystack", text, "--lengths", "200", "--depths", "0.5,1",
                "--policies", "full,tova,h2o,sinks", "--sizes", "32", "--samples", "2",
                "--max-new-tokens", "4", "--dtype", "float64", "--prompt-mode", mode, "--json"]
        rows = []
        for backend in ("msrnn", "transformers"):
            code, out, err = run(capsys, *argv, "--backend", backend,
                                 "--out", str(tmp_path / f"{mode}-{backend}"))
            assert code == 0, err
            rows.append(json.loads(out))
        assert rows[0] == rows[1]
        answers = [[r["answers"] for r in json.load(open(tmp_path / f"{mode}-{b}" /
                                                          "results.json"))["results"]]
                   for b in ("msrnn", "transformers")]
        assert answers[0] == answers[1]

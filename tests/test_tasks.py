"""RULER's synthetic tasks (msrnn/experiments/tasks.py, `msrnn tasks`) and generation drift (msrnn/experiments/drift.py,
`msrnn drift`): every task's prompts have exactly the requested length and a plain-Python solver
recovers the expected answers from the prompt text alone; the scorer's edge cases; the drift
measures against hand-worked values on a tiny model; the two commands' files, resume and
refusals, on both backends."""

import json
import math
import os
import re
from collections import Counter

import pytest
import torch

import msrnn
from msrnn.experiments import drift, needle, tasks
from msrnn.experiments import text as texts
from msrnn.data import BOOKS
from msrnn.policies import Full, Window
from test_hostile import refused, run
from tiny import save, save_char_tokenizer, tiny_hf

TEXT = ("All happy families are alike; each unhappy family is unhappy in its own way. Everything "
        "was in confusion in the Oblonskys' house. The wife had discovered that the husband was "
        "carrying on an intrigue with a French girl, who had been a governess in their family. ")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaMA (range 1024) with a character tokenizer (no chat template), a haystack text
    and the books' word list."""
    directory = tmp_path_factory.mktemp("tasks")
    save(tiny_hf("llama", eos_token_id=None, max_position_embeddings=1024), directory / "model")
    save_char_tokenizer(directory / "model")
    text = directory / "hay.txt"
    text.write_text(TEXT * 12)
    tok = msrnn.load_tokenizer(str(directory / "model"))
    words = tasks.vocabulary([open(b, encoding="utf-8").read() for b in BOOKS])
    return str(directory / "model"), str(text), tok, texts.haystacks(tok, [TEXT * 12]), words


UNORDERED = ("niah_multivalue", "vt", "cwe")      # answers in any order


def solve(task, text):
    """The answers, read from the prompt's text by plain Python (no model)."""
    question = text[text.rindex("\n\n"):]
    if task in tasks.NIAH:
        facts = re.findall(r"special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", text)
        asked = re.search(r"numbers? for (.+?) mentioned", question).group(1)
        keys = re.split(r", | and ", asked)
        values = [v for key in keys for k, v in facts if k == key]
        return sorted(values) if task in UNORDERED else values
    if task == "vt":
        value = re.search(r"assigned the value (\d+) in", question).group(1)
        pairs = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", text)
        holds = {a for a, b in pairs if b == value}
        while True:
            more = {a for a, b in pairs if b[4:] in holds} - holds
            if not more:
                return sorted(holds)
            holds |= more
    body = text[:text.rindex("\n\nQuestion")].split(".\n")[-1]
    counts = Counter(re.findall(r"[a-z]+", body))
    top = [w for w, _ in counts.most_common(tasks.COMMON if task == "cwe" else tasks.FREQUENT)]
    return sorted(top) if task == "cwe" else top


@pytest.mark.parametrize("length", [700, 1000])
@pytest.mark.parametrize("task", tasks.TASKS)
def test_prompts_have_the_length_and_a_solver_finds_the_answers(tiny, task, length):
    _, _, tok, haystacks, words = tiny
    for depth in ([0.0, 0.5, 1.0] if task in tasks.DEPTH else [None]):
        ids, expected = tasks.build(tok, task, haystacks, words, length, depth, 3, seed=1)
        assert ids.shape == (3, length)
        for row, answers in zip(ids.tolist(), expected):
            text = tok.decode(row)
            got = solve(task, text)
            assert got == (sorted(answers) if task in UNORDERED else answers), (task, depth)
            assert len(answers) == {"niah_single": 1, "niah_multikey": 1, "vt": 5, "cwe": 10,
                                    "fwe": 3}.get(task, 4)
            if depth in (0.0, 1.0):      # the asked statement first / last in the haystack
                found = re.findall(r"( One of the special magic numbers for \S+ is: (\d+)\.)",
                                   text)
                statement, value = found[0 if depth == 0 else -1]
                assert value == answers[0]
                at = text.index(statement)
                if depth == 0:
                    assert text[:at].endswith("afterwards.\n")
                else:
                    assert text[at + len(statement):].startswith("\n\nWhat ")
    again, _ = tasks.build(tok, task, haystacks, words, length,
                           0.5 if task in tasks.DEPTH else None, 3, seed=1)
    other, _ = tasks.build(tok, task, haystacks, words, length,
                           0.5 if task in tasks.DEPTH else None, 3, seed=2)
    assert torch.equal(again, tasks.build(tok, task, haystacks, words, length,
                                          0.5 if task in tasks.DEPTH else None, 3, seed=1)[0])
    assert not torch.equal(again, other)


def test_the_default_tokenizer_builds_every_task_in_its_chat_template():
    from test_convert import default_model_dir
    tok = msrnn.load_tokenizer(default_model_dir())
    books = [open(b, encoding="utf-8").read() for b in BOOKS]
    haystacks, words = texts.haystacks(tok, books), tasks.vocabulary(books)
    for task in tasks.TASKS:
        ids, expected = tasks.build(tok, task, haystacks, words, 1024,
                                    0.5 if task in tasks.DEPTH else None, 2, seed=0)
        assert ids.shape == (2, 1024)
        text = tok.decode(ids[0].tolist())
        assert text.startswith("<|im_start|>system") and "<|im_start|>assistant\n" in text
        got = solve(task, text.replace("<|im_end|>", ""))
        assert got == (sorted(expected[0]) if task in UNORDERED else expected[0]), task


def test_too_short_and_bad_depths(tiny):
    _, _, tok, haystacks, words = tiny
    with pytest.raises(ValueError, match="too short for niah_multikey"):
        tasks.build(tok, "niah_multikey", haystacks, words, 200, 0.5, 1, 0)
    with pytest.raises(ValueError, match="too short for cwe"):
        tasks.build(tok, "cwe", haystacks, words, 300, None, 1, 0)
    with pytest.raises(ValueError, match="takes no depth"):
        tasks.build(tok, "vt", haystacks, words, 700, 0.5, 1, 0)
    with pytest.raises(ValueError, match="takes a depth"):
        tasks.build(tok, "niah_single", haystacks, words, 700, None, 1, 0)


def test_scores_are_ruler_string_match_all(tiny):
    assert tasks.score("The number is 1234567.", ["1234567"]) == 1
    assert tasks.score("", ["1234567"]) == 0
    assert tasks.score("ABCDE, fghij", ["abcde", "FGHIJ", "KLMNO", "PQRST"]) == 0.5
    assert tasks.score("1234567 1234567 1234567", ["1234567", "7654321"]) == 0.5   # once each
    assert tasks.score("12345678", ["1234567"]) == 1               # a substring counts (RULER)
    tok = tiny[2]
    ids = torch.tensor([[ord(c) for c in "x 1111111 2222222"], [ord(c) for c in "nothing here!!!!!"]])
    score, texts = tasks.scores(tok, ids, [["1111111", "3333333"], ["5555555"]])
    assert score == 25.0 and texts[1] == "nothing here!!!!!"


# ----------------------------------------------------------------------------- drift

def test_drift_measures_by_hand():
    assert drift.first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert drift.first_divergence([5], [6, 7]) == 0
    assert drift.first_divergence([1, 2], [1, 2, 3]) == 2          # a prefix: the shorter
    assert drift.first_divergence([1, 2, 3], [1, 2, 3]) == 3
    assert drift.repeat_4gram([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)
    assert drift.repeat_4gram([7] * 10) == pytest.approx(6 / 7)    # 7 four-grams, 1 distinct
    assert drift.repeat_4gram([1, 2, 3]) == 0 and drift.repeat_4gram(list(range(9))) == 0


def test_drift_on_a_tiny_model(tiny):
    """full_ppl is Full's perplexity of the generated tokens after the prompt, by hand from
    transformers' logits; a window that never evicts follows Full to the end."""
    model_dir, _, tok, haystacks, _ = tiny
    model = msrnn.load(model_dir, dtype=torch.float64)
    prompts = drift.openings(tok, haystacks, 2, 40, seed=0)
    assert [len(p) for p in prompts] == [40, 40] and prompts[0] != prompts[1]
    full = drift.run(model, prompts, Full(), 12)
    same = drift.run(model, prompts, Window(100), 12)
    short = drift.run(model, prompts, Window(8), 12)
    assert same == full and all(len(o) == 12 for o in full)
    m = drift.measure(model, prompts, short, full)
    hf = tiny_hf("llama", eos_token_id=None, max_position_embeddings=1024).double()
    nll = 0.0
    for prompt, new in zip(prompts, short):
        ids = torch.tensor([prompt + new])
        with torch.no_grad():
            logp = hf(ids).logits[0].log_softmax(-1)
        nll -= sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(new))
    assert m["full_ppl"] == pytest.approx(math.exp(nll / 24), rel=1e-5)
    assert m["first_divergence"] == sum(drift.first_divergence(s, f)
                                        for s, f in zip(short, full)) / 2
    assert m["repeat_4gram"] == sum(drift.repeat_4gram(s) for s in short) / 2
    assert drift.measure(model, prompts, same, full)["first_divergence"] == 12
    story = drift.stories(tok, 2, seed=0)
    assert all(tok.decode(s).startswith("Write a long story about") for s in story)


# ----------------------------------------------------------------------------- commands

def test_tasks_command_json_files_resume_and_backends(tiny, capsys, tmp_path):
    model, text, *_ = tiny
    argv = ["tasks", model, "--tasks", "niah_single,vt,fwe", "--lengths", "700", "--depths",
            "0,1", "--policies", "full,tova", "--sizes", "32", "--samples", "2",
            "--max-new-tokens", "3", "--dtype", "float64", "--json"]
    code, out, err = run(capsys, *argv, "--out", tmp_path / "out")
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["task"], r["depth"]) for r in rows[::2]] == [("niah_single", 0.0),
                                                             ("niah_single", 1.0), ("vt", None),
                                                             ("fwe", None)]
    assert set(rows[0]) == {"task", "policy", "size", "length", "depth", "score", "samples",
                            "prompt_mode"}
    assert all(0 <= r["score"] <= 100 and r["prompt_mode"] == "oneshot" for r in rows)
    files = set(os.listdir(tmp_path / "out"))
    assert {"results.json", "results.csv", "tasks-niah_single.png", "tasks-vt.png",
            "tasks-fwe.png", "tasks-sizes.png"} <= files
    code, again, err = run(capsys, *argv, "--out", tmp_path / "out")
    assert code == 0 and json.loads(again) == rows and "0 cells to run" in err
    code, hf, err = run(capsys, *argv, "--backend", "transformers", "--out", tmp_path / "hf")
    assert code == 0 and json.loads(hf) == rows, err
    answers = [[r["answers"] for r in json.load(open(tmp_path / d / "results.json"))["results"]]
               for d in ("out", "hf")]
    assert answers[0] == answers[1]


def test_drift_command(tiny, capsys, tmp_path):
    model, text, *_ = tiny
    code, out, err = run(capsys, "drift", model, "--text", text, "--policies", "full,window,tova",
                         "--sizes", "16", "--samples", "1", "--new-tokens", "6",
                         "--prompt-tokens", "30", "--observe", "4", "--out", tmp_path, "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["kind"], r["policy"]) for r in rows] == [(k, p) for k in ("opening", "story")
                                                        for p in ("full", "window", "tova")]
    assert all(r["first_divergence"] == 6 for r in rows if r["policy"] == "full")
    assert all(r["full_ppl"] > 1 and 0 <= r["repeat_4gram"] < 1 for r in rows)
    assert {"results.json", "drift.png"} <= set(os.listdir(tmp_path))


@pytest.mark.parametrize("command, args, message", [
    ("tasks", ["--tasks", "niah_single,bogus"], "unknown task 'bogus'"),
    ("tasks", ["--lengths", "150"], "--lengths 150: length 150 is too short for niah_single"),
    ("tasks", ["--observe", "0"], "--observe must be a positive integer"),
    ("tasks", ["--lengths", "2000"], "past the model's range of 1024"),
    ("drift", ["--new-tokens", "0"], "--new-tokens must be a positive integer"),
    ("drift", ["--observe", "0"], "--observe must be a positive integer"),
])
def test_refuses(capsys, tiny, command, args, message):
    model = tiny[0]
    base = {"--policies": "tova", "--sizes": "32", "--samples": "1"}
    if command == "tasks":
        base.update({"--tasks": "niah_single", "--lengths": "700", "--depths": "0.5"})
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    refused(capsys, message, command, model, *[x for kv in base.items() for x in kv])


def test_answer_prefix_script(tiny, capsys):
    """scripts/answer_prefix.py (docs/results.md, "The needle and RULER's niah_single"): the same
    niah_single prompts with and without RULER's answer prefix, Full and TOVA(k); the prompt
    without it ends where the prefix would start; a table row per prompt and policy; tasks.niah
    is given back."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts/answer_prefix.py"
    spec = importlib.util.spec_from_file_location("answer_prefix", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    niah = tasks.niah
    script.main([tiny[0], "--length", "400", "--size", "16", "--samples", "1"])
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [(r["prompt"], r["policy"], r["depth"]) for r in rows[:2]] == \
        [("with prefix", "Full", 0.0), ("with prefix", "TOVA(16)", 0.0)]
    assert len(rows) == 12 and all(0 <= r["score"] <= 100 for r in rows)
    last = {p: {r["last_token"] for r in rows if r["prompt"] == p}
            for p in ("with prefix", "without prefix")}
    assert last == {"with prefix": {repr("s")}, "without prefix": {repr("\n")}}   # "... is" / "?\n"
    assert out.count("| with prefix |") == 2 and out.count("| without prefix |") == 2
    assert tasks.niah is niah

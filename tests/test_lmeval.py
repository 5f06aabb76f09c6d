"""msrnn as an lm-evaluation-harness model (msrnn.experiments.lmeval): the same numbers as
lm-eval's own `hf` model with Full, request by request, for all three request types; a bounded policy
against msrnn's own loops; the command line and the Python route; bad input.

Everything is local: a tiny random LLaMA checkpoint with a character tokenizer that both msrnn
and transformers' AutoTokenizer read, and three tasks (YAML + JSON lines) written here."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="the lm-eval extra: pip install -e '.[lm-eval]'")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import msrnn  # noqa: E402
from msrnn.experiments.evaluate import chunk_nll  # noqa: E402
from msrnn.experiments.lmeval import HarnessError, MSRNNLM  # noqa: E402
from msrnn.policies import TOVA  # noqa: E402
from tiny import save, save_char_tokenizer, tiny_hf  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
RANGE = 64                      # the tiny model's max_position_embeddings: documents pass it
TOL = 1e-3                      # nats per request (the bound; measured: ~1e-5)
TASKS = ["tiny_choice", "tiny_rolling", "tiny_generate"]

CHOICES = [
    {"question": "The cat sat on the", "choices": [" mat", " moon", " idea"], "answer": 0},
    {"question": "Water boils at one hundred degrees", "choices": [" Celsius", " cold"],
     "answer": 0},
    {"question": "Long ago, in a valley between two rivers, a miller kept a small mill that "
                 "turned all day and", "choices": [" all night.", " never", " slept."],
     "answer": 0},     # context + continuation past the range: Full cuts it on the left
    {"question": "", "choices": ["Yes", "No"], "answer": 1},        # empty context: prefix
]
DOCUMENTS = [
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money "
    "in my purse, and nothing particular to interest me on shore.",
    "A short one.",
]
PROMPTS = [{"prompt": "Q: 2+2=", "answer": "4"}, {"prompt": "The sky is", "answer": " blue"},
           {"prompt": "Once upon a time there lived a king who had three daughters, and the "
                      "youngest", "answer": " was"}]


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No network, and the datasets cache in a temporary directory."""
    saved = dict(os.environ)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                      HF_DATASETS_CACHE=str(tmp_path_factory.mktemp("datasets")))
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny LLaMA (range 64) with a one-character-per-token tokenizer.json, BOS \\x02 and EOS
    \\x03, and a chat template: what msrnn.load_tokenizer and AutoTokenizer both read."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    save(tiny_hf("llama", vocab_size=128, max_position_embeddings=RANGE, bos_token_id=2,
                 eos_token_id=3), directory)
    save_char_tokenizer(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "\x02", "eos_token": "\x03",
        "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"}))
    return str(directory)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, offline):
    """A directory of three local tasks, one per request type, for --include_path."""
    directory = tmp_path_factory.mktemp("tasks")
    rows = {"choice": CHOICES, "rolling": [{"text": t} for t in DOCUMENTS], "generate": PROMPTS}
    for name, docs in rows.items():
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    specs = {
        "choice": """output_type: multiple_choice
            doc_to_text: "{{question}}"
            doc_to_choice: "{{choices}}"
            doc_to_target: "{{answer}}"
            metric_list:
              - metric: acc""",
        "rolling": """output_type: loglikelihood_rolling
            doc_to_text: ""
            doc_to_target: "{{text}}"
            metric_list:
              - metric: word_perplexity
              - metric: bits_per_byte""",
        "generate": """output_type: generate_until
            doc_to_text: "{{prompt}}"
            doc_to_target: "{{answer}}"
            generation_kwargs:
              until: ["\\n", "."]
              max_gen_toks: 12
              do_sample: false
            metric_list:
              - metric: exact_match""",
    }
    for name, spec in specs.items():
        text = f"task: tiny_{name}\n" + head.format(path=directory / f"{name}.jsonl") + \
            textwrap.dedent("            " + spec) + "\n"
        (directory / f"tiny_{name}.yaml").write_text(text)
    return str(directory)


MANAGERS = {}


def evaluate(model, tasks, names=TASKS, **kwargs):
    """lm_eval.simple_evaluate -> {task: [(doc_id, responses)] by doc_id}, the results. One
    TaskManager of the local tasks alone (indexing lm-eval's thousands takes seconds)."""
    if tasks not in MANAGERS:
        MANAGERS[tasks] = TaskManager(include_path=tasks, include_defaults=False)
    out = lm_eval.simple_evaluate(model=model, tasks=list(names), log_samples=True,
                                  task_manager=MANAGERS[tasks], **kwargs)
    samples = {t: sorted((s["doc_id"], s["resps"]) for s in out["samples"][t])
               for t in names}
    return samples, out["results"]


def flat(responses):
    """A sample's resps ([[x], [x], ...]) as one list of floats / texts / greedy flags."""
    out = []
    for (r,) in responses:
        out += list(r) if isinstance(r, (list, tuple)) else [r]
    return out


def same(a, b):
    """Two runs' samples equal request by request: numbers within TOL, the rest exactly."""
    for task in a:
        assert [d for d, _ in a[task]] == [d for d, _ in b[task]]
        for (doc, ra), (_, rb) in zip(a[task], b[task]):
            for x, y in zip(flat(ra), flat(rb), strict=True):
                if isinstance(x, float) and not isinstance(x, bool):
                    assert abs(x - y) <= TOL, (task, doc, x, y)
                else:
                    assert x == y, (task, doc, x, y)


@pytest.fixture(scope="module")
def hf_run(checkpoint, tasks):
    return evaluate("hf", tasks, model_args=f"pretrained={checkpoint},dtype=float32",
                    device="cpu", batch_size=2)


def test_full_equals_lm_eval_hf_request_by_request(checkpoint, tasks, hf_run):
    """Full on msrnn's decoder and on msrnn.hf's backend: every loglikelihood (multiple choice,
    rolling windows of the range) within 1e-3 nats of lm-eval's hf model, the same greedy flags,
    the same generated texts. The documents and one context pass the range, so the windows and
    the left cut are compared too."""
    tok = msrnn.load_tokenizer(checkpoint)
    assert all(len(tok.encode(d)) > 2 * RANGE for d in DOCUMENTS[:2])     # several windows
    reference, results = hf_run
    for backend in ("msrnn", "transformers"):
        mine, _ = evaluate(MSRNNLM(pretrained=checkpoint, backend=backend, batch_size=2),
                           tasks)
        same(mine, reference)
    rolling = [flat(r)[0] for _, r in reference["tiny_rolling"]]
    assert all(math.isfinite(x) and x < -10 for x in rolling)             # real documents
    assert "tiny_generate" in results


def test_chat_template_equals_lm_eval_hf(checkpoint, tasks):
    """--apply_chat_template: the prompt the checkpoint's template writes, and what follows."""
    kwargs = dict(names=["tiny_generate"], apply_chat_template=True)
    reference, _ = evaluate("hf", tasks, model_args=f"pretrained={checkpoint},dtype=float32",
                            device="cpu", **kwargs)
    mine, _ = evaluate(MSRNNLM(pretrained=checkpoint), tasks, **kwargs)
    same(mine, reference)
    lm = MSRNNLM(pretrained=checkpoint)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]
    assert lm.apply_chat_template(chat[:1]) == "<user>hi\n<assistant>"
    assert lm.apply_chat_template(chat, add_generation_prompt=False) == "<user>hi\n<assistant>ho"


def tokens(lm, text):
    return torch.tensor(lm.tok_encode(text))


def test_bounded_policy_is_msrnns_own_loops(checkpoint, tasks):
    """TOVA(16), positions cache, sequential: a rolling document is one sequence after the
    prefix token, past the range (= msrnn.experiments.evaluate.chunk_nll on it), a choice is its context +
    continuation read as one sequence; generation is msrnn.generate's. Oneshot: the ragged
    batch (rows stepping together, leaving as they end) equals one request at a time."""
    args = dict(pretrained=checkpoint, policy="tova", size=16, positions="cache")
    lm = MSRNNLM(prompt_mode="sequential", batch_size=3, **args)
    samples, _ = evaluate(lm, tasks)
    policy = TOVA(16)
    for doc, responses in samples["tiny_rolling"]:
        ids = torch.cat([torch.tensor([lm.prefix_token_id]), tokens(lm, DOCUMENTS[doc])])
        expected = -chunk_nll(lm.model, ids[None], policy, "cache").sum().item()
        assert abs(flat(responses)[0] - expected) <= 1e-4
    for doc, responses in samples["tiny_choice"]:
        c = CHOICES[doc]
        for choice, got in zip(c["choices"], flat(responses)[::2]):
            choice = " " + choice                       # lm-eval's target_delimiter
            ctx, cont = lm._encode_pair(c["question"], choice) if c["question"] else \
                ([lm.prefix_token_id], lm.tok_encode(choice))
            ids = torch.tensor(ctx + cont)[None]
            expected = -chunk_nll(lm.model, ids, policy, "cache")[0, -len(cont):].sum().item()
            assert abs(got - expected) <= 1e-4
    for doc, responses in samples["tiny_generate"]:
        new = msrnn.generate(lm.model, [tokens(lm, PROMPTS[doc]["prompt"])], policy, 12,
                             prompt_mode="sequential", positions="cache")[0]
        text = lm.tok_decode([i for i in new.tolist() if i not in lm.eos_ids])
        assert flat(responses)[0] == text.split("\n")[0].split(".")[0]
    full, _ = evaluate(MSRNNLM(pretrained=checkpoint), tasks, names=["tiny_rolling"])
    assert samples["tiny_rolling"] != full["tiny_rolling"]                # it evicted
    one = MSRNNLM(batch_size=1, **args)
    many = MSRNNLM(batch_size=4, **args)
    requests = [Instance("loglikelihood", {}, (c["question"] or "x", ch), i)   # oneshot: the
                for i, c in enumerate(CHOICES) if len(c["question"]) < 50  # contexts in range
                for ch in c["choices"]]
    for a, b in zip(one.loglikelihood(requests), many.loglikelihood(requests), strict=True):
        assert abs(a[0] - b[0]) <= 1e-4 and a[1] == b[1]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "msrnn", "lm-eval", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_command_line_runs_lm_evals_own_flags(checkpoint, tasks, tmp_path, hf_run):
    """`msrnn lm-eval` is lm-eval's command line: --include_path, --limit, --output_path and
    --log_samples work, and Full's logged loglikelihoods are lm-eval hf's."""
    r = run_cli("--model", "msrnn", "--model_args", f"pretrained={checkpoint}", "--batch_size", "2",
                "--tasks", "tiny_rolling,tiny_choice", "--include_path", tasks,
                "--limit", "2", "--output_path", str(tmp_path), "--log_samples")
    assert r.returncode == 0, r.stderr[-2000:]
    [results] = tmp_path.rglob("results_*.json")
    assert set(json.loads(results.read_text())["results"]) == {"tiny_rolling", "tiny_choice"}
    [rolling] = tmp_path.rglob("samples_tiny_rolling_*.jsonl")
    logged = [json.loads(line) for line in rolling.read_text().splitlines()]
    reference = dict(hf_run[0]["tiny_rolling"])
    assert len(logged) == 2
    for sample in logged:
        assert abs(float(sample["filtered_resps"][0]) -
                   flat(reference[sample["doc_id"]])[0]) <= TOL


def test_bad_model_args_are_one_line_before_any_request(checkpoint, tasks):
    r = run_cli("--model", "msrnn", "--model_args", f"pretrained={checkpoint},colour=red",
                "--tasks", "tiny_rolling", "--include_path", tasks)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        "msrnn lm-eval: error: unknown model_args key(s) colour: the msrnn model takes "
        "pretrained, policy, size")
    with pytest.raises(HarnessError, match="policy=tova needs a multi-state size: add size=K"):
        MSRNNLM(pretrained=checkpoint, policy="tova")
    with pytest.raises(HarnessError, match="size=64 is not smaller than the model.s range of 64"):
        MSRNNLM(pretrained=checkpoint, policy="tova", size=64)
    with pytest.raises(HarnessError, match="unknown policy=lru"):
        MSRNNLM(pretrained=checkpoint, policy="lru", size=8)
    with pytest.raises(HarnessError, match="batch_size=auto"):
        MSRNNLM(pretrained=checkpoint, batch_size="auto")
    lm = MSRNNLM(pretrained=checkpoint, policy="tova", size=40, positions="cache")
    short = [Instance("loglikelihood", {}, ("abc", "d"), 0),
             Instance("loglikelihood", {}, ("ab" * 10, "cd"), 1)]
    with pytest.raises(HarnessError, match=r"size=40 is not smaller than the longest "
                                           r"loglikelihood request \(21 tokens\)"):
        lm.loglikelihood(short)
    past = MSRNNLM(pretrained=checkpoint, policy="tova", size=16)          # original positions
    rolling = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(DOCUMENTS)]
    with pytest.raises(HarnessError, match=r"request 0 \(\d+ tokens\) reach position \d+, past "
                                           r"the model's range of 64.*positions 'cache'"):
        past.loglikelihood_rolling(rolling)


def test_policy_module_registers_a_users_policy(checkpoint, tmp_path, request):
    """policy_module=FILE: a user's policy joins the registry and runs (here: one that scores
    like the window, so it must equal window)."""
    path = tmp_path / "mine.py"
    path.write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from msrnn.policies import Policy, register

        @register("newest", "keep the newest (a test policy)")
        @dataclass(frozen=True, repr=False)
        class Newest(Policy):
            def score(self, c):
                return c.pos.float()
        """))
    from msrnn.policies import REGISTRY
    request.addfinalizer(lambda: REGISTRY.pop("newest", None))    # the registry is the process's
    lm = MSRNNLM(pretrained=checkpoint, policy="newest", size=16, positions="cache",
                 policy_module=str(path))
    window = MSRNNLM(pretrained=checkpoint, policy="window", size=16, positions="cache")
    rolling = [Instance("loglikelihood_rolling", {}, (DOCUMENTS[0],), 0)]
    assert abs(lm.loglikelihood_rolling(rolling)[0] -
               window.loglikelihood_rolling(rolling)[0]) <= 1e-4
    with pytest.raises(HarnessError, match="policy_module=/nowhere.py: no such file"):
        MSRNNLM(pretrained=checkpoint, policy_module="/nowhere.py")


def test_without_lm_eval_one_line_names_the_extra():
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "from msrnn.cli import main; sys.exit(main(['lm-eval', '--tasks', 'x']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == ("msrnn lm-eval: error: lm-eval is not installed: "
                                "pip install 'msrnn[lm-eval]'")

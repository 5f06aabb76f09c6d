"""Hostile but fair input: every case ends with a non-zero exit and one line that names the
problem and the fix, before any expensive work; nothing gives a traceback or a silent wrong
answer. And a bounded policy's prompt pass holds no [T, T] attention matrix."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

import msrnn
from msrnn import cli
from msrnn.policies import TOVA
from msrnn.prompt import prefill
from tiny import save, save_char_tokenizer, tiny_hf

RANGE = 512                      # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hostile") / "model"
    save(tiny_hf("llama", eos_token_id=None, max_position_embeddings=RANGE), directory)
    return save_char_tokenizer(directory)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "a.txt"
    path.write_text("All happy families are alike; each unhappy family is unhappy in its own "
                    "way. " * 30)
    return str(path)


def run(capsys, *argv):
    """`msrnn ARGV` in this process: (exit code, stdout, stderr). An exception the command line
    does not turn into a message fails the test with its traceback."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, message, *argv):
    code, out, err = run(capsys, *argv)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and out == ""
    return lines[0]


# ----------------------------------------------------------------------------- generate

@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "bogus"], "unknown --device 'bogus'"),
    (["--size", "1000000000"], "--size 1000000000 is not smaller than the model's range of 512"),
    (["--size", "100000"], "is not smaller than the model's range"),
    (["--temperature", "inf"], "temperature must be a finite number"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--policy", "tova", "--size", "8", "--sinks", "20"], "size 8 must be larger than sinks 20"),
    (["--policy", "h2o", "--sinks", "2"], "policy 'h2o' has no sinks"),
    (["--policy", "full", "--sinks", "2"], "--sinks means nothing to it"),
    (["--seed", str(10**20)], "--seed must be in 0..2**63-1"),
    (["--seed", "-1"], "--seed must be in 0..2**63-1"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["--min-new-tokens", "-1"], "--min-new-tokens must be >= 0, got -1"),
    (["--max-new-tokens", "5", "--min-new-tokens", "6"], "--min-new-tokens 6 is more than "
     "--max-new-tokens 5: raise --max-new-tokens or lower --min-new-tokens"),
    (["--max-new-tokens", "600"], "past the model's range of 512"),
])
def test_generate_refuses(capsys, model_dir, args, message):
    refused(capsys, message, "generate", model_dir, "--prompt", "Hello there", "--size", "16",
            *args)


def test_generate_zero_new_tokens_and_sinks_are_used(capsys, model_dir):
    code, out, err = run(capsys, "generate", model_dir, "--prompt", "Hello", "--max-new-tokens",
                         "0")
    assert code == 0 and out == "\n" and "[msrnn] 0 new tokens" in err
    code, out, err = run(capsys, "generate", model_dir, "--prompt", "Hello there", "--policy",
                         "tova", "--size", "32", "--sinks", "20", "--max-new-tokens", "3")
    assert code == 0 and "multi-state: TOVA(32, sinks=20)" in err


def test_prompt_past_the_range_fails_before_the_first_token(capsys, model_dir):
    line = refused(capsys, "a 500-token prompt and 20 new tokens reach position 518",
                   "generate", model_dir, "--prompt", "x" * 500, "--max-new-tokens", "20")
    assert "range of 512" in line and "--positions" in line and "--past-range" in line
    line = refused(capsys, "a 600-token prompt in one pass (oneshot)", "generate", model_dir,
                   "--prompt", "x" * 600, "--max-new-tokens", "20", "--positions", "cache")
    refused(capsys, "Full keeps every state", "generate", model_dir, "--prompt", "x" * 500,
            "--max-new-tokens", "20", "--positions", "cache", "--policy", "full")


def test_invalid_utf8_prompt(model_dir):
    """A prompt that is not UTF-8 (argv bytes), through a real process: one line, no traceback."""
    out = subprocess.run([sys.executable.encode(), b"-m", b"msrnn.cli", b"generate",
                          model_dir.encode(), b"--prompt", b"caf\xe9 au lait"],
                         capture_output=True, timeout=120)
    err = out.stderr.decode(errors="replace")
    assert out.returncode == 2 and "--prompt is not valid UTF-8" in err
    assert len(err.strip().splitlines()) == 1, err


def damaged_copy(model_dir, tmp_path, name, content):
    directory = tmp_path / "damaged"
    shutil.copytree(model_dir, directory)
    (directory / name).write_text(content)
    return directory


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", '{"model": {"type": "BPE", "vocab": 3', "tokenizer.json is damaged"),
    ("config.json", "[1, 2, 3]", "config.json must hold a JSON object"),
    ("config.json", "{not json", "config.json is not valid JSON"),
])
def test_damaged_files(capsys, model_dir, tmp_path, name, content, message):
    directory = damaged_copy(model_dir, tmp_path, name, content)
    refused(capsys, message, "generate", directory, "--prompt", "Hi")


def test_config_with_a_string_where_a_number_belongs(capsys, model_dir, tmp_path):
    config = json.loads(open(f"{model_dir}/config.json").read())
    config["hidden_size"] = "64"
    directory = damaged_copy(model_dir, tmp_path, "config.json", json.dumps(config))
    refused(capsys, "hidden_size='64'; it must be a positive integer", "generate", directory,
            "--prompt", "Hi")


# ----------------------------------------------------------------------------- ppl, retention

def ppl(capsys, message, model_dir, text, *args):
    return refused(capsys, message, "ppl", model_dir, "--text", text, "--context", "64",
                   "--policies", "tova", "--sizes", "8", *args)


def test_ppl_refuses(capsys, model_dir, text, tmp_path):
    ppl(capsys, "--max-chunks must be a positive integer, got 0", model_dir, text,
        "--max-chunks", "0")
    refused(capsys, "--context 9000 (Full(), positions original) reach position 8999, past "
            "the model's range of 512", "ppl", model_dir, "--text", text, "--context", "9000")
    refused(capsys, "unknown position scheme 'relative'", "ppl", model_dir, "--text", text,
            "--positions", "cache,relative")
    ppl(capsys, "--device cuda: this machine has no CUDA GPU", model_dir, text, "--device",
        "cuda")
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    ppl(capsys, f"{binary} is not UTF-8 text", model_dir, str(binary))
    a_file = tmp_path / "taken"
    a_file.write_text("")
    ppl(capsys, f"--out {a_file} is a file, not a directory; give a directory", model_dir, text,
        "--out", str(a_file))
    ppl(capsys, f"--out {a_file / 'results'}: cannot create the directory because {a_file} is a "
        f"file", model_dir, text, "--out", str(a_file / "results"))
    refused(capsys, "--size must be between 1 and --context - 1", "retention", model_dir,
            "--text", text, "--context", "64", "--size", "64")


def test_texts_that_are_not_texts(capsys, model_dir, text, tmp_path):
    """A text that is empty, a directory or not a regular file says which, on every command
    that reads texts (experiments.text.read_text)."""
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    refused(capsys, "/dev/null is not a regular file", "drift", model_dir, "--text",
            "/dev/null", "--policies", "tova", "--sizes", "8", "--new-tokens", "4",
            "--prompt-tokens", "16")
    refused(capsys, f"{empty} is empty", "drift", model_dir, "--text", str(empty),
            "--policies", "tova", "--sizes", "8", "--new-tokens", "4", "--prompt-tokens", "16")
    ppl(capsys, f"{tmp_path} is a directory; give a text file", model_dir, str(tmp_path))
    refused(capsys, "/dev/null is not a regular file", "needle", model_dir, "--haystack",
            "/dev/null", "--lengths", "64", "--policies", "tova", "--sizes", "8")


@pytest.mark.parametrize("command", ["needle", "tasks", "drift"])
def test_an_observation_window_needs_a_oneshot_prompt(capsys, model_dir, text, command):
    """--observe ranks a oneshot prompt; a sequential prompt never ranks, so the option would
    be silently ignored: it is refused, naming oneshot."""
    grid = ["--lengths", "64"] if command != "drift" else ["--new-tokens", "4",
                                                          "--prompt-tokens", "16"]
    texts = ["--text" if command == "drift" else "--haystack", text]
    refused(capsys, "--observe 8 ranks a oneshot prompt by its last 8 queries; a sequential "
            "prompt never ranks: use --prompt-mode oneshot", command, model_dir, *texts, *grid,
            "--policies", "tova", "--sizes", "8", "--observe", "8", "--prompt-mode",
            "sequential")


@pytest.mark.parametrize("content", ["{\"setup\": {\"model\": ", "{\"results\": []}", "[]"])
def test_ppl_damaged_results_file(capsys, model_dir, text, tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(content)
    ppl(capsys, "results.json is damaged", model_dir, text, "--out", str(out))


# ----------------------------------------------------------------------------- paths written

# Every path a command writes is checked before any work, and a failure says in words what could
# not be done and why. /proc takes no new entries, even from root (os.access says yes to root).
NOPE = "/proc/nope/out"
CANNOT = "cannot create its parent /proc/nope, which does not exist, in /proc"


@pytest.mark.parametrize("argv", [
    ["generate", "{model}", "--prompt-file", "{text}", "--out", NOPE],
    ["ppl", "{model}", "--text", "{text}", "--out", NOPE],
    ["retention", "{model}", "--text", "{text}", "--out", NOPE],
    ["needle", "{model}", "--haystack", "{text}", "--out", NOPE],
    ["tasks", "{model}", "--haystack", "{text}", "--out", NOPE],
    ["drift", "{model}", "--text", "{text}", "--out", NOPE],
    ["bench", "{model}", "--out", NOPE],
    ["download", "a/b", "--dir", NOPE],
    ["fetch-default", "--dir", NOPE],
])
def test_a_directory_that_cannot_be_created(capsys, model_dir, text, argv):
    argv = [a.format(model=model_dir, text=text) for a in argv]
    line = refused(capsys, f"{argv[-2]} {NOPE}: {CANNOT} (", *argv)
    assert line.startswith(f"msrnn {argv[0]}: error: ") and "Errno" not in line


def test_each_unwritable_path_says_why(capsys, model_dir, text, tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("")
    refused(capsys, f"--dir {a_file} is a file, not a directory", "fetch-default", "--dir",
            a_file)
    refused(capsys, f"--dir {a_file}/m: cannot create the directory because {a_file} is a file, "
            f"not a directory", "download", "a/b", "--dir", a_file / "m")
    refused(capsys, f"--dir {a_file}/x/m: cannot create its parent {a_file}/x, which does not "
            f"exist, because {a_file} is a file", "fetch-default", "--dir", a_file / "x" / "m")
    refused(capsys, "--out /proc: cannot write in this directory (", "generate", model_dir,
            "--prompt-file", text, "--out", "/proc")
    refused(capsys, "--out /proc/self: cannot write in this directory (", "needle", model_dir,
            "--haystack", text, "--out", "/proc/self")
    refused(capsys, f"--plot {a_file}/x.png: its directory {a_file} is a file, not a directory",
            "retention", model_dir, "--text", text, "--context", 64, "--size", 16, "--plot", a_file / "x.png")
    refused(capsys, f"--plot {tmp_path}: is a directory; give a file name".replace(": is", " is"),
            "retention", model_dir, "--text", text, "--context", 64, "--size", 16, "--plot", tmp_path)
    refused(capsys, "--plot /proc/nope/x.png: its directory /proc/nope: cannot create the "
            "directory in /proc (", "retention", model_dir, "--text", text, "--context", 64, "--size", 16, "--plot",
            "/proc/nope/x.png")
    assert not (tmp_path / "m").exists()                    # a check leaves nothing behind


def test_the_library_says_why_too(tmp_path):
    from msrnn.experiments.output import write_atomic
    from msrnn.checkpoint.convert import fetch_default
    from msrnn.checkpoint.loading import download

    with pytest.raises(ValueError, match=f"out_dir {NOPE}: {CANNOT}"):
        fetch_default(NOPE)
    with pytest.raises(ValueError, match=f"directory {NOPE}: {CANNOT}"):
        download("a/b", NOPE)
    gone = tmp_path / "gone"
    gone.mkdir()
    gone.rmdir()                               # the --out directory removed during a long run
    with pytest.raises(OSError, match=f"cannot write {gone}/r.json: cannot make a file in "
                       f"{gone} \\(it no longer exists\\)"):
        write_atomic(str(gone / "r.json"), "{}")


# ----------------------------------------------------------------------------- bench

@pytest.mark.parametrize("args, message", [
    (["--parts", "bogus"], "--parts: unknown bogus"),
    (["--dtypes", "bogus"], "--dtypes: unknown bogus"),
    (["--parts", "latency", "--lengths", "8"], "--lengths must be at least"),
    (["--parts", "throughput", "--length", "9000"], "past the model's range of 512"),
    (["--parts", "ceiling", "--device", "bogus"], "unknown --device"),
    (["--parts", "latency", "--lengths", "64,x"], "--lengths must be comma-separated integers"),
    (["--parts", "speed", "--no-compile", "--cpp-wrapper"], "--cpp-wrapper launches the "
     "compiled CPU step's kernels from C++: drop it with --no-compile"),
])
def test_bench_checks_arguments_first(capsys, model_dir, args, message):
    refused(capsys, message, "bench", model_dir, *args)


# ----------------------------------------------------------------------------- the API

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    small = msrnn.load(save(tiny_hf("llama", num_hidden_layers=2),
                            tmp_path_factory.mktemp("two")))
    large = msrnn.load(save(tiny_hf("llama", num_hidden_layers=3),
                            tmp_path_factory.mktemp("three")))
    return small, large


def test_a_state_belongs_to_its_model(models):
    small, large = models
    ids = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"made by another model: layers 2 \(this model: 3\)"):
        large.step(ids, small.init_state(2, TOVA(8)))
    doubled = small.double().init_state(1, TOVA(8))
    small.float()
    with pytest.raises(ValueError, match=r"made by another model: dtype torch.float64 \(this "
                                         r"model: torch.float32\)"):
        prefill(small, ids[None], doubled)
    with pytest.raises(ValueError, match="token ids must be in 0..127"):
        small.step(torch.tensor([5, 128]), small.init_state(2, TOVA(8)))
    with pytest.raises(ValueError, match="integer token ids, got dtype torch.float32"):
        small.step(torch.tensor([1.0, 2.0]), small.init_state(2, TOVA(8)))
    with pytest.raises(TypeError, match="state must be a MultiState"):
        small.step(ids, None)
    with pytest.raises(ValueError, match="not smaller than the model's range of 4096"):
        small.init_state(1, TOVA(5000))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        small.init_state(0, TOVA(8))


# ----------------------------------------------------------------------------- long prompts

PEAK = """
import resource, sys, torch, msrnn
from msrnn.policies import TOVA, H2O, Full
from msrnn.prompt import prefill
model = msrnn.load(sys.argv[1])
ids = torch.randint(0, 128, (1, 4096), generator=torch.Generator().manual_seed(0))
policy = {"full": Full(), "tova": TOVA(64), "h2o": H2O(64)}[sys.argv[2]]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.inference_mode():
    prefill(model, ids, model.init_state(1, policy), mode="oneshot", logits=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_bounded_prompt_pass_needs_no_more_memory_than_full(tmp_path):
    """A 4,096-token oneshot prompt with TOVA(64) and H2O(64): peak memory of the prompt pass
    within 1.5x of Full's (+ 16 MB of slack for the allocator), where keeping the whole
    attention matrix would take 4 heads x 4,096^2 x 4 bytes = 256 MB per layer."""
    directory = save(tiny_hf("llama", max_position_embeddings=8192), tmp_path / "model")

    def peak_mb(policy):
        out = subprocess.run([sys.executable, "-c", PEAK, directory, policy],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return float(out.stdout.strip().splitlines()[-1])

    full = peak_mb("full")
    for policy in ("tova", "h2o"):
        assert peak_mb(policy) <= 1.5 * full + 16, (policy, peak_mb(policy), full)

"""The command line, run as users run it: `msrnn generate` decodes and reports its multi-state;
bad input ends with a non-zero exit and one clear line on stderr."""

import json
import subprocess
import sys

import pytest

from tiny import save, save_char_tokenizer, slow_compilation, tiny_hf


def msrnn(*args):
    """Run `python -m msrnn.cli ARGS` in a fresh process: (exit code, stdout, stderr)."""
    out = subprocess.run([sys.executable, "-m", "msrnn.cli", *args], capture_output=True,
                         text=True, timeout=300)
    return out.returncode, out.stdout, out.stderr


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli")
    save(tiny_hf("llama", eos_token_id=None), directory)   # no EOS: every run decodes in full
    return save_char_tokenizer(directory)


def test_generate_streams_text_and_reports_the_multi_state(model):
    code, out, err = msrnn("generate", model, "--prompt", "Once upon a time", "--policy", "tova",
                           "--size", "8", "--max-new-tokens", "40", "--temperature", "0.7",
                           "--top-k", "20", "--top-p", "0.9", "--seed", "3")
    assert code == 0, err
    assert len(out) == 40 + 1                          # 40 one-character tokens, then a newline
    report = err.strip().splitlines()[-1]
    # 2 layers x 2 KV heads x 9 slots x 16 head dims, keys and values in float32, positions
    # in int64: (2*9*16*4 + 9*8) bytes per KV head and layer.
    nbytes = 2 * 2 * (2 * 9 * 16 * 4 + 9 * 8)
    assert report.startswith("[msrnn] 40 new tokens, ")
    assert "tok/s decode" in report
    assert f"multi-state: TOVA(8), 9 slots x 2 layers, {16 + 39} tokens seen, " \
           f"{nbytes / 2**20:.2f} MiB" in report
    again = msrnn("generate", model, "--prompt", "Once upon a time", "--policy", "tova",
                  "--size", "8", "--max-new-tokens", "40", "--temperature", "0.7", "--top-k",
                  "20", "--top-p", "0.9", "--seed", "3")
    assert again[1] == out                             # seeded: the same text


def test_generate_sinks_policy_with_its_default(model):
    code, out, err = msrnn("generate", model, "--prompt", "abc", "--policy", "sinks", "--size",
                           "6", "--max-new-tokens", "5")
    assert code == 0, err
    assert "multi-state: Sinks(6, sinks=4), 7 slots" in err


@pytest.mark.parametrize("args, message", [
    (["does/not/exist", "--prompt", "Hi"], "model directory not found: does/not/exist"),
    (["{model}", "--prompt", "Hi", "--policy", "lru"], "unknown policy 'lru'"),
    (["{model}", "--prompt", "Hi", "--size", "0"], "multi-state size must be a positive integer"),
    (["{model}", "--prompt", "Hi", "--policy", "sinks", "--size", "4"],
     "size 4 must be larger than sinks 4"),
    (["{model}", "--prompt", "  "], "empty prompt"),
    (["{model}", "--prompt", "Hi", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["{model}", "--prompt", "Hi", "--temperature", "1", "--top-p", "1.5"],
     "top_p must be in (0, 1]"),
    (["{model}", "--prompt", "Hi", "--temperature", "1", "--top-k", "0"],
     "top_k must be a positive integer"),
    (["{model}", "--prompt", "Hi", "--max-new-tokens", "5000"], "past the model's range"),
    (["{model}", "--prompt", "Hi", "--chat"], "no chat template"),
])
def test_generate_errors(model, args, message):
    code, _, err = msrnn("generate", *[a.format(model=model) for a in args])
    assert code != 0
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err     # one clear line, no traceback


def test_download_offline_says_where_to_put_files(tmp_path):
    code, _, err = msrnn("download", "HuggingFaceTB/SmolLM2-135M-Instruct", "--dir",
                         str(tmp_path / "smol"))
    assert code != 0
    assert "could not download 'HuggingFaceTB/SmolLM2-135M-Instruct'" in err
    assert f"to {tmp_path / 'smol'}/ and pass that directory" in err


def test_prompt_file_decodes_a_ragged_batch(capsys, model, tmp_path):
    """`--prompt-file`: one prompt per line, one batch; each row's text on its own line, or in
    its own file with --out, equal to decoding that prompt alone. (The batch runs as users run
    it; the rest in this process, to spare a start of torch each.)"""
    lines = ["Once upon a time", "It was a dark and stormy night; the rain fell", "Hi"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    args = ["--policy", "tova", "--size", "8", "--max-new-tokens", "12"]
    code, out, err = msrnn("generate", model, "--prompt-file", str(path), *args)
    assert code == 0, err
    rows = out.split("\n")[:-1]               # (the tokens include other line-breaking codes)
    alone = [run(capsys, "generate", model, "--prompt", line, *args)[1][:-1] for line in lines]
    assert sorted(rows) == sorted(f"[{i}] " + text.replace("\n", "\\n")
                                  for i, text in enumerate(alone))
    assert "36 new tokens in 3 rows" in err
    code, out, err = run(capsys, "generate", model, "--prompt-file", path, *args, "--out",
                         tmp_path / "rows")
    assert code == 0 and out == "", err
    assert [(tmp_path / "rows" / f"row-{i}.txt").read_text() for i in range(3)] == alone
    (tmp_path / "bad.txt").write_text("fine\n\nalso fine\n")
    code, _, err = run(capsys, "generate", model, "--prompt-file", tmp_path / "bad.txt")
    assert code == 2 and "empty prompt (" in err and "bad.txt line 2)" in err


# ----------------------------------------------------------------------------- in this process

def run(capsys, *argv):
    """`msrnn ARGV` in this process (so that a test can patch what it calls): (exit code,
    stdout, stderr)."""
    from msrnn import cli
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def report(err: str) -> str:
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("policy", ["tova", "h2o", "full"])
def test_generate_backends_agree(capsys, model, policy):
    """`--backend transformers` runs the same policy inside transformers (msrnn.hf): greedy text
    equal to msrnn's own decoder, in both prompt modes. (In this process: what is compared is the
    texts, and a fresh process would start torch and transformers again for each run.)"""
    for mode in ("oneshot", "sequential"):
        args = ["generate", model, "--prompt", "Once upon a time, there was", "--policy", policy,
                "--size", "8", "--max-new-tokens", "24", "--prompt-mode", mode,
                "--dtype", "float64"]
        ours = run(capsys, *args)
        theirs = run(capsys, *args, "--backend", "transformers")
        assert ours[0] == theirs[0] == 0, theirs[2]
        assert ours[1] == theirs[1] and len(ours[1]) == 25, (mode, ours[1], theirs[1])


@pytest.fixture(scope="module")
def early_eos(tmp_path_factory):
    """The `model` fixture's weights with an EOS: the second character it writes greedily after
    "Hello there". (directory, the EOS character, the EOS-free greedy text of 24 characters.)"""
    import io
    from contextlib import redirect_stdout

    from msrnn import cli
    free_dir = save_char_tokenizer(save(tiny_hf("llama", eos_token_id=None),
                                        tmp_path_factory.mktemp("free")))
    with redirect_stdout(io.StringIO()) as out:
        assert cli.main(["generate", free_dir, "--prompt", "Hello there", "--max-new-tokens",
                         "24"]) == 0
    free = out.getvalue()[:-1]
    eos = free[1]
    assert len(free) == 24 and free[0] != eos and free.count(eos) < 4  # it comes early, not always
    directory = tmp_path_factory.mktemp("early")
    save(tiny_hf("llama", eos_token_id=ord(eos)), directory)
    return save_char_tokenizer(directory), eos, free


@pytest.mark.parametrize("backend", ["msrnn", "transformers"])
def test_generate_past_eos(capsys, early_eos, backend):
    directory, eos, free = early_eos
    args = ["generate", directory, "--prompt", "Hello there", "--backend", backend]
    code, out, err = run(capsys, *args, "--max-new-tokens", "24")
    assert code == 0 and out == free[0] + "\n" and report(err).startswith("[msrnn] 1 new tokens")
    for n in (5, 24):                                   # --ignore-eos: exactly N, EOS written
        code, out, err = run(capsys, *args, "--max-new-tokens", n, "--ignore-eos")
        assert code == 0, err
        assert out == free[:n] + "\n" and report(err).startswith(f"[msrnn] {n} new tokens")
    for n in (2, 6, 15):                                # --min-new-tokens: at least N, no EOS
        code, out, err = run(capsys, *args, "--max-new-tokens", 24, "--min-new-tokens", n)
        assert code == 0, err
        text = out[:-1]
        count = int(report(err).split()[1])
        assert count == len(text) >= n and eos not in text
    rows = run(capsys, *args[:2], "--prompt-file", early_eos_prompts(directory), "--backend",
               backend, "--max-new-tokens", 9, "--ignore-eos")
    assert rows[0] == 0 and report(rows[2]).startswith("[msrnn] 18 new tokens in 2 rows")


def early_eos_prompts(directory):
    path = f"{directory}/prompts.txt"
    with open(path, "w") as f:
        f.write("Hello there\nHi\n")
    return path


def test_generate_rate_leaves_out_compilation(capsys, model, monkeypatch):
    """A compilation made slow on purpose (8 s): the speed line reports it on its own, and the
    decode rate is what the 9 steps after the first token ran at. Counted in, the decode would
    take over 8 s."""
    import time

    slow_compilation(monkeypatch, 8)
    start = time.perf_counter()
    code, out, err = run(capsys, "generate", model, "--prompt", "Once upon a time",
                         "--policy", "tova", "--size", "8", "--max-new-tokens", "10", "--compile")
    wall = time.perf_counter() - start
    assert code == 0, err
    line = report(err)
    assert line.startswith("[msrnn] 10 new tokens, ") and "tok/s decode, compiled in " in line
    rate = float(line.split(", ")[1].split()[0])
    compiled = float(line.split("compiled in ")[1].split()[0])
    decoding = 9 / rate                                # seconds the rate stands for
    assert 8 <= compiled and decoding < 8 and decoding + compiled <= wall, (line, wall)


def test_generate_with_the_cpp_wrapper_gives_the_eager_text(capsys, model):
    """--compile --cpp-wrapper: the step compiled, its kernels launched from C++; greedy text
    equal to the eager step's. --cpp-wrapper alone is refused in one line."""
    args = ["generate", model, "--prompt", "Once upon a time", "--policy", "tova", "--size",
            "8", "--max-new-tokens", "16"]
    code, eager, err = run(capsys, *args)
    assert code == 0, err
    code, out, err = run(capsys, *args, "--compile", "--cpp-wrapper")
    assert code == 0 and out == eager and "compiled in " in report(err), err
    code, out, err = run(capsys, *args, "--cpp-wrapper")
    assert code == 2 and out == ""
    assert report(err).endswith("--cpp-wrapper chooses what launches the compiled step's "
                                "kernels; add --compile"), err


def test_ppl_rate_leaves_out_compilation(capsys, model, monkeypatch, tmp_path):
    """The same for `msrnn ppl --compile`: 1 chunk of 12 tokens, 11 steps in its rate."""
    slow_compilation(monkeypatch, 8)
    text = tmp_path / "a.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 4)
    code, out, err = run(capsys, "ppl", model, "--text", text, "--context", "12",
                         "--max-chunks", "1", "--policies", "tova", "--sizes", "8", "--compile",
                         "--out", tmp_path / "out")
    assert code == 0, err
    line = next(x for x in err.splitlines() if x.startswith("[msrnn ppl] TOVA(8)"))
    rate = float(line.split("tokens, ")[1].split()[0])
    compiled = float(line.split("compiled in ")[1].split()[0])
    assert 8 <= compiled and 12 / rate < 8, line
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["results"][0]
    assert saved["seconds"] < 8 <= saved["compile_seconds"]


def test_generate_zero_and_one_new_tokens_print_no_rate(capsys, model):
    for n in (0, 1):
        code, out, err = run(capsys, "generate", model, "--prompt", "Hi", "--max-new-tokens", n)
        assert code == 0 and report(err).startswith(f"[msrnn] {n} new tokens | multi-state")
        assert "nan" not in err and "tok/s" not in err

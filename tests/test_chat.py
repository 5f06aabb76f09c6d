"""`msrnn chat --session FILE` (msrnn.chat, msrnn/cli/chat.py): a conversation in a bounded
multi-state, saved after each turn, that resumes as if it never stopped.

On tiny random models with a character tokenizer and a chat template (tiny.save_chat_tokenizer):
a resumed greedy (and seeded) conversation is token for token the one that never stopped; kill -9
in the middle of a turn leaves the last complete turn's file and nothing else; the file does not
grow with the turns; bad input gets one line and leaves the file as it was. The template's
per-turn pieces are checked against the default model's own template.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import msrnn
from msrnn import statefile
from msrnn.chat import Turns
from msrnn.cli import main
from tiny import save, save_chat_tokenizer, tiny_hf

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
TURNS = ["hello there", "what is a multi-state?", "tell me more", "and then?", "thanks", "bye"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tinychat")
    save(tiny_hf("llama", seed=3), directory)
    return save_chat_tokenizer(directory)


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    """A tiny model that never ends a reply: its LM head rows of the EOS ids (2, config.json's;
    3, the template's end of turn) are zero, so a greedy reply never picks them."""
    directory = tmp_path_factory.mktemp("endless")
    model = tiny_hf("llama", seed=3)
    with torch.no_grad():
        model.lm_head.weight[2:4] = 0
    save(model, directory)
    return save_chat_tokenizer(directory)


def chat(monkeypatch, capsys, lines, *args):
    """Run `msrnn chat` in this process on stdin `lines` -> (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{x}\n" for x in lines)))
    code = main(["chat", *args])
    out, err = capsys.readouterr()
    return code, out, err


def turns_of(out: str) -> list:
    return [json.loads(line) for line in out.splitlines()]


def test_template_pieces_make_the_templates_own_rendering():
    """opening + reply + closing + next + reply + closing ... is the whole conversation as the
    default model's template renders it (module docstring of msrnn.chat)."""
    from test_convert import default_model_dir
    tok = msrnn.load_tokenizer(default_model_dir())
    turns = Turns(tok)
    replies = ["Paris.", "It is the RNN's state:\nk slots.", "Sure!"]
    messages, text = [], ""
    for i, (user, reply) in enumerate(zip(TURNS, replies)):
        text += (turns.opening(user) if i == 0 else turns.next(user)) + reply + turns.closing
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    assert text == tok.apply_chat_template(messages, add_generation_prompt=False)
    assert turns.closing == "<|im_end|>\n"


@pytest.mark.parametrize("backend", ["msrnn", "transformers"])
@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.9", "--seed", "7"]])
def test_a_resumed_conversation_is_the_one_that_never_stopped(tiny, tmp_path, monkeypatch,
                                                              capsys, backend, sampling):
    flags = [tiny, "--policy", "h2o", "--size", "12", "--positions", "compressed",
             "--max-new-tokens", "9", "--json", "--backend", backend, *sampling]
    code, out, _ = chat(monkeypatch, capsys, TURNS, *flags, "--session", str(tmp_path / "a"))
    assert code == 0
    whole = turns_of(out)
    assert [t["turn"] for t in whole] == [1, 2, 3, 4, 5, 6]
    assert [t["user"] for t in whole] == TURNS
    pieces = []
    for part in (TURNS[:2], TURNS[2:3], TURNS[3:]):          # three processes' worth
        code, out, _ = chat(monkeypatch, capsys, part, *flags, "--session", str(tmp_path / "b"))
        assert code == 0
        pieces += turns_of(out)
    assert pieces == whole
    assert all(t["slots"] == 13 for t in whole)
    assert whole[-1]["tokens"] > 13 * 6                      # far more read than kept
    assert open(tmp_path / "a", "rb").read() == open(tmp_path / "b", "rb").read()


def test_the_session_file_does_not_grow(tiny, tmp_path, monkeypatch, capsys):
    """A bounded policy's session stays the same size (up to the digits of its header's counts)
    while the tokens seen grow; Full's grows (so the check can fail)."""
    sizes = {}
    for policy in ("tova", "full"):
        path, sizes[policy] = str(tmp_path / policy), []
        for text in TURNS * 2:
            size = ["--size", "16"] if policy == "tova" else []
            code, out, _ = chat(monkeypatch, capsys, [text], tiny, "--policy", policy, *size,
                                "--max-new-tokens", "12", "--json", "--session", path)
            assert code == 0
            sizes[policy].append(os.path.getsize(path))
        assert turns_of(out)[0]["turn"] == len(TURNS) * 2
    assert turns_of(out)[0]["tokens"] > 200
    assert max(sizes["tova"]) - min(sizes["tova"]) <= 16, sizes["tova"]
    assert sizes["full"][-1] > 1.5 * sizes["full"][0], sizes["full"]   # 256 slots, then 512


def test_kill_9_mid_turn_leaves_the_last_complete_turn(endless, tmp_path):
    """A chat process killed (SIGKILL) while it streams a reply: the session file is the one the
    last complete turn wrote, byte for byte, no temporary file is left, and the session goes on."""
    path = tmp_path / "session"
    command = [sys.executable, "-m", "msrnn", "chat", endless, "--session", str(path),
               "--policy", "window", "--size", "16", "--positions", "cache"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(command + ["--max-new-tokens", "5", "--json"], input="first\n",
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    before = path.read_bytes()
    p = subprocess.Popen(command + ["--max-new-tokens", "1000000"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, env=env)
    p.stdin.write(b"second\n")
    p.stdin.flush()
    streamed = os.read(p.stdout.fileno(), 64)              # blocks until the reply streams
    time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert streamed and p.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["session"]
    done = subprocess.run(command + ["--max-new-tokens", "5", "--json"], input="second\n",
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["turn"] == 2


def test_empty_lines_are_skipped_and_eof_ends(tiny, tmp_path, monkeypatch, capsys):
    code, out, _ = chat(monkeypatch, capsys, ["", "  ", "hi", ""], tiny, "--size", "16",
                        "--max-new-tokens", "4", "--json", "--session", str(tmp_path / "s"))
    assert code == 0 and [t["turn"] for t in turns_of(out)] == [1]
    code, out, _ = chat(monkeypatch, capsys, [], tiny, "--session", str(tmp_path / "s"))
    assert code == 0 and out == ""
    code, out, _ = chat(monkeypatch, capsys, ["again"], tiny, "--max-new-tokens", "4",
                        "--session", str(tmp_path / "s"))
    assert code == 0 and out.endswith("\n")                      # streamed text, then a newline


def test_original_positions_stop_at_the_range(tmp_path, monkeypatch, capsys):
    """positions 'original': one clear line when the next turn could pass the model's range;
    the file keeps the last complete turn. 'cache' on the same model goes on."""
    directory = save(tiny_hf("llama", seed=3, max_position_embeddings=96), tmp_path / "short")
    save_chat_tokenizer(directory)
    capsys.readouterr()
    path = tmp_path / "s"
    code, out, err = chat(monkeypatch, capsys, TURNS, directory, "--size", "16",
                          "--max-new-tokens", "8", "--json", "--session", str(path))
    assert code == 2 and err.count("\n") == 1
    assert "past the model's range of 96 positions" in err and "--positions cache" in err
    done = turns_of(out)
    assert 0 < len(done) < len(TURNS) and done[-1]["tokens"] <= 96
    assert statefile.read(str(path))[0]["session"]["turns"] == len(done)
    code, out, _ = chat(monkeypatch, capsys, TURNS * 2, directory, "--size", "16",
                        "--positions", "cache", "--max-new-tokens", "8", "--json",
                        "--session", str(tmp_path / "c"))
    assert code == 0 and turns_of(out)[-1]["tokens"] > 3 * 96


# ------------------------------------------------------------------------------ bad input

@pytest.fixture
def session(tiny, tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "session")
    code, _, _ = chat(monkeypatch, capsys, ["hi"], tiny, "--policy", "tova", "--size", "16",
                      "--max-new-tokens", "4", "--session", path)
    assert code == 0
    return path, open(path, "rb").read()


def refused(monkeypatch, capsys, args, *words):
    code, out, err = chat(monkeypatch, capsys, ["more"], *args)
    assert code == 2 and out == "" and err.startswith("msrnn chat: error: "), err
    assert err.count("\n") == 1, err
    for w in words:
        assert w in err, err


def test_contradicting_flags_are_refused(tiny, session, monkeypatch, capsys):
    path, data = session
    for flags, word in ((["--policy", "h2o"], "--policy h2o"), (["--size", "32"], "--size 32"),
                        (["--sinks", "2"], "--sinks 2"), (["--positions", "cache"], "--positions"),
                        (["--dtype", "float64"], "--dtype float64")):
        refused(monkeypatch, capsys, [tiny, "--session", path, *flags], word, "contradicts",
                "tova", os.path.basename(tiny))
        assert open(path, "rb").read() == data
    code, out, _ = chat(monkeypatch, capsys, ["more"], tiny, "--session", path, "--policy",
                        "tova", "--size", "16", "--max-new-tokens", "3", "--json")
    assert code == 0 and turns_of(out)[0]["turn"] == 2          # agreeing flags are fine


def test_another_models_session_names_both(session, tmp_path, monkeypatch, capsys):
    path, data = session
    other = save(tiny_hf("llama", seed=8), tmp_path / "other-model")
    save_chat_tokenizer(other)
    capsys.readouterr()
    refused(monkeypatch, capsys, [other, "--session", path], "tinychat", "other-model",
            "fingerprint")
    assert open(path, "rb").read() == data


def test_bad_session_files(tiny, session, tmp_path, monkeypatch, capsys):
    path, data = session
    Path(path).write_bytes(data[: len(data) // 3])
    refused(monkeypatch, capsys, [tiny, "--session", path], "damaged, truncated")
    assert Path(path).read_bytes() == data[: len(data) // 3]
    refused(monkeypatch, capsys, [tiny, "--session", str(tmp_path)], "is a directory")
    refused(monkeypatch, capsys, [tiny, "--session", str(tmp_path / "nope" / "s")],
            "does not exist")
    model = msrnn.load(tiny)
    state = model.init_state(1, msrnn.policies.TOVA(8))
    state.save(str(tmp_path / "plain"))
    refused(monkeypatch, capsys, [tiny, "--session", str(tmp_path / "plain")],
            "not a chat session")


def test_unregistered_policy_and_unknown_version(tiny, session, monkeypatch, capsys):
    from test_statefile import rewrite_header
    path, _ = session
    rewrite_header(path, lambda h: h["policy"].update(name="lru"))
    refused(monkeypatch, capsys, [tiny, "--session", path], "'lru'", "--policy-module")
    rewrite_header(path, lambda h: h.update(version=2))
    refused(monkeypatch, capsys, [tiny, "--session", path], "version 2")


def test_an_unwritable_session_leaves_the_file(tiny, session, monkeypatch, capsys):
    """A full disk at the end of a turn (simulated: the tests run as root): one line, the last
    complete turn's file as it was, no temporary file."""
    import errno
    path, data = session

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(statefile.os, "fsync", fsync)
    code, out, err = chat(monkeypatch, capsys, ["more"], tiny, "--session", path,
                          "--max-new-tokens", "3", "--json")
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err
    assert open(path, "rb").read() == data
    assert sorted(os.listdir(os.path.dirname(path))) == ["session"]


def test_on_a_terminal_it_is_a_repl(tiny, tmp_path):
    """stdin a terminal (a pseudo-terminal here): a prompt, the reply streamed, a status line,
    and Ctrl-D (end of input) ends the chat with exit 0, the turn saved."""
    import pty
    import select
    path = tmp_path / "s"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    leader, follower = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "msrnn", "chat", tiny, "--session", str(path),
                          "--size", "16", "--max-new-tokens", "6"], stdin=follower,
                         stdout=follower, stderr=follower, env=env)
    os.close(follower)
    seen = b""

    def until(text: bytes):
        nonlocal seen
        deadline = time.time() + 120
        while seen.count(text) < until.count.get(text, 0) + 1 and time.time() < deadline:
            if select.select([leader], [], [], 1)[0]:
                seen += os.read(leader, 4096)
        until.count[text] = until.count.get(text, 0) + 1
        assert seen.count(text) >= until.count[text], seen
    until.count = {}
    until(b"> ")
    os.write(leader, b"hello\n")
    until(b"[turn 1: ")
    until(b"> ")
    os.write(leader, b"\x04")                                   # Ctrl-D
    assert p.wait(timeout=60) == 0
    os.close(leader)
    assert statefile.read(str(path))[0]["session"]["turns"] == 1


def test_decoding_past_eos(tmp_path, monkeypatch, capsys):
    """--ignore-eos and --min-new-tokens, as generate's: on a model whose every greedy token is
    its EOS (its final norm zeroed, so every logit is 0 and argmax is id 0, the EOS), a turn
    ends at once; with --ignore-eos it decodes exactly --max-new-tokens, and with
    --min-new-tokens M exactly M before its EOS."""
    directory = tmp_path / "eos"
    model = tiny_hf("llama", seed=3, eos_token_id=0)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    save(model, directory)
    save_chat_tokenizer(directory)
    seen = {}
    for name, flags in (("plain", []), ("ignore", ["--ignore-eos"]),
                        ("min", ["--min-new-tokens", "5"])):
        code, out, err = chat(monkeypatch, capsys, ["hi"], str(directory), "--size", "64",
                              "--max-new-tokens", "12", "--json", *flags,
                              "--session", str(tmp_path / f"{name}.session"))
        assert code == 0, err
        seen[name] = turns_of(out)[0]
    # A turn steps its prompt and the reply's tokens but the last, then the last and the closing:
    # the tokens seen grow by the reply's length.
    assert seen["ignore"]["tokens"] - seen["plain"]["tokens"] == 12 - 1
    assert seen["min"]["tokens"] - seen["plain"]["tokens"] == 5
    assert seen["min"]["assistant"] == "\x01" * 5 and seen["plain"]["assistant"] == ""
    code, _, err = chat(monkeypatch, capsys, ["hi"], str(directory), "--max-new-tokens", "4",
                        "--min-new-tokens", "5", "--session", str(tmp_path / "bad.session"))
    assert code == 2 and "--min-new-tokens must be in 0..--max-new-tokens (4), got 5" in err

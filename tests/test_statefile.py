"""A multi-state saved and loaded (msrnn.statefile) continues bit for bit.

For every registered policy, every position scheme, both backends and float32 and float64: a run
interrupted by save + load gives exactly (torch.equal) the logits and kept positions of the run
that never stopped. A file moves between the backends of one checkpoint (equal to the backends'
own agreement, tests/test_backends.py). Bad files and destinations are refused in one line, and
the file on disk is left as it was.
"""

import errno
import json
import os

import pytest
import torch

import msrnn
import msrnn.hf
from msrnn import statefile
from msrnn.policies import REGISTRY, from_name
from msrnn.positions import NAMES as SCHEMES
from msrnn.prompt import fill, prefill
from tiny import save, tiny_hf

torch.set_num_threads(1)

K = 8
VOCAB = 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = tiny_hf("llama", seed=3)
    return save(hf, tmp_path_factory.mktemp("tiny-a")), hf


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A second checkpoint of the very same shapes, other weights."""
    return save(tiny_hf("llama", seed=4), tmp_path_factory.mktemp("tiny-b"))


def backend(checkpoint, kind, dtype):
    directory, hf = checkpoint
    if kind == "msrnn":
        return msrnn.load(directory, dtype=dtype)
    from transformers import AutoModelForCausalLM
    return msrnn.hf.HFBackend(AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval())


def tokens(n, seed=5):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def policy_named(name):
    return from_name(name, K, 2 if name == "sinks" else None)


def continue_run(model, state, feed):
    """[(logits, kept positions of every layer)] for each token of feed [N, B], stepped."""
    out = []
    for ids in feed:
        logits, state = model.step(ids, state)
        out.append((logits, [state.positions(l) for l in range(state.shape.layers)]))
    return out


def assert_same(a, b, what):
    for i, ((la, pa), (lb, pb)) in enumerate(zip(a, b)):
        assert torch.equal(la, lb), f"{what}: logits differ at step {i}"
        assert all(torch.equal(x, y) for x, y in zip(pa, pb)), f"{what}: kept positions, step {i}"


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["msrnn", "transformers"])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", list(REGISTRY))
def test_a_loaded_state_continues_bit_for_bit(checkpoint, tmp_path, name, scheme, kind, dtype):
    model = backend(checkpoint, kind, dtype)
    policy = policy_named(name)
    state = model.init_state(1, policy, positions=scheme)
    prefill(model, tokens(20)[None], state, "sequential")           # past k: evictions happened
    path = tmp_path / "state.msrnn"
    state.save(str(path))
    feed = tokens(12, seed=6)[:, None]
    loaded = msrnn.MultiState.load(str(path), model=model)
    assert loaded.length == 20 and loaded.policy == policy and loaded.scheme.value == scheme
    assert_same(continue_run(model, state, feed), continue_run(model, loaded, feed),
                f"{name} {scheme} {kind}")
    if policy.bounded:
        assert loaded.slots == K + 1


@torch.inference_mode()
def test_ragged_rows_and_h2o_memory_survive(checkpoint, tmp_path):
    """Two rows at different positions (a ragged batch) and H2O's accumulated attention."""
    model = backend(checkpoint, "msrnn", torch.float64)
    state, _ = fill(model, [tokens(17), tokens(11, seed=9)], msrnn.policies.H2O(K), "oneshot")
    assert state.t.tolist() == [17, 11]
    state.save(str(tmp_path / "s"))
    loaded = msrnn.MultiState.load(str(tmp_path / "s"), model)
    assert torch.equal(loaded.t, state.t)
    assert torch.equal(loaded.layers[1].memory["acc"], state.layers[1].memory["acc"])
    feed = tokens(10, seed=8).view(5, 2)
    assert_same(continue_run(model, state, feed), continue_run(model, loaded, feed), "ragged")


@torch.inference_mode()
@pytest.mark.parametrize("direction", [("msrnn", "transformers"), ("transformers", "msrnn")])
def test_a_state_moves_between_backends(checkpoint, tmp_path, direction):
    """Saved by one backend, loaded by the other: the continuation equals the other backend's
    own uninterrupted run to the backends' agreement (float64; transformers' RoPE is float32),
    keeping the same positions."""
    writer, reader = (backend(checkpoint, kind, torch.float64) for kind in direction)
    assert writer.fingerprint == reader.fingerprint
    policy = msrnn.policies.TOVA(K)
    state = writer.init_state(1, policy, positions="compressed")
    prefill(writer, tokens(20)[None], state, "sequential")
    state.save(str(tmp_path / "s"))
    own = reader.init_state(1, policy, positions="compressed")
    prefill(reader, tokens(20)[None], own, "sequential")
    feed = tokens(12, seed=6)[:, None]
    a = continue_run(reader, msrnn.MultiState.load(str(tmp_path / "s"), reader), feed)
    b = continue_run(reader, own, feed)
    for (la, pa), (lb, pb) in zip(a, b):
        assert (la - lb).abs().max() <= 1e-5
        assert all(torch.equal(x, y) for x, y in zip(pa, pb))


def test_fingerprint_tells_checkpoints_apart_not_dtypes(checkpoint, other):
    a32 = backend(checkpoint, "msrnn", torch.float32)
    assert a32.fingerprint == backend(checkpoint, "msrnn", torch.bfloat16).fingerprint
    assert a32.fingerprint == backend(checkpoint, "transformers", torch.float32).fingerprint
    b = msrnn.load(other)
    assert b.shape == a32.shape and b.fingerprint != a32.fingerprint


# ------------------------------------------------------------------------------ bad input

@pytest.fixture
def saved(checkpoint, tmp_path):
    """(model, path of a saved TOVA state, its bytes)."""
    model = backend(checkpoint, "msrnn", torch.float32)
    state = model.init_state(1, msrnn.policies.TOVA(K))
    with torch.inference_mode():
        prefill(model, tokens(12)[None], state, "sequential")
    path = str(tmp_path / "state.msrnn")
    state.save(path)
    return model, path, open(path, "rb").read()


def refused(call, *words):
    with pytest.raises((ValueError, OSError)) as e:
        call()
    message = str(e.value)
    assert "\n" not in message, message
    for w in words:
        assert w in message, message
    return message


def rewrite_header(path, change):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(path, "pt") as f:
        head = json.loads(f.metadata()["msrnn"])
        named = {k: f.get_tensor(k) for k in f.keys()}
    change(head)
    save_file(named, path, metadata={"msrnn": json.dumps(head)})


def test_another_models_file_names_both(saved, other):
    model, path, data = saved
    b = msrnn.load(other)
    refused(lambda: msrnn.MultiState.load(path, b), model.name, b.name, "another", "model")
    assert open(path, "rb").read() == data


def test_truncated_corrupt_and_foreign_files(saved, tmp_path):
    model, path, data = saved
    for i, bad in enumerate([data[: len(data) // 2], data[:5], b"", b"not a state at all" * 9]):
        p = tmp_path / f"bad{i}"
        p.write_bytes(bad)
        refused(lambda: msrnn.MultiState.load(str(p), model), "damaged, truncated")
        assert p.read_bytes() == bad
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF                                # a byte of the last tensor
    p = tmp_path / "flipped"
    p.write_bytes(bytes(flipped))
    refused(lambda: msrnn.MultiState.load(str(p), model), "damaged", "digest")
    p = tmp_path / "weights.safetensors"                # a safetensors file, not a state
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(p))
    refused(lambda: msrnn.MultiState.load(str(p), model), "not a multi-state file")


def test_unknown_version_and_unregistered_policy(saved):
    model, path, _ = saved
    rewrite_header(path, lambda h: h.update(version=99))
    refused(lambda: msrnn.MultiState.load(path, model), "version 99", f"version "
            f"{statefile.VERSION}")
    rewrite_header(path, lambda h: h.update(version=statefile.VERSION,
                                            policy={"name": "lru", "args": {"size": K}}))
    before = open(path, "rb").read()
    refused(lambda: msrnn.MultiState.load(path, model), "'lru'", "not registered",
            "--policy-module")
    assert open(path, "rb").read() == before


def test_dtype_and_directories(saved, checkpoint, tmp_path):
    model, path, data = saved
    refused(lambda: msrnn.MultiState.load(path, backend(checkpoint, "msrnn", torch.float64)),
            "float32", "float64", "--dtype")
    refused(lambda: msrnn.MultiState.load(str(tmp_path), model), "is a directory")
    state = msrnn.MultiState.load(path, model)
    refused(lambda: state.save(str(tmp_path)), "is a directory")
    refused(lambda: state.save(str(tmp_path / "no" / "such" / "dir" / "f")), "does not exist")
    refused(lambda: msrnn.MultiState.load(str(tmp_path / "missing"), model), "no multi-state")
    bare = msrnn.MultiState(model.shape, msrnn.policies.TOVA(K), 1)
    refused(lambda: bare.save(str(tmp_path / "bare")), "init_state")


@pytest.mark.parametrize("failure", ["read-only", "disk full"])
def test_unwritable_destination_leaves_the_file(saved, monkeypatch, failure):
    """A read-only directory (the temporary file cannot be made) and a full disk (the write
    fails): one line, the old file as it was, no temporary file left. Simulated: the tests
    run as root, which a read-only directory does not stop."""
    model, path, data = saved
    state = msrnn.MultiState.load(path, model)
    with torch.inference_mode():
        model.step(torch.tensor([3]), state)
    if failure == "read-only":
        def mkstemp(*a, **k):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(statefile.tempfile, "mkstemp", mkstemp)
        words = ("Permission denied", "writable")
    else:
        def fsync(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(statefile.os, "fsync", fsync)
        words = ("No space left on device", "untouched")
    refused(lambda: state.save(path), path, *words)
    assert open(path, "rb").read() == data
    assert statefile.stale_temps(path) == []
    assert sorted(os.listdir(os.path.dirname(path))) == ["state.msrnn"]

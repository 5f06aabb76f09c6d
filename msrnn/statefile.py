"""A multi-state on disk: `state.save(path)`, `MultiState.load(path, model=...)`, and a run that
continues bit for bit.

A bounded multi-state is the RNN's whole memory of what it has read, and its size never changes
(k + 1 slots per layer, however many tokens it has seen). Unlike a transformer's cache it can
be written down, copied and resumed: a conversation that outlives its process.

The file is safetensors (tensors and a string header; never pickle, so loading runs no code):

    layer.{l}.keys, layer.{l}.values   [B, Hkv, S, D]   the model's dtype, exactly as held
    layer.{l}.pos                      [B, Hkv, S]      int64; -1 marks an empty slot
    layer.{l}.memory.{name}            [B, Hkv, S]      the policy's own memory (H2O's "acc")
    t                                  [B]              each row's next position

Every slot is written, empty ones included, in slot order: the next step picks its free slot
and breaks its ties exactly as it would have. The metadata key "msrnn" holds the JSON header:

    format, version       "msrnn.multistate", VERSION (a reader refuses versions it does not know)
    model                 {name, fingerprint, backend}: which checkpoint made it (`fingerprint`)
    policy                {name, args}: the registry name and the dataclass's arguments (a list
                          of them, one per row, for rows with policies of their own)
    capacity              what Full's slots were made for (Full rows beside bounded ones: the
                          most tokens they hold)
    positions, allow_past_range, length, dtype, rows, slots, layers, kv_heads, head_dim
    digest                sha256 of the tensors' bytes: a damaged file is refused, not resumed
    session               what a caller stored beside the state (`msrnn chat`: its turns)

Loading makes an empty multi-state with the model's own init_state (so its RoPE, slots and
checks are the model's) and copies the tensors into its buffers.
"""

import hashlib
import json
import os
import tempfile
from dataclasses import fields

import torch

from .policies import REGISTRY, Policy

FORMAT, VERSION = "msrnn.multistate", 1
SAMPLE_ROWS = 64                 # embedding rows hashed into a fingerprint


def fingerprint(embed, norms: list, shape) -> str:
    """Which checkpoint a model is, in 16 hex digits: sha256 over its dimensions (layers, KV
    heads, head dim, range, vocabulary, width) and a cheap digest of some weights: 64 embedding
    rows evenly spaced over the vocabulary and the given norm weights (the last block's input
    norm and the final norm), each rounded to bfloat16.

    These tensors are stored alike by both backends (msrnn's decoder fuses and may quantize its
    projections, never its embedding or norms), so one checkpoint has one fingerprint on either
    backend and in any dtype (float32 and bfloat16 loads round to the same bfloat16). Two
    checkpoints of one architecture differ in them unless a fine-tune left the embedding and
    every norm untouched (a LoRA of the projections alone would)."""
    V, E = embed.shape
    dims = dict(layers=shape.layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                positions=shape.positions, vocab=V, width=E)
    h = hashlib.sha256(json.dumps(dims, sort_keys=True).encode())
    rows = torch.linspace(0, V - 1, min(V, SAMPLE_ROWS)).round().long()
    for x in (embed.detach()[rows.to(embed.device)], *norms):
        h.update(_bytes(x.detach().to("cpu", torch.bfloat16)))
    return h.hexdigest()[:16]


def _bytes(x: torch.Tensor) -> bytes:
    return x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def describe_policy(policy: Policy) -> dict:
    """{name, args}: the policy's registry name and its dataclass arguments, from which `policy`
    rebuilds it. Of several names for one class (h2o, h2o-layer) the one whose fixed arguments it
    has, the most specific first."""
    for name, (cls, fixed, _) in sorted(REGISTRY.items(), key=lambda kv: -len(kv[1][1])):
        if type(policy) is cls and all(getattr(policy, k) == v for k, v in fixed.items()):
            args = {f.name: getattr(policy, f.name) for f in fields(policy)}
            try:
                json.dumps(args)
            except TypeError:
                raise ValueError(f"{policy} has arguments that are not JSON values; a saved "
                                 f"multi-state records its policy's arguments") from None
            return {"name": name, "args": args}
    raise ValueError(f"{type(policy).__name__} is not registered (msrnn.policies.register), so a "
                     f"file cannot name it; register it to save its multi-states")


def policy(spec: dict, path: str) -> Policy:
    """The policy a header names ({name, args}), from this process's registry."""
    name, args = spec["name"], spec["args"]
    if name not in REGISTRY:
        raise ValueError(f"{path} holds a multi-state of policy {name!r}, which is not registered "
                         f"in this process; import the module that registers it "
                         f"(--policy-module MODULE on the command line)")
    try:
        return REGISTRY[name][0](**args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: policy {name!r} cannot be made from {args} ({e}); the file "
                         f"was written by another version of that policy") from None


def header(state, session: dict | None = None) -> dict:
    """The JSON header of `state` (module docstring); `session`: a caller's own fields."""
    made_by = state.model
    if made_by is None:
        raise ValueError("this multi-state does not know the model that made it (it was not made "
                         "by model.init_state or msrnn.hf.HFBackend.init_state), so a file could "
                         "not name it; make it with init_state to save it")
    if state.shape.group is not None:
        raise ValueError("a tensor-parallel rank's multi-state holds only its own KV heads; save "
                         "the multi-state of a model run in one process")
    s = state.shape
    return {"format": FORMAT, "version": VERSION,
            "model": {"name": made_by.name, "fingerprint": made_by.fingerprint,
                      "backend": made_by.backend},
            "policy": describe_policy(state.policy) if isinstance(state.policy, Policy) else
                      [describe_policy(p) for p in state.policy],
            "capacity": state.slots if state.room is None else state.room,
            "positions": state.scheme.value,
            "allow_past_range": state.allow_past_range, "length": state.length,
            "dtype": str(s.dtype).removeprefix("torch."), "rows": state.batch_size,
            "slots": state.slots, "layers": s.layers, "kv_heads": s.kv_heads,
            "head_dim": s.head_dim, "session": session}


def tensors(state) -> dict:
    """The state's tensors by name, on the CPU."""
    out = {"t": state.t}
    for i, layer in enumerate(state.layers):
        out |= {f"layer.{i}.keys": layer.keys, f"layer.{i}.values": layer.values,
                f"layer.{i}.pos": layer.pos}
        out |= {f"layer.{i}.memory.{name}": m for name, m in layer.memory.items()}
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def digest(named: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(named):
        h.update(name.encode() + _bytes(named[name]))
    return h.hexdigest()


def save(state, path: str, session: dict | None = None):
    """Write `state` to `path` as one safetensors file, atomically (`write_atomic`)."""
    from safetensors.torch import save as to_bytes

    head = header(state, session)
    named = tensors(state)
    head["digest"] = digest(named)
    write_atomic(path, to_bytes(named, metadata={"msrnn": json.dumps(head)}))


def write_atomic(path: str, data: bytes):
    """The whole file or the old one: a temporary file in the same directory, written and
    fsync'ed, then renamed over `path` (rename is atomic within a file system); on any failure
    (a read-only directory, a full disk, an interrupt) the temporary file is removed and `path`
    is left as it was. A process killed between the two may leave `.NAME.*.tmp` (stale_temps)."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; give a file name to write the multi-state to")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"cannot write {path}: the directory {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                   suffix=".tmp")
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror} in {directory}; choose a writable "
                      f"directory") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):
            raise OSError(f"cannot write {path}: {e.strerror or e}; the file there (if any) is "
                          f"untouched") from None
        raise
    try:                                  # the rename itself, durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass                              # a file system that cannot fsync a directory


def stale_temps(path: str) -> list:
    """Temporary files that `write_atomic(path, ...)` left behind in a process that was killed
    while writing (never the file itself)."""
    directory, base = os.path.split(os.path.abspath(path))
    prefix = f".{base}."
    return [os.path.join(directory, n) for n in os.listdir(directory)
            if n.startswith(prefix) and n.endswith(".tmp")] if os.path.isdir(directory) else []


def read(path: str, with_tensors: bool = True) -> tuple[dict, dict]:
    """(header, tensors) of a multi-state file, or one clear error for a file that is missing,
    a directory, damaged, truncated, not msrnn's, or of a version this msrnn does not know."""
    from safetensors import safe_open

    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not a multi-state file; give the file's path")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no multi-state file at {path}")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            named = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}
        head = json.loads(meta["msrnn"])
        if not isinstance(head, dict):
            raise ValueError
    except Exception:
        raise ValueError(f"{path} is not a multi-state file msrnn can read (damaged, truncated "
                         f"or another kind of file); save the state again") from None
    if head.get("format") != FORMAT:
        raise ValueError(f"{path} is not a multi-state file (its header says format "
                         f"{head.get('format')!r}); give a file written by state.save")
    if head.get("version") != VERSION:
        raise ValueError(f"{path} has format version {head.get('version')!r}; this msrnn reads "
                         f"version {VERSION}: use the msrnn that wrote it")
    if with_tensors and head.get("digest") != digest(named):
        raise ValueError(f"{path} is damaged (its tensors do not match the digest in its "
                         f"header); save the state again")
    return head, named


def check_model(head: dict, model, path: str):
    """Refuse a file written for another checkpoint, naming both; a file from the other backend
    of the same checkpoint is accepted (the two compute the same step: tests/test_backends.py)."""
    saved = head["model"]
    if saved["fingerprint"] != model.fingerprint:
        raise ValueError(f"{path} holds a multi-state of {saved['name']} (fingerprint "
                         f"{saved['fingerprint']}), not of {model.name} (fingerprint "
                         f"{model.fingerprint}); load it with the model that wrote it")
    dtype = str(model.shape.dtype).removeprefix("torch.")
    if head["dtype"] != dtype:
        raise ValueError(f"{path} holds a {head['dtype']} multi-state, and this model runs in "
                         f"{dtype}; load the model with dtype {head['dtype']} (--dtype)")


def load(path: str, model):
    """The multi-state saved at `path`, in a new multi-state of `model` (any backend: msrnn's
    decoder, its Compiled step, msrnn.hf.HFBackend), ready for its next step."""
    head, named = read(path)
    check_model(head, model, path)
    spec = head["policy"]
    pol = [policy(p, path) for p in spec] if isinstance(spec, list) else policy(spec, path)
    rows, slots = head["rows"], head["slots"]
    state = model.init_state(rows, pol, capacity=head.get("capacity", slots),
                             positions=head["positions"],
                             allow_past_range=head["allow_past_range"])
    wanted = tensors(state)                          # the names, shapes and dtypes it needs
    if set(named) != set(wanted) or any(named[k].shape != wanted[k].shape or
                                        named[k].dtype != wanted[k].dtype for k in wanted):
        raise ValueError(f"{path} does not hold the tensors its header describes ({rows} rows, "
                         f"{slots} slots, {head['layers']} layers); save the state again")
    with torch.no_grad():
        for i, layer in enumerate(state.layers):     # copy_: the buffers keep their addresses
            layer.keys.copy_(named[f"layer.{i}.keys"])
            layer.values.copy_(named[f"layer.{i}.values"])
            layer.pos.copy_(named[f"layer.{i}.pos"])
            for name, m in layer.memory.items():
                m.copy_(named[f"layer.{i}.memory.{name}"])
    state.resume(head["length"], named["t"])         # the count, and each row's own position
    return state

"""Decode speed and memory, side by side with Hugging Face transformers: the measurements behind
`msrnn bench` (whose command line, report and plot are msrnn/cli/bench.py).

Four parts, all in one run on one model, prompt and machine (docs/performance.md):

  speed       decode tokens/s and peak memory at batch 1: transformers `generate` (DynamicCache),
              msrnn eager and compiled, Full and TOVA, float32 and bfloat16 (and int8 or int4
              weights with float32 activations, `quantize`); each row also as a ratio to
              transformers in
              the same dtype and to transformers float32. Every row runs in a fresh process, so
              its peak resident memory is its own.
  latency     per-token latency as the sequence grows (to 8,192): Full grows, TOVA stays flat.
  throughput  the paper's experiment scaled to this machine: 4,096-token sequences under a fixed
              key-value memory budget (what a batch of 8 full-cache sequences needs); a bounded
              multi-state fits a larger batch. Equal and ragged rows, eager and compiled.
  prefill     prompt tokens/s against transformers' forward.
  ceiling     bytes of weights read per token against the measured memory bandwidth: the
              fastest batch-1 decoding this machine allows, per kind of weights (float32,
              bfloat16, int8, int4), and each speed as a fraction of its own.
"""

import json
import os
import resource
import subprocess
import sys
import time

import torch

from .. import load, policies
from .. import quantize as quantization
from ..policies import Full, TOVA
from ..backend import compile_seconds, enter, leave
from ..prompt import prefill


def now(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def compiled_in(seconds: float) -> str:
    """", compiled in 58.0 s" after a rate that leaves compilation out ("" for none)."""
    return f", compiled in {seconds:.1f} s" if seconds else ""


def peak_memory_mb(device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def prompt_ids(n: int, vocab: int, device, batch: int = 1):
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, min(vocab, 20000), (batch, n), generator=g).to(device)


# ----------------------------------------------------------------------------- speed


@torch.inference_mode()
def msrnn_speed(model, prompt, policy, new_tokens: int, compiled: bool, warmup: int = 8,
                wrapper: str = "python"):
    """Decode tokens/s after the prompt, steps timed one by one; the first `warmup` steps (and,
    compiled, the compilation) are run before timing on a copy of the same setup. compile_s:
    the seconds the compilation took, reported on its own. wrapper: the compiled step's
    (backend.Compiled)."""
    device = prompt.device
    if compiled:
        model = model.compile_step(wrapper=wrapper)
    for timed in (False, True):
        capacity = prompt.shape[1] + new_tokens + warmup
        state = model.init_state(1, policy, capacity=capacity)
        logits, state = prefill(model, prompt, state, mode="oneshot")
        tok = logits[:, -1].argmax(-1)
        n = new_tokens if timed else warmup
        start = now(device)
        for _ in range(n):
            logits, state = model.step(tok, state)
            tok = logits.argmax(-1)
        seconds = now(device) - start
    return {"tok_s": new_tokens / seconds, "state_mb": state.nbytes() / 2**20,
            "compile_s": compile_seconds(model)}


@torch.inference_mode()
def transformers_speed(path, prompt, new_tokens: int, dtype, device):
    """transformers' own greedy `generate` with its DynamicCache: decode tokens/s, timed as
    (time for prompt + N tokens) - (time for prompt + 1 token)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

    def timed(n):
        start = now(device)
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, pad_token_id=0)
        assert out.shape[1] == prompt.shape[1] + n
        return now(device) - start

    timed(8)                                                  # warm-up
    first = min(timed(1) for _ in range(2))
    total = timed(new_tokens + 1)
    cache = 2 * hf.config.num_hidden_layers * hf.config.num_key_value_heads * (
        hf.config.head_dim or hf.config.hidden_size // hf.config.num_attention_heads)
    nbytes = cache * (prompt.shape[1] + new_tokens) * torch.finfo(dtype).bits // 8
    return {"tok_s": new_tokens / (total - first), "state_mb": nbytes / 2**20}


def run_row(spec: dict) -> dict:
    """One speed row, in this process (called in a fresh subprocess by `speed`)."""
    torch.manual_seed(0)
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    if spec["impl"] == "transformers":
        cfg = json.load(open(os.path.join(spec["model"], "config.json")))
        prompt = prompt_ids(spec["prompt_tokens"], cfg["vocab_size"], device)
        result = transformers_speed(spec["model"], prompt, spec["new_tokens"], dtype, device)
    else:
        model = load(spec["model"], dtype=dtype, device=device, quantize=spec["quantize"])
        prompt = prompt_ids(spec["prompt_tokens"], model.cfg.vocab_size, device)
        policy = policies.from_name(spec["policy"], spec["size"])
        result = msrnn_speed(model, prompt, policy, spec["new_tokens"],
                             spec["impl"] == "msrnn compiled",
                             wrapper=spec.get("wrapper", "python"))
    return {**spec, **result, "peak_mb": peak_memory_mb(device)}


def in_fresh_process(module: str, spec: dict, env: dict | None = None) -> dict:
    """`python -m module JSON(spec)` in a fresh process (its own allocator, compiled graphs
    and caches, so that no row inherits another's) -> the JSON row it prints last. A row that
    fails raises, with the end of its stderr."""
    out = subprocess.run([sys.executable, "-m", module, json.dumps(spec)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark row {spec.get('impl')} {spec.get('weights')} failed "
                           f"({module}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed(model: str, dtypes, device: str, size: int, prompt_tokens: int, new_tokens: int,
          compiled: bool = True, quantize: str | None = None, log=sys.stderr,
          wrapper: str = "python"):
    """Batch-1 decode speed rows: transformers, msrnn eager (and compiled), Full and TOVA(size),
    for each dtype, each row in a fresh process; with `quantize`, msrnn's rows again with those
    weights and float32 activations. A row's `weights` is its dtype or `quantize`; `wrapper`,
    the compiled rows' (backend.Compiled)."""
    rows = []
    impls = ["transformers", "msrnn eager"] + (["msrnn compiled"] if compiled else [])
    kinds = [(dtype, dtype, impls) for dtype in dtypes]
    if quantize:
        kinds.append((quantize, "float32", impls[1:]))
    for weights, dtype, kind_impls in kinds:
        for impl in kind_impls:
            for policy in (["full"] if impl == "transformers" else ["full", "tova"]):
                spec = {"impl": impl, "policy": policy, "size": size if policy != "full"
                        else None, "dtype": dtype, "weights": weights, "model": model,
                        "device": device, "prompt_tokens": prompt_tokens,
                        "new_tokens": new_tokens,
                        "quantize": None if weights == dtype else weights,
                        **({"wrapper": wrapper} if impl == "msrnn compiled" else {})}
                row = in_fresh_process("msrnn.experiments.bench", spec)
                rows.append(row)
                print(f"  {impl:15s} {policy:5s} {weights:9s} {row['tok_s']:7.1f} tok/s  peak "
                      f"{row['peak_mb']:7.0f} MB"
                      f"{compiled_in(row.get('compile_s', 0))}", file=log, flush=True)
    for row in rows:                      # int8 rows: against transformers' float32 (their dtype)
        same = next(r for r in rows if r["impl"] == "transformers" and r["dtype"] == row["dtype"])
        fp32 = next((r for r in rows if r["impl"] == "transformers" and r["dtype"] == "float32"),
                    same)
        row["vs_transformers"] = row["tok_s"] / same["tok_s"]
        row["vs_transformers_fp32"] = row["tok_s"] / fp32["tok_s"]
    return rows


# ----------------------------------------------------------------------------- latency


def fake_state(model, policy, batch: int, position: int, capacity=None, spread: int = 0):
    """A multi-state as it would be at `position`, its slots filled with random keys and values
    (a step's cost depends only on the shapes). spread > 0: a ragged batch, row b that many
    tokens behind row 0 times b / B."""
    capacity = capacity or position + 64
    state = model.init_state(batch, policy, capacity=capacity)
    enter(state, position)                         # the range check, and room for Full
    leave(state, position)                         # `position` tokens counted as seen
    for b in range(batch):
        at = position - spread * b // batch                           # row b's position
        for layer in state.layers:
            for h, k in enumerate(layer.each()):                      # each KV head's budget
                n = min(at, k)
                layer.keys[b, h, :n].normal_()
                layer.values[b, h, :n].normal_()
                layer.pos[b, h, :n] = torch.arange(at - n, at, device=layer.pos.device)
        state.t[b] = at
    return state


@torch.inference_mode()
def step_seconds(model, state, steps: int = 12) -> float:
    """Median seconds of a decode step on `state` (which advances by `steps` + 2)."""
    device = state.t.device
    tok = torch.zeros(state.batch_size, dtype=torch.long, device=device)
    times = []
    for i in range(steps + 2):
        start = now(device)
        model.step(tok, state)
        if i >= 2:
            times.append(now(device) - start)
    return sorted(times)[len(times) // 2]


def latency(model, lengths, size: int, log=sys.stderr, steps: int = 12, rounds: int = 3,
            compiled=None):
    """Per-token latency as the sequence grows, Full against TOVA(size); with `compiled` (the
    model with its step compiled) TOVA's rows run compiled too: its slots are the same at every
    length, so one graph serves them all (Full's grow, and would compile once per length).

    Each (policy, length n) state is timed for `steps` steps in each of `rounds` rounds that go
    over all of them in turn, so that a slow spell of the machine hits every row alike; a row's
    latency is its best round's median. The last steps bring the sequence to n tokens."""
    if min(lengths) < shortest_latency_length(steps, rounds):
        raise ValueError(f"--lengths must be at least {shortest_latency_length(steps, rounds)}: "
                         f"each is reached by {rounds} rounds of {steps + 2} timed steps")
    runs = [("full", Full(), model, False), ("tova", TOVA(size), model, False)]
    if compiled is not None:
        runs.append(("tova", TOVA(size), compiled, True))
    rows = [{"policy": name, "size": policy.size, "length": n, "compiled": is_compiled,
             "ms": float("inf"), "model": step,
             "state": fake_state(model, policy, 1, n - rounds * (steps + 2))}
            for name, policy, step, is_compiled in runs for n in lengths]
    for _ in range(rounds):
        for row in rows:
            row["ms"] = min(row["ms"], step_seconds(row["model"], row["state"], steps) * 1e3)
    for row in rows:
        del row["model"]
        print(f"  {str(row.pop('state').policy):10s} length {row['length']:5d}"
              f"{' compiled' if row['compiled'] else ''}: {row['ms']:6.1f} ms/token", file=log,
              flush=True)
    if compiled is not None:                     # in the untimed first steps of each state
        print(f"  (compiled rows: compiled in {compile_seconds(compiled):.1f} s, not in their "
              f"latencies)", file=log, flush=True)
    return rows


def shortest_latency_length(steps: int = 12, rounds: int = 3) -> int:
    return rounds * (steps + 2) + 1


# ----------------------------------------------------------------------------- throughput


def kv_bytes_per_slot(model) -> int:
    """A slot's key and value in every layer, in the multi-state's dtype (a model or a Compiled)."""
    s = model.shape
    return 2 * s.layers * s.kv_heads * s.head_dim * torch.finfo(s.dtype).bits // 8


def throughput(model, length: int, full_batch: int, sizes, log=sys.stderr, ragged=False,
               compiled=False):
    """The paper's Sec. 5.4 on this machine: sequences of `length` tokens, a key-value budget
    of what `full_batch` full-cache sequences need; each TOVA(size) gets the largest batch that
    fits. Tokens/s = batch * length / (sum over positions of the step time), the step time
    measured at a few positions and interpolated linearly in between (before the first, see
    _interpolate).

    ragged: the rows sit at different positions (prompts of different lengths, up to half the
    sequence apart), each with its own. compiled: `model` steps compiled (Full then holds all
    `length` slots from the start, as msrnn.generate allocates them, so that one graph serves
    every position)."""
    L, budget = length, full_batch * length * kv_bytes_per_slot(model)
    grid = sorted({L // 2 + 1, 5 * L // 8, 3 * L // 4, 7 * L // 8, L - 16} if ragged else
                  {16, L // 4, L // 2, 3 * L // 4, L - 16})
    rows = []
    for name, policy in [("full", Full())] + [("tova", TOVA(k)) for k in sizes]:
        slots = policy.size + 1 if policy.bounded else L
        batch = budget // (slots * kv_bytes_per_slot(model))
        before = compile_seconds(model)            # the untimed first steps compile
        ms = [step_seconds(model, fake_state(model, policy, batch, p, L if compiled else None,
                                             L // 2 if ragged else 0), steps=8) for p in grid]
        total = sum(_interpolate(grid, ms, p) for p in range(L))
        rows.append({"policy": name, "size": policy.size, "batch": int(batch),
                     "ragged": ragged, "compiled": compiled,
                     "kv_budget_mb": budget / 2**20, "tok_s": batch * L / total,
                     "step_ms": [m * 1e3 for m in ms], "positions": grid,
                     "compile_s": compile_seconds(model) - before})
        print(f"  {str(policy):10s} batch {batch:4d}{' ragged' if ragged else ''}"
              f"{' compiled' if compiled else ''}: {batch * L / total:7.1f} tok/s"
              f"{compiled_in(rows[-1]['compile_s'])}", file=log, flush=True)
    for row in rows:
        row["vs_full"] = row["tok_s"] / rows[0]["tok_s"]
    return rows


def _interpolate(xs, ys, x):
    """The step time at position x from those measured at positions xs (ascending): the line
    between the two measurements around x; past the last, the last. Before the first, the line
    through the first two, but never below the line from (0, 0) to the first: a step costs
    something at every position, and a slow spell at the second measurement (a loaded machine)
    would tilt the line through zero and make the sum over positions negative. Clean
    measurements never need it (their line meets position 0 above zero)."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            line = y0 + (y1 - y0) * (x - x0) / max(1, x1 - x0)
            return max(line, y0 * x / x0) if x < x0 else line
    return ys[-1]


# ----------------------------------------------------------------------------- prefill


@torch.inference_mode()
def prefill_speed(model_dir: str, tokens: int, size: int, device, log=sys.stderr, repeats=3):
    """Prompt tokens/s at batch 1 (best of `repeats`): transformers' forward (its own cache),
    msrnn Full, and msrnn TOVA(size) in both prompt modes."""
    from transformers import AutoModelForCausalLM

    model = load(model_dir, device=device)
    ids = prompt_ids(tokens, model.cfg.vocab_size, device)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()

    def best(run, repeats=repeats):
        times = []
        for _ in range(repeats):
            start = now(device)
            run()
            times.append(now(device) - start)
        return tokens / min(times)

    rows = [{"impl": "transformers", "policy": "full", "mode": "-",
             "tok_s": best(lambda: hf(ids, logits_to_keep=1))}]
    for name, policy, mode in (("full", Full(), "-"), ("tova", TOVA(size), "oneshot"),
                               ("tova", TOVA(size), "sequential")):
        rows.append({"impl": "msrnn", "policy": name if name == "full" else f"tova({size})",
                     "mode": mode, "tok_s": best(lambda: prefill(
                         model, ids, model.init_state(1, policy, capacity=tokens),
                         mode="oneshot" if mode == "-" else mode, logits=False),
                         repeats=1 if mode == "sequential" else repeats)})
    for row in rows:
        row["vs_transformers"] = row["tok_s"] / rows[0]["tok_s"]
        print(f"  {row['impl']:12s} {row['policy']:9s} {row['mode']:10s} {row['tok_s']:8.0f} "
              f"prompt tok/s", file=log, flush=True)
    return rows


# ----------------------------------------------------------------------------- ceiling


def read_bandwidth_gbs(device, mb: int = 1024) -> float:
    """Memory read bandwidth: the best of a few passes summing a tensor far larger than caches."""
    x = torch.ones(mb * 2**20 // 4, device=device)
    best = float("inf")
    for _ in range(5):
        start = now(device)
        x.sum()
        best = min(best, now(device) - start)
    return x.numel() * 4 / best / 1e9


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a batch-1 step of `model` (as loaded: its dtype, quantized or not) reads:
    every projection, scale, norm and the LM head once; the embedding table only where it is
    the LM head (tied, not quantized), as a lookup reads one row of it."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    del tensors["rope.inv_freq"]                            # computed, not weights
    if model.lm_head is not None:
        del tensors["embed.weight"]
    return sum(t.numel() * t.element_size() for t in tensors.values())


def ceiling(directory: str, device, kinds) -> dict:
    """The fastest batch-1 decoding this machine allows: read bandwidth against the bytes of
    weights a step reads, per kind of weights: a dtype (float32, bfloat16), int8 or int4."""
    gbs = read_bandwidth_gbs(device)
    out = {"read_gb_s": gbs}
    for kind in kinds:
        quantize = kind if kind in quantization.KINDS else None
        model = load(directory, dtype=torch.float32 if quantize else getattr(torch, kind),
                     device=device, quantize=quantize)
        nbytes = weight_bytes_per_token(model)
        out[kind] = {"weight_mb_per_token": nbytes / 2**20, "max_tok_s": gbs * 1e9 / nbytes}
    return out


if __name__ == "__main__":          # one speed row, in a fresh process (see `speed`)
    print(json.dumps(run_row(json.loads(sys.argv[1]))))

"""The CUDA path, checked and timed: eager and compiled (CUDA graphs) against the CPU.

A SmolLM2-135M-shaped LLaMA (the default model's config; random weights, so that nothing has to
be downloaded: a step's cost depends only on the shapes) is saved once and loaded by msrnn on the
CPU and on the GPU. Then, for float32 and bfloat16:
- equality: the same 64 tokens fed to the CPU step (eager, same dtype) and to the GPU step
  (eager, and compiled with mode="reduce-overhead"), TOVA(64) and Full after a 128-token
  oneshot prompt; the largest logit difference and at how many steps layer 0 keeps the same
  positions;
- speed: batch-1 decode tokens/s on the GPU, eager and compiled, against transformers' own
  `generate` (its DynamicCache); and a batch of 64 rows at position 4,096 with TOVA(512).

    python scripts/cuda_check.py --out results/cuda        # writes cuda.json as it goes
"""

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import torch

import msrnn
from msrnn.experiments.bench import fake_state
from msrnn.policies import TOVA, Full
from msrnn.prompt import prefill

SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
               max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True)


CAPACITY = 128 + 128 + 16      # Full's slots: one shape, so one compiled graph, for every run


def checkpoint(directory: str, layers: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**SMOLLM2, "num_hidden_layers": layers})).save_pretrained(
        directory)
    return directory


@torch.inference_mode()
def trace(step, model, policy, prompt, feed):
    """Logits [N, V] (float32, on the CPU) and layer 0's kept positions after each fed token."""
    state = model.init_state(1, policy, capacity=CAPACITY)
    prefill(model, prompt, state, mode="oneshot", logits=False)
    logits, kept = [], []
    for tok in feed:
        out, state = step(tok.view(1), state)
        logits.append(out.float().cpu().clone())
        kept.append(state.positions(0).cpu().clone())
    return torch.cat(logits), kept


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def tok_s(step, model, policy, prompt, n=128, batch=1, at=None):
    """Decode tokens/s of `step` (greedy), after 8 untimed steps."""
    device = prompt.device
    if at is None:
        state = model.init_state(batch, policy, capacity=CAPACITY)
        prefill(model, prompt.expand(batch, -1), state, mode="oneshot", logits=False)
    else:
        state = fake_state(model, policy, batch, at, capacity=at + n + 16)
    tok = prompt[:, -1].repeat(batch)
    for _ in range(8):
        out, state = step(tok, state)
        tok = out.argmax(-1)
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        out, state = step(tok, state)
        tok = out.argmax(-1)
    sync(device)
    return batch * n / (time.perf_counter() - start)


@torch.inference_mode()
def transformers_tok_s(directory, prompt, dtype, n=128):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(prompt.device).eval()

    def run(k):
        sync(prompt.device)
        start = time.perf_counter()
        hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=k,
                    min_new_tokens=k, do_sample=False, pad_token_id=0)
        sync(prompt.device)
        return time.perf_counter() - start

    run(8)
    return n / (run(n + 1) - run(1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/cuda")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    ap.add_argument("--layers", type=int, default=30, help="fewer: a quicker smoke test")
    ap.add_argument("--policies", default="tova64,full")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    cuda = torch.device(args.device)
    report = {"torch": torch.__version__, "rows": [], "gpu": torch.cuda.get_device_name(0)
              if cuda.type == "cuda" else None}

    def save(row):
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "cuda.json.part"), "w") as f:
            json.dump(report, f, indent=1)
        os.replace(os.path.join(args.out, "cuda.json.part"), os.path.join(args.out, "cuda.json"))

    directory = checkpoint(tempfile.mkdtemp(), args.layers)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(100, 20000, (1, 128), generator=g)
    feed = torch.randint(100, 20000, (64,), generator=g)
    configs = [(n, p) for n, p in (("tova64", TOVA(64)), ("full", Full()))
               if n in args.policies.split(",")]
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        torch._dynamo.reset()             # each dtype's graphs from scratch (recompile limit)
        cpu = msrnn.load(directory, dtype=dtype)
        reference = {name: trace(cpu.step, cpu, policy, prompt, feed) for name, policy in configs}
        model = msrnn.load(directory, dtype=dtype, device=cuda)
        compiled = msrnn.load(directory, dtype=dtype, device=cuda).compile_step()
        for name, policy in configs:
            for how, backend in (("eager", model), ("compiled", compiled)):
                row = {"dtype": dtype_name, "policy": name, "step": how}
                try:
                    start = time.perf_counter()
                    logits, kept = trace(backend.step, backend, policy, prompt.to(cuda),
                                         feed.to(cuda))
                    row["first_trace_s"] = round(time.perf_counter() - start, 1)
                    ref_logits, ref_kept = reference[name]
                    row["max_abs_logit_diff_vs_cpu"] = (logits - ref_logits).abs().max().item()
                    row["kept_equal_steps"] = sum(torch.equal(a, b) for a, b in
                                                  zip(kept, ref_kept))
                    row["steps"] = len(feed)
                    row["tok_s"] = round(tok_s(backend.step, backend, policy, prompt.to(cuda)), 1)
                except Exception as e:                     # record it, go on with the rest
                    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                    traceback.print_exc()
                save(row)
        try:
            save({"dtype": dtype_name, "policy": "full", "step": "transformers generate",
                  "tok_s": round(transformers_tok_s(directory, prompt.to(cuda), dtype), 1)})
        except Exception as e:
            save({"dtype": dtype_name, "step": "transformers generate",
                  "error": f"{type(e).__name__}: {str(e)[:400]}"})
        if dtype_name == "bfloat16":
            for how, backend in (("eager", model), ("compiled", compiled)):
                row = {"dtype": dtype_name, "policy": "tova512", "step": how, "batch": 64,
                       "position": 4096}
                try:
                    row["tok_s"] = round(tok_s(backend.step, backend, TOVA(512), prompt.to(cuda),
                                               n=64, batch=64, at=4096), 1)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                save(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a compiled batch-1 decode step spends its time, by kind of weights.

The compiled step is one graph; torch's profiler, with inductor's kernel profiling on, sees each
of its generated C++ kernels, its library calls (the attention's batched products) and what runs
in Python around them. This sorts a step's time into:

    kernels      inductor's fused loops: every projection's product (which reads the weights),
                 the norms, RoPE and the policy's scoring and eviction
    attention    the library's batched products (scores and weighted values), `aten::bmm`
    guards       dynamo checking that the compiled graph still applies (`TorchDynamo Cache Lookup`)
    wrapper      the Python that calls the kernels in turn (`Call CompiledFxGraph`, its own time)
    other        the rest: the step's Python bookkeeping (MultiState.reserve, advance)

and reports the weights' bytes over the kernels' time: the rate at which the loops stream them.

    python scripts/step_profile.py weights/SmolLM2-135M-Instruct [--kinds float32,bfloat16,int8]
"""

import argparse
import os
import sys
import time

import torch
import torch._inductor.config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import msrnn                                                   # noqa: E402
from msrnn.experiments.bench import prompt_ids, weight_bytes_per_token     # noqa: E402
from msrnn.policies import TOVA                                # noqa: E402
from msrnn.prompt import prefill                               # noqa: E402

KINDS = {"kernels": "graph_", "attention": "aten::bmm",
         "guards": "TorchDynamo Cache Lookup", "wrapper": "## Call CompiledFxGraph"}


@torch.inference_mode()
def profile(model, steps: int):
    """(ms per step without the profiler, {kind: ms per step} with it)."""
    compiled = model.compile_step()
    state = compiled.init_state(1, TOVA(64))
    logits, state = prefill(compiled, prompt_ids(128, model.cfg.vocab_size, "cpu"), state)
    tok = logits[:, -1].argmax(-1)
    for _ in range(8):                                           # compile, warm up
        compiled.step(tok, state)
    start = time.perf_counter()
    for _ in range(steps):
        compiled.step(tok, state)
    wall = (time.perf_counter() - start) / steps * 1e3
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            compiled.step(tok, state)
    parts = dict.fromkeys(list(KINDS) + ["other"], 0.0)
    total = 0.0
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3 / steps
        total += ms
        kind = next((k for k, prefix in KINDS.items() if event.key.startswith(prefix) and
                     (k != "kernels" or "_cpp_fused" in event.key)), "other")
        parts[kind] += ms
    return wall, parts, total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--kinds", default="float32,bfloat16,int8")
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args(argv)
    torch._inductor.config.cpp.enable_kernel_profile = True
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; TOVA(64), batch 1, "
          f"ms per step")
    print("| weights | step (no profiler) | kernels | attention | guards | wrapper | other | "
          "weight MB | GB/s in the kernels |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        quantize = "int8" if kind == "int8" else None
        model = msrnn.load(args.model, dtype=torch.float32 if quantize else getattr(torch, kind),
                           quantize=quantize)
        torch._dynamo.reset()
        wall, parts, _ = profile(model, args.steps)
        nbytes = weight_bytes_per_token(model)
        print(f"| {kind} | {wall:.1f} | " + " | ".join(f"{parts[k]:.2f}" for k in parts) +
              f" | {nbytes / 2**20:.0f} | {nbytes / parts['kernels'] / 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()

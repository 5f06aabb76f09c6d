"""The decode step compiled against eager, at several batch sizes (docs/performance.md).

Each batch size runs in this process with a fresh model per variant: a TOVA(512) multi-state as
it would be at position 2,048 (random keys and values: a step's cost depends only on shapes),
8 timed steps after 2 warm-up steps, the median reported.

    python scripts/compiled_vs_eager.py --batches 1,8,64,128 --dtype float32
"""

import argparse
import time

import torch

import msrnn
from msrnn.experiments.bench import fake_state
from msrnn.policies import TOVA


def step_ms(model, batch: int, size: int, steps: int = 8) -> float:
    state = fake_state(model, TOVA(size), batch, 2048)
    tok = torch.zeros(batch, dtype=torch.long)
    times = []
    with torch.inference_mode():
        for _ in range(steps + 2):
            start = time.perf_counter()
            model.step(tok, state)
            times.append(time.perf_counter() - start)
    times = sorted(times[2:])
    return times[len(times) // 2] * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="weights/SmolLM2-135M-Instruct")
    ap.add_argument("--batches", default="1,8,64,128")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(f"| batch | eager ms/step | compiled ms/step | compiled / eager |  ({args.dtype}, "
          f"TOVA({args.size}), {torch.get_num_threads()} threads)")
    print("|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        eager = step_ms(msrnn.load(args.model, dtype=dtype), batch, args.size)
        torch._dynamo.reset()
        compiled = msrnn.load(args.model, dtype=dtype).compile_step()
        step_ms(compiled, batch, args.size, steps=1)                  # compiles here
        fast = step_ms(compiled, batch, args.size)
        print(f"| {batch} | {eager:.1f} | {fast:.1f} | {fast / eager:.2f} |", flush=True)


if __name__ == "__main__":
    main()

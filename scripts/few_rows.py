"""Several rows in the compiled CPU step: the library's matrix multiply, or a sum of products
with the rows innermost? A measurement, not a feature.

`model.linear` writes one row's product as a sum that inductor turns into its own loop. For a
few rows the same sum can put the rows inside the loop over W's rows, (W[:, None, :] * x).sum(-1),
so that a row of W, read once, serves every row of x; msrnn did that for 2-6 rows until this
script measured the whole step. It loads the model twice in one process: the package (the
library's multiply for two rows or more) and a twin whose `linear` takes that loop, compiles
both steps of TOVA(256) after a 300-token prompt for each batch size, and alternates their
rounds, so that the machine's drift hits both.

    OMP_NUM_THREADS=2 python scripts/few_rows.py weights/SmolLM2-135M-Instruct --rows 2,4

Results: docs/performance.md, section 1.
"""

import argparse
import time

import torch

import msrnn
import msrnn.model as model_py
from msrnn.experiments.bench import prompt_ids
from msrnn.policies import TOVA
from msrnn.prompt import prefill

package_linear = model_py.linear


def rows_innermost(x, w, b=None):
    """model.linear with the rows inside the loop over W's rows, for 2 rows or more."""
    rows = x[..., 0].numel()
    if not torch.compiler.is_compiling() or rows == 1:
        return package_linear(x, w, b)
    x = torch.as_strided(x, x.shape, x.stride())         # x once, into memory (model.linear)
    wide = torch.promote_types(x.dtype, torch.float32)
    x2 = x.reshape(rows, x.shape[-1]).to(wide)                            # [rows, in]
    y = (w.to(wide)[:, None, :] * x2).sum(-1).T.reshape(*x.shape[:-1], -1)  # [..., out]
    y = y.to(x.dtype)
    return y if b is None else y + b


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--rows", default="2,4", help="batch sizes, comma-separated")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    runs = {}
    for way in ("library", "rows innermost"):
        # linear is read when dynamo traces the step: each twin compiles with its own
        model_py.linear = package_linear if way == "library" else rows_innermost
        compiled = msrnn.load(args.model, dtype=dtype).compile_step()
        for rows in [int(r) for r in args.rows.split(",")]:
            state = compiled.init_state(rows, TOVA(256))
            ids = prompt_ids(300, compiled.vocab_size, "cpu").expand(rows, -1).contiguous()
            logits, state = prefill(compiled, ids, state)
            token = logits[:, -1].argmax(-1)
            first = compiled.step(token, state)[0]
            runs[way, rows] = compiled, state, token, first
    for (way, rows), (*_, first) in runs.items():
        if way == "library":
            other = runs["rows innermost", rows][3]
            print(f"{rows} rows: max |dlogit| between the two ways "
                  f"{(first.float() - other.float()).abs().max().item():.2e}")
    times = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, (compiled, state, token, _) in runs.items():
            # dynamo guards on the global it read: each twin's graph runs under its own linear
            model_py.linear = package_linear if key[0] == "library" else rows_innermost
            start = time.perf_counter()
            for _ in range(args.steps):
                compiled.step(token, state)
            times[key].append((time.perf_counter() - start) / args.steps * 1e3)
    model_py.linear = package_linear
    print(f"| dtype | threads | rows | way | ms a step ({args.rounds} rounds of {args.steps}) |")
    print("|---|---|---|---|---|")
    for (way, rows), ms in times.items():
        print(f"| {args.dtype} | {torch.get_num_threads()} | {rows} | {way} | "
              f"{min(ms):.1f}-{max(ms):.1f} |")


if __name__ == "__main__":
    main()

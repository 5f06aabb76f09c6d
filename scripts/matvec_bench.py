"""Why `model.linear` writes a one-row product as a sum when compiled: a micro-benchmark.

A batch-1 decode step multiplies one row by every weight matrix. With SmolLM2-135M's 30 layers of
matrices (float32: 425 MB, far more than the caches), each product streams its matrix from
memory once, so the time per pass is bandwidth-bound. This times one pass over all 30 layers'
q/k/v, output, gate/up and down matrices, for M rows, four ways:

    library [out, in]    F.linear(x, W), eager (Hugging Face's layout, what transformers runs)
    library [in, out]    x @ W with W stored transposed, eager
    compiled F.linear    torch.compile of the F.linear loop (inductor keeps the library call)
    compiled sum         torch.compile of (x[:, None, :] * W).sum(-1), which inductor turns
                         into its own vectorized loop: what msrnn compiles for one row

    python scripts/matvec_bench.py [--rows 1,2,4,8] [--dtypes float32,bfloat16]
"""

import argparse
import time

import torch
import torch.nn.functional as F

# SmolLM2-135M: width 576, 9 query + 2 * 3 KV heads of 64, MLP 1536 (gate and up stacked).
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]     # (in, out) of each matrix
LAYERS = 30


def seconds(f, repeat=10):
    for _ in range(2):
        f()
    start = time.perf_counter()
    for _ in range(repeat):
        f()
    return (time.perf_counter() - start) / repeat


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per pass over "
          f"{LAYERS} layers (GB/s of weights read)")
    print("| dtype | rows | library [out, in] | library [in, out] | compiled F.linear | "
          "compiled sum |")
    print("|---|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        out_in = [[torch.randn(o, i, dtype=dtype) for i, o in SHAPES] for _ in range(LAYERS)]
        in_out = [[w.t().contiguous() for w in layer] for layer in out_in]
        nbytes = sum(w.numel() * w.element_size() for layer in out_in for w in layer)
        for rows in [int(r) for r in args.rows.split(",")]:
            xs = {i: torch.randn(rows, i, dtype=dtype) for i, _ in SHAPES}

            def library():
                return [F.linear(xs[i], w) for layer in out_in for (i, _), w in zip(SHAPES, layer)]

            def transposed():
                return [xs[i] @ w for layer in in_out for (i, _), w in zip(SHAPES, layer)]

            def summed():
                return [(xs[i][:, None, :].float() * w.float()).sum(-1).to(dtype)
                        for layer in out_in for (i, _), w in zip(SHAPES, layer)]

            cells = [seconds(f) for f in (library, transposed, torch.compile(library),
                                          torch.compile(summed))]
            print(f"| {name} | {rows} | " + " | ".join(
                f"{s * 1e3:.1f} ({nbytes / s / 1e9:.0f})" for s in cells) + " |", flush=True)


if __name__ == "__main__":
    main()

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
    rows innermost       torch.compile of (W[:, None, :] * x).sum(-1).T: the same sum with the
                         rows inside the loop over W's rows, so that a row of W, read once,
                         serves every row of x (msrnn compiled it for 2-6 rows until the
                         whole step measured it slower than the library, docs/performance.md)

int8 (msrnn.quantize: int8 W, a float32 scale per row, float32 x): the library column widens W
to float32 for F.linear (eager, a copy per call), "compiled F.linear" is the same compiled, and
"compiled sum" is the loop msrnn compiles, reading 1 byte per weight; W is stored [out, in] only.

int4 (msrnn.quantize.GroupLinear: Q4_1 groups of 32, 4-bit codes two a byte, a float16 scale and
minimum per group, float32 x): the library column dequantizes W to float32 for F.linear (eager,
what msrnn runs for several rows), "compiled sum" is GroupLinear's loop over the code bytes.
int4pack (bfloat16 x): PyTorch's own 4-bit weight-only CPU kernel,
torch._weight_int4pack_mm_for_cpu, on the same matrices in its packed layout (library column).

    python scripts/matvec_bench.py [--rows 1,2,4,8] [--dtypes float32,bfloat16,int8,int4,int4pack]
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
    ap.add_argument("--dtypes", default="float32,bfloat16,int8")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per pass over "
          f"{LAYERS} layers (GB/s of weights read)")
    print("| dtype | rows | library [out, in] | library [in, out] | compiled F.linear | "
          "compiled sum | rows innermost |")
    print("|---|---|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        if name in ("int8", "int4", "int4pack"):
            {"int8": int8_rows, "int4": int4_rows, "int4pack": int4pack_rows}[name](
                name, [int(r) for r in args.rows.split(",")])
            continue
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

            def inner():
                return [(w.float()[:, None, :] * xs[i].float()).sum(-1).T.to(dtype)
                        for layer in out_in for (i, _), w in zip(SHAPES, layer)]

            cells = [seconds(f) for f in (library, transposed, torch.compile(library),
                                          torch.compile(summed), torch.compile(inner))]
            print(f"| {name} | {rows} | " + " | ".join(
                f"{s * 1e3:.1f} ({nbytes / s / 1e9:.0f})" for s in cells) + " |", flush=True)


def int8_rows(name, all_rows):
    """The int8 rows of the table: int8 W [out, in] with a scale per row, float32 x."""
    ws = [[(torch.randint(-127, 128, (o, i), dtype=torch.int8), torch.rand(o))
           for i, o in SHAPES] for _ in range(LAYERS)]
    nbytes = sum(w.numel() + 4 * s.numel() for layer in ws for w, s in layer)
    for rows in all_rows:
        xs = {i: torch.randn(rows, i) for i, _ in SHAPES}

        def library():
            return [F.linear(xs[i], w.float()) * s for layer in ws
                    for (i, _), (w, s) in zip(SHAPES, layer)]

        def summed():
            return [(xs[i][:, None, :] * w.float()).sum(-1) * s for layer in ws
                    for (i, _), (w, s) in zip(SHAPES, layer)]

        cells = [seconds(f) for f in (library, torch.compile(library), torch.compile(summed))]
        a, b, c = (f"{t * 1e3:.1f} ({nbytes / t / 1e9:.0f})" for t in cells)
        print(f"| {name} | {rows} | {a} | - | {b} | {c} | - |", flush=True)


def int4_rows(name, all_rows):
    """The int4 rows: msrnn's GroupLinear (Q4_1), eager (dequantize, F.linear) and its loop."""
    from msrnn.quantize import GroupLinear

    ws = [[GroupLinear(torch.randn(o, i) * 0.02) for i, o in SHAPES] for _ in range(LAYERS)]
    nbytes = sum(t.numel() * t.element_size() for layer in ws for w in layer
                 for t in w.buffers())
    for rows in all_rows:
        xs = {i: torch.randn(rows, i) for i, _ in SHAPES}

        def library():
            return [w(xs[i]) for layer in ws for (i, _), w in zip(SHAPES, layer)]

        def summed():
            return [w.loop(xs[i]) for layer in ws for (i, _), w in zip(SHAPES, layer)]

        cells = [seconds(f) for f in (library, torch.compile(summed))]
        a, c = (f"{t * 1e3:.1f} ({nbytes / t / 1e9:.1f})" for t in cells)
        print(f"| {name} | {rows} | {a} | - | - | {c} | - |", flush=True)


def int4pack_rows(name, all_rows):
    """PyTorch's int4 weight-only kernel, bfloat16 x: w = (q - 8) s + z per group of 32."""
    ws = []
    for _ in range(LAYERS):
        layer = []
        for i, o in SHAPES:
            q = torch.randint(0, 16, (o, i), dtype=torch.int32)
            s = torch.rand(i // 32, o, 1) * 1e-3
            layer.append((torch._convert_weight_to_int4pack_for_cpu(q, 1),
                          torch.cat([s, s * 8], -1).to(torch.bfloat16)))   # [G, out, 2]
        ws.append(layer)
    nbytes = sum(w.numel() + 2 * sz.numel() for layer in ws for w, sz in layer)
    for rows in all_rows:
        xs = {i: torch.randn(rows, i, dtype=torch.bfloat16) for i, _ in SHAPES}

        def library():
            return [torch._weight_int4pack_mm_for_cpu(xs[i], w, 32, sz) for layer in ws
                    for (i, _), (w, sz) in zip(SHAPES, layer)]

        t = seconds(library)
        print(f"| {name} | {rows} | {t * 1e3:.1f} ({nbytes / t / 1e9:.1f}) | - | - | - | - |",
              flush=True)


if __name__ == "__main__":
    main()

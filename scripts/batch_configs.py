"""How much wall time do configurations save as the rows of one batch? (`--batch-configs`;
a benchmark, not a test.)

    python scripts/batch_configs.py                          # the default model, both books
    python scripts/batch_configs.py --context 1024 --chunks 1 --out results/batch-configs

Runs the same `msrnn ppl` grids, 8 configurations (TOVA, H2O, Window, Window+4 at 128 and 256)
and 16 (the same at 64, 128, 256 and 512), one at a time (`--batch-configs 1`) and together
(`--batch-configs 8` / `16`), in one process each, interleaved, in one run, each into a fresh
results directory; and checks that both give the same perplexities (1e-4 relative). A decode
step with a few rows is bound by reading the weights (docs/performance.md): eight rows cost
little more than one, so the grid should take a fraction of the time together.

Prints the table and writes batch-configs.json and batch-configs.png into --out.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GRIDS = {8: "128,256", 16: "64,128,256,512"}
POLICIES = "tova,h2o,window,sinks"


def run(model, texts, context, chunks, sizes, n, out, extra):
    """Wall seconds of one `msrnn ppl` grid with --batch-configs n, and its rows. Each run
    compiles into an empty inductor cache of its own, so that neither way finds graphs the
    other compiled."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=out + "-inductor")
    argv = [sys.executable, "-m", "msrnn", "ppl", model, "--text", *texts, "--context",
            str(context), "--max-chunks", str(chunks), "--batch", str(chunks), "--policies",
            POLICIES, "--sizes", sizes, "--batch-configs", str(n), "--out", out, *extra]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(out, "results.json")) as f:     # every field, compile_seconds too
        return seconds, json.load(f)["results"]


def main():
    from msrnn.data import BOOKS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=str(ROOT / "weights" / "SmolLM2-135M-Instruct"))
    p.add_argument("--text", nargs="+", default=list(BOOKS))
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--chunks", type=int, default=1, help="chunks per text (and per batch)")
    p.add_argument("--grids", default="8,16", help="which grids: 8, 16 or both")
    p.add_argument("--compile", action="store_true", help="the compiled step (compilation "
                   "counts in the wall time; msrnn ppl reports it apart)")
    p.add_argument("--out", default="results/batch-configs")
    args = p.parse_args()
    extra = ["--compile"] if args.compile else []
    os.makedirs(args.out, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for grid in [int(g) for g in args.grids.split(",")]:
            result = {"configs": grid, "context": args.context,
                      "chunks": args.chunks * len(args.text)}
            for n in (1, grid):                # one at a time, then together
                seconds, ppl = run(args.model, args.text, args.context, args.chunks,
                                   GRIDS[grid], n, os.path.join(tmp, f"{grid}-{n}"), extra)
                way = "one" if n == 1 else "together"
                result[way] = round(seconds, 1)
                # each row's `seconds` and `compile_seconds` are its share of its batch's
                result[f"{way}_compile"] = round(sum(r["compile_seconds"] for r in ppl), 1)
                result[f"{way}_decode"] = round(sum(r["seconds"] for r in ppl), 1)
                result.setdefault("ppl", []).append(
                    {(r["policy"], r["size"], r["positions"]): r["ppl"] for r in ppl})
                print(f"{grid} configurations, --batch-configs {n}: {seconds:.1f} s (compiling "
                      f"{result[way + '_compile']:.1f} s, decoding {result[way + '_decode']:.1f}"
                      " s)", flush=True)
            a, b = result.pop("ppl")
            assert a.keys() == b.keys(), (a.keys(), b.keys())
            result["max_relative_ppl_difference"] = max(abs(a[c] - b[c]) / a[c] for c in a)
            assert result["max_relative_ppl_difference"] <= 1e-4, result
            result["speedup"] = round(result["one"] / result["together"], 2)
            result["decode_speedup"] = round(result["one_decode"] / result["together_decode"], 2)
            rows.append(result)
    print(f"{'configs':>8} {'one at a time':>14} {'together':>9} {'speedup':>8}"
          f" {'decoding: one':>14} {'together':>9} {'speedup':>8}")
    for r in rows:
        print(f"{r['configs']:8d} {r['one']:13.1f}s {r['together']:8.1f}s {r['speedup']:7.2f}x"
              f" {r['one_decode']:13.1f}s {r['together_decode']:8.1f}s"
              f" {r['decode_speedup']:7.2f}x")
    from msrnn.experiments.output import figure, save_figure, write_atomic
    write_atomic(os.path.join(args.out, "batch-configs.json"), json.dumps(rows, indent=1))
    fig, ax = figure(figsize=(5, 3.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["one"] for r in rows], 0.4, label="one at a time")
    ax.bar([i + 0.2 for i in x], [r["together"] for r in rows], 0.4, label="together")
    ax.set_xticks(list(x), [f"{r['configs']} configs ({r['speedup']}x)" for r in rows])
    ax.set_ylabel("wall seconds")
    ax.set_title(f"msrnn ppl, context {args.context}, {rows[0]['chunks']} chunks", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, os.path.join(args.out, "batch-configs.png"))


if __name__ == "__main__":
    main()

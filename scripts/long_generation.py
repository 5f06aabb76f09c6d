"""Decode far past the model's range in constant memory: the RNN view's promise, measured.

    python scripts/long_generation.py weights/SmolLM2-135M-Instruct --policy tova --size 64 \
        --positions cache --new-tokens 20000 --out results/long-generation

Generates --new-tokens tokens (sampled, so that the text does not settle into a loop that ends
it) with the compiled step through msrnn.generate.stream, and every --every tokens records the
process's resident memory (VmRSS), the multi-state's bytes and the decode speed since the last
record. Writes long-generation.json and long-generation.png (memory and speed against tokens,
the model's range marked) to --out, and prints the table. The generated text goes to
--out/text.txt.
"""

import argparse
import json
import os
import sys
import time

import torch

import msrnn
from msrnn.experiments.output import figure, save_figure, write_atomic
from msrnn.generate import stream


def resident_mib() -> float:
    """This process's resident memory (VmRSS of /proc/self/status), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--prompt", default="Write a very long story about a lighthouse keeper.")
    ap.add_argument("--policy", default="tova")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--sinks", type=int)
    ap.add_argument("--positions", choices=msrnn.positions.NAMES, default="cache")
    ap.add_argument("--new-tokens", type=int, default=20000)
    ap.add_argument("--every", type=int, default=1000, help="record every this many tokens")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    model = msrnn.load(args.model).compile_step()
    tok = msrnn.load_tokenizer(args.model)
    policy = msrnn.policies.from_name(args.policy, args.size, args.sinks)
    prompt = torch.tensor([tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": args.prompt}]))])
    rows, ids = [], []
    start = last = time.perf_counter()
    compiling = 0.0                     # a rate leaves out the steps that compiled a graph
    with torch.inference_mode():
        for i, (new, state) in enumerate(stream(model, prompt, policy, args.new_tokens,
                                                temperature=args.temperature, seed=args.seed,
                                                eos_ids=set(),
                                                positions=args.positions)):
            ids.append(int(new[0]))
            if (i + 1) % args.every == 0:
                now = time.perf_counter()
                compiled, compiling = model.compile_seconds - compiling, model.compile_seconds
                rows.append({"tokens": i + 1, "position": state.length,
                             "resident_mib": round(resident_mib(), 1),
                             "multistate_mib": round(state.nbytes() / 2**20, 3),
                             "tokens_per_s": round(args.every / (now - last - compiled), 1)})
                last = now
                print(" ".join(f"{k} {v}" for k, v in rows[-1].items()), file=sys.stderr,
                      flush=True)
    seconds = time.perf_counter() - start
    setup = {"model": os.path.basename(os.path.abspath(args.model)), "policy": str(policy),
             "positions": args.positions, "new_tokens": args.new_tokens,
             "temperature": args.temperature, "seed": args.seed,
             "range": model.cfg.max_positions, "seconds": round(seconds, 1),
             "compile_seconds": round(model.compile_seconds, 1)}
    write_atomic(os.path.join(args.out, "long-generation.json"),
                 json.dumps({"setup": setup, "rows": rows}, indent=1))
    write_atomic(os.path.join(args.out, "text.txt"), tok.decode(ids))
    fig, (a, b) = figure(1, 2, figsize=(10, 3.6))
    x = [r["position"] for r in rows]
    a.plot(x, [r["resident_mib"] for r in rows], marker=".")
    a.set_ylabel("resident memory (MiB)")
    a.set_ylim(0, max(r["resident_mib"] for r in rows) * 1.15)
    b.plot(x, [r["tokens_per_s"] for r in rows], marker=".")
    b.set_ylabel("decode speed (tokens/s)")
    b.set_ylim(0, max(r["tokens_per_s"] for r in rows) * 1.15)
    for ax in (a, b):
        ax.axvline(model.cfg.max_positions, color="gray", linestyle=":",
                   label=f"model's range ({model.cfg.max_positions})")
        ax.set_xlabel("position (tokens seen)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{setup['model']}: {policy}, positions {args.positions}, compiled step",
                 fontsize=9)
    save_figure(fig, os.path.join(args.out, "long-generation.png"))
    print(f"{args.new_tokens} tokens in {seconds:.0f} s; resident memory "
          f"{rows[0]['resident_mib']} MiB at {rows[0]['tokens']} tokens, "
          f"{rows[-1]['resident_mib']} MiB at {rows[-1]['tokens']}")


if __name__ == "__main__":
    main()

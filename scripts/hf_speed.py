"""Greedy generate speed inside transformers: its own DynamicCache against msrnn.hf's
MultiStateCache (Full and TOVA(64)), on the default model.

    python scripts/hf_speed.py [--model weights/SmolLM2-135M-Instruct] [--prompt 128] [--new 128]

Prints a markdown table (docs/transformers.md quotes it): new tokens per second, the prompt
included in the time, best of --repeats runs.
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import msrnn
import msrnn.data
import msrnn.hf
from msrnn.policies import TOVA, Full

REPO = Path(__file__).resolve().parent.parent


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "weights" / "SmolLM2-135M-Instruct"))
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new", type=int, default=128, help="new tokens")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = msrnn.load_tokenizer(args.model)
    text = Path(msrnn.data.BOOKS[0]).read_text()[:20000]          # news-from-nowhere.txt
    ids = torch.tensor([tok.encode(text)[:args.prompt]])
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
              attention_mask=torch.ones_like(ids), pad_token_id=0)
    plain = msrnn.hf.load(args.model, dtype=torch.float32)       # transformers' own attention
    ours = msrnn.hf.load(args.model, dtype=torch.float32)        # prepared by MultiStateCache
    runs = [("DynamicCache (transformers)", plain, lambda: DynamicCache(config=plain.config)),
            ("MultiStateCache(Full())", ours, lambda: msrnn.hf.MultiStateCache(ours, Full())),
            ("MultiStateCache(TOVA(64))", ours, lambda: msrnn.hf.MultiStateCache(ours, TOVA(64)))]
    print(f"batch 1, {ids.shape[1]}-token prompt, {args.new} new tokens, float32, "
          f"{torch.get_num_threads()} threads\n")
    print("| cache | tokens/s | ms/token |\n|---|---|---|")
    with torch.inference_mode():
        for name, model, make in runs:
            model.generate(ids[:, :16], cache=make(), max_new_tokens=4, do_sample=False,
                           pad_token_id=0)                                  # warm up
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = model.generate(ids, cache=make(), **kw)
                best = min(best, time.perf_counter() - start)
            assert out.shape[1] == ids.shape[1] + args.new
            print(f"| {name} | {args.new / best:.1f} | {1000 * best / args.new:.1f} |")


if __name__ == "__main__":
    main()

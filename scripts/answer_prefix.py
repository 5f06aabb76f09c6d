"""Does RULER's answer prefix decide what a oneshot TOVA keeps? (docs/results.md, "The needle and
RULER's niah_single".)

A oneshot prompt is ranked by the attention row of its last token. RULER's niah_single prompt
ends with an answer prefix after the chat template's assistant header ("The special magic number
for KEY mentioned in the provided text is"), so that token is a query about the key; without the
prefix it is the header's own last token, as in `msrnn needle`'s prompt. This asks the same
niah_single prompts (msrnn.experiments.tasks.build: same seed, keys, numbers and depths) with
and without the prefix, Full and TOVA(k), and prints RULER's score for each, per depth and in
the mean.

    python scripts/answer_prefix.py weights/SmolLM2-135M-Instruct --length 1024 --size 256
"""

import argparse
import dataclasses
import json
import sys

import torch

import msrnn
from msrnn.experiments import needle, tasks
from msrnn.data import BOOKS
from msrnn.experiments.text import haystacks as cut, read_text
from msrnn.policies import TOVA, Full


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="weights/SmolLM2-135M-Instruct")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--depths", default="0,0.5,1")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    model, tok = msrnn.load(args.model), msrnn.load_tokenizer(args.model)
    texts = [read_text(path) for path in BOOKS]
    words, haystacks = tasks.vocabulary(texts), cut(tok, texts)
    with_prefix = tasks.niah

    def without_prefix(*a, **kw):
        return dataclasses.replace(with_prefix(*a, **kw), prefix="")

    policies = {"Full": Full(), f"TOVA({args.size})": TOVA(args.size)}
    depths = [float(d) for d in args.depths.split(",")]
    rows = []
    for prefix, niah in (("with prefix", with_prefix), ("without prefix", without_prefix)):
        tasks.niah = niah
        try:
            for depth in depths:
                ids, expected = tasks.build(tok, "niah_single", haystacks, words, args.length,
                                            depth, args.samples, args.seed)
                last = repr(tok.decode(ids[0, -1:].tolist()))
                outs = needle.answer(model, ids, list(policies.values()), max_new_tokens=24,
                                     eos_ids=tok.eos_ids or None)
                for name, (new, _) in zip(policies, outs):
                    score, answers = tasks.scores(tok, new, expected)
                    rows.append({"prompt": prefix, "policy": name, "depth": depth,
                                 "score": round(score, 1), "last_token": last,
                                 "answers": answers})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        finally:
            tasks.niah = with_prefix
    print(f"niah_single, {args.length} tokens, {args.samples} samples a depth, oneshot prompts")
    print("| prompt | policy | " + " | ".join(f"depth {d:g}" for d in depths) + " | mean |")
    print("|---|---|" + "---|" * (len(depths) + 1))
    for prefix in ("with prefix", "without prefix"):
        for name in policies:
            s = [r["score"] for r in rows if r["prompt"] == prefix and r["policy"] == name]
            print(f"| {prefix} | {name} | " + " | ".join(f"{x:.0f}" for x in s)
                  + f" | {sum(s) / len(s):.0f} |")


if __name__ == "__main__":
    with torch.inference_mode():
        sys.exit(main())

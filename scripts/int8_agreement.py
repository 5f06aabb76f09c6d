"""How closely the int8 model (msrnn.quantize) follows the float one in generation.

From the same prompts (`msrnn drift`'s: book openings and chat requests for a long story), both
models generate N tokens greedily (EOS ignored, so every row has N), with Full and with a bounded
policy, and this reports per policy:

    first_divergence   the mean step at which int8's tokens first differ from float's
    same_tokens        the fraction of the N positions where the two generations agree
    top1_forced        Full only: teacher-forced agreement, on float's own text, the fraction
                       of positions where int8's greedy choice is float's (free of the
                       compounding that follows a first difference)
    full_ppl           the float Full model's perplexity of each model's text

    python scripts/int8_agreement.py weights/SmolLM2-135M-Instruct --new-tokens 512
"""

import argparse
import json
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import msrnn                                                   # noqa: E402
from msrnn.experiments import drift
from msrnn import policies                              # noqa: E402
from msrnn.data import BOOKS                                   # noqa: E402
from msrnn.experiments.text import read_text                                 # noqa: E402
from msrnn.experiments.text import haystacks                               # noqa: E402
from msrnn.policies import Full                                # noqa: E402
from msrnn.prompt import prefill                               # noqa: E402


@torch.inference_mode()
def forced_top1(model, prompt, text) -> list[bool]:
    """For each token of `text` (after `prompt`): is it `model`'s greedy choice there?"""
    ids = torch.tensor([list(prompt) + list(text)])
    state = model.init_state(1, Full(), capacity=ids.shape[1])
    hidden, _ = prefill(model, ids, state, logits=False)
    choice = model.logits(hidden[0, len(prompt) - 1:-1]).argmax(-1)
    return (choice == ids[0, len(prompt):]).tolist()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--policies", default="full,tova:64", help="name or name:size, comma-separated")
    ap.add_argument("--samples", type=int, default=4, help="prompts of each kind")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="book openings' length")
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="a JSON file for the report")
    args = ap.parse_args(argv)

    float_model = msrnn.load(args.model)
    int8_model = msrnn.load(args.model, quantize="int8")
    tok = msrnn.load_tokenizer(args.model)
    books = haystacks(tok, [read_text(path) for path in BOOKS])
    prompts = (drift.openings(tok, books, args.samples, args.prompt_tokens, args.seed) +
               drift.stories(tok, args.samples, args.seed))
    report = []
    for spec in tqdm(args.policies.split(","), desc="policies"):
        name, _, size = spec.partition(":")
        policy = policies.from_name(name, int(size) if size else None)
        a = drift.run(float_model, prompts, policy, args.new_tokens, eos_ids=set())
        b = drift.run(int8_model, prompts, policy, args.new_tokens, eos_ids=set())
        forced = [x for p, t in zip(prompts, a) for x in forced_top1(int8_model, p, t)] \
            if policy == Full() else None
        same = [x == y for s, t in zip(a, b) for x, y in zip(s, t)]
        report.append({
            "policy": str(policy), "prompts": len(prompts), "new_tokens": args.new_tokens,
            "first_divergence": sum(drift.first_divergence(s, t) for s, t in zip(b, a)) / len(a),
            "same_tokens": sum(same) / len(same), "top1_forced": forced and sum(forced) / len(forced),
            "full_ppl_float": drift.measure(float_model, prompts, a, a)["full_ppl"],
            "full_ppl_int8": drift.measure(float_model, prompts, b, a)["full_ppl"]})
    print("| policy | first divergence (mean step) | same tokens | teacher-forced top-1 | "
          "Full's ppl of float's text | of int8's text |")
    print("|---|---|---|---|---|---|")
    for r in report:
        print(f"| {r['policy']} | {r['first_divergence']:.1f} | {r['same_tokens']:.1%} | "
              f"{'-' if r['top1_forced'] is None else format(r['top1_forced'], '.1%')} | "
              f"{r['full_ppl_float']:.2f} | {r['full_ppl_int8']:.2f} |")
    if args.out:
        from msrnn.experiments.output import write_atomic
        write_atomic(args.out, json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

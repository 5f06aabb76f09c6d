"""Watch a transformer run as a multi-state RNN, one step at a time.

Every token, prompt included, goes through `model.step(x_t, H_{t-1}) -> (y_t, H_t)`. After each
step this prints the token read and the token produced and, for one layer, the multi-state H_t:
the kept tokens in position order with the score the policy gave each (TOVA: this step's
attention, averaged over heads), and the token evicted.

    python scripts/step_by_step.py --prompt "What is the capital of France?" --chat \\
        --policy tova --size 32 --layer 15 --max-new-tokens 12
    python scripts/step_by_step.py --prompt "..." --compact      # one line per step

The chat prompt alone is 37 tokens, more than the 32 states: watch TOVA keep the first token (the
"attention sink") and the question's words while it evicts most of the rest, and the model still
answers.
"""

import argparse
import sys

import torch

import msrnn
from msrnn.policies import Policy


class Watch(Policy):
    """A policy that scores exactly as `inner` does and remembers what it said: the candidates'
    positions and scores for each layer of the last step (layers call it in order)."""

    def __init__(self, inner: Policy):
        self.inner, self.calls = inner, []
        self.size, self.sinks = inner.size, inner.sinks
        self.per_head, self.memory = inner.per_head, inner.memory

    def observe(self, c):
        self.inner.observe(c)

    def score(self, c):
        s = self.inner.score(c)
        self.calls.append((c.pos[0, 0].tolist(), s.expand(c.pos.shape)[0, 0].tolist()))
        return s

    def __repr__(self):
        return repr(self.inner)


def show(tok, ids, p):
    return f"[{p}]{tok.decode([ids[p]])!r}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="weights/SmolLM2-135M-Instruct")
    ap.add_argument("--prompt", default="The first token of a text is like the anchor of a ship:")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    ap.add_argument("--policy", default="tova",
                    help=", ".join(n for n in msrnn.policies.NAMES if n != "full"))
    ap.add_argument("--size", type=int, default=12, help="multi-state size k")
    ap.add_argument("--sinks", type=int)
    ap.add_argument("--layer", type=int, default=None, help="layer to show (default: middle)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--compact", action="store_true", help="one line per step")
    args = ap.parse_args(argv)

    model = msrnn.load(args.model)
    tok = msrnn.load_tokenizer(args.model)
    layer = model.cfg.n_layers // 2 if args.layer is None else args.layer
    if not 0 <= layer < model.cfg.n_layers:
        ap.error(f"--layer must be in 0..{model.cfg.n_layers - 1}")
    try:
        policy = Watch(msrnn.policies.from_name(args.policy, args.size, args.sinks))
    except ValueError as e:
        ap.error(str(e))
    if not policy.bounded:
        ap.error("the full policy evicts nothing; pick a bounded one to watch")
    text = (tok.apply_chat_template([{"role": "user", "content": args.prompt}])
            if args.chat else args.prompt)
    ids = tok.encode(text)
    if not ids:
        ap.error("empty prompt")

    print(f"{model.cfg.n_layers} layers; policy {policy.inner}; showing layer {layer}"
          f"{', KV head 0' if policy.per_head else ''}. [p]'token' = position p.")
    state = model.init_state(1, policy)
    n_prompt = len(ids)
    with torch.inference_mode():
        for t in range(n_prompt + args.max_new_tokens - 1):
            before = set(state.positions(layer)[0, 0].tolist()) | {t}
            policy.calls.clear()
            logits, state = model.step(torch.tensor([ids[t]]), state)
            produced = int(logits[0].argmax())
            in_prompt = t + 1 < n_prompt
            if not in_prompt:                     # past the prompt: the output is the next input
                ids.append(produced)
            kept = state.positions(layer)[0, 0].tolist()
            evicted = sorted(before - set(kept))
            report(tok, ids, t, produced, kept, evicted, policy.calls, layer, args.compact,
                   in_prompt)
            if not in_prompt and produced in tok.eos_ids:
                break
    print(f"\nmulti-state after {state.length} steps: {state.slots} slots per layer, "
          f"{state.nbytes() / 2**20:.2f} MiB for all {model.cfg.n_layers} layers")


def wrap(head, items, width=110):
    """head, then the items two spaces apart, in lines of at most `width` characters (items are
    never split; continuation lines are indented)."""
    lines = [head]
    for item in items:
        if lines[-1] == head:
            lines[-1] += " " + item
        elif len(lines[-1]) + 2 + len(item) > width:
            lines.append("    " + item)
        else:
            lines[-1] += "  " + item
    return "\n".join(lines)


def report(tok, ids, t, produced, kept, evicted, calls, layer, compact, prompt):
    scores = dict(zip(*calls[layer])) if calls else {}
    read = f"{tok.decode([ids[t]])!r}"
    out = f"{tok.decode([produced])!r}" + (" (prompt continues)" if prompt else "")
    gone = ", ".join(f"{show(tok, ids, p)} {scores.get(p, float('nan')):.4f}"
                     for p in evicted) or "nothing (still filling)"
    if compact:
        print(f"t={t:4d} read {read:>14} -> {out:14} | evicted {gone} | kept "
              + " ".join(map(str, kept)))
        return
    print(f"\nstep {t}: read {read}, produced {out}")
    items = [f"{show(tok, ids, p)} {scores[p]:.3f}" if p in scores else show(tok, ids, p)
             for p in kept]
    print(wrap(f"  layer {layer} keeps {len(kept)}:", items))
    print(f"  evicted: {gone}")


if __name__ == "__main__":
    sys.exit(main())

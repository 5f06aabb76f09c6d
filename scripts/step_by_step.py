"""Watch a transformer run as a multi-state RNN, one step at a time.

Every token, prompt included, goes through `model.step(x_t, H_{t-1}) -> (y_t, H_t)`. After each
step this prints the token read and the token produced and, for one layer, the multi-state H_t:
the kept tokens in position order with the score the policy gave each (TOVA: this step's
attention, averaged over heads), and the token evicted.

    python scripts/step_by_step.py --prompt "What is the capital of France?" --chat \\
        --policy tova --size 32 --layer 15 --max-new-tokens 12
    python scripts/step_by_step.py --prompt "..." --compact      # one line per step
    python scripts/step_by_step.py --chat --prompt "What is the capital of France?" --size 32 \\
        --compact --plot kept.png --layers 0,15,29     # and draw what layers 0, 15, 29 keep

Steps and tokens count from 1, as in the paper and `python -m msrnn.trace`: `t=j` is step j,
which reads token x_j, and `[j]` is token j (the code holds it at position j - 1; docs/msrnn.md,
"Notation"). --plot draws in the same count, with a panel of what Window(k) would keep beside the
policy's layers.

The chat prompt alone is 37 tokens, more than the 32 states: watch TOVA keep the first token (the
"attention sink") and the question's words while it evicts most of the rest, and the model still
answers.

--prompt-mode sequential (the default) makes every prompt token a step, the MSRNN definition.
--prompt-mode oneshot runs the prompt as `msrnn.generate` and `msrnn generate` do by default: one
parallel pass with full attention over the prompt, then each layer keeps the k prompt tokens its
policy ranks best from the last prompt token's attention row (docs/msrnn.md, "Prompts"); the two
can keep different tokens for the same prompt.
"""

import argparse
import sys
from dataclasses import dataclass, field

import torch

import msrnn
from msrnn.cli.common import add_policy_module_arg, load_policies
from msrnn.policies import Policy
from msrnn.prompt import prefill


@dataclass(frozen=True, repr=False)
class Watch(Policy):
    """A policy that scores exactly as `inner` does and remembers what it said: the candidates'
    positions and scores for each layer of the last step (layers call it in order)."""

    inner: Policy = None
    calls: list = field(default_factory=list)
    per_head = property(lambda self: self.inner.per_head)
    reads = property(lambda self: self.inner.reads)
    memory = property(lambda self: self.inner.memory)
    prompt_as_step = property(lambda self: self.inner.prompt_as_step)

    @classmethod
    def of(cls, inner: Policy) -> "Watch":
        return cls(inner.size, inner.sinks, inner=inner)

    def budget(self, layer, layers):
        return self.inner.budget(layer, layers)

    def observe(self, c):
        self.inner.observe(c)

    def score(self, c):
        s = self.inner.score(c)
        self.calls.append((c.pos[0, 0].tolist(), s.expand(c.pos.shape)[0, 0].tolist()))
        return s

    def __repr__(self):
        return repr(self.inner)


def show(tok, ids, p):
    """Token j = p + 1, the one at position p, as [j]'text'."""
    return f"[{p + 1}]{tok.decode([ids[p]])!r}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        load_policies(argv)                  # --policy-module files and plugins, before --help
    except ValueError as e:
        print(f"step_by_step.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="weights/SmolLM2-135M-Instruct")
    ap.add_argument("--prompt", default="The first token of a text is like the anchor of a ship:")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    ap.add_argument("--policy", default="tova",
                    help=", ".join(n for n in msrnn.policies.NAMES if n != "full"))
    ap.add_argument("--size", type=int, default=12, help="multi-state size k")
    add_policy_module_arg(ap)
    ap.add_argument("--sinks", type=int)
    ap.add_argument("--layer", type=int, default=None, help="layer to show (default: middle)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--compact", action="store_true", help="one line per step")
    ap.add_argument("--prompt-mode", choices=("sequential", "oneshot"), default="sequential",
                    help="sequential: every prompt token is a step (default); oneshot: the prompt "
                    "in one parallel pass, then the best k kept (what `msrnn generate` does)")
    ap.add_argument("--positions", choices=msrnn.positions.NAMES, default="original",
                    help="how the kept states are numbered for RoPE (cache, compressed: past "
                    "the model's range)")
    ap.add_argument("--past-range", action="store_true", help="run absolute positions past the "
                    "model's range anyway")
    ap.add_argument("--plot", metavar="FILE", help="draw which positions the --layers keep at "
                    "each step (x: step t, y: token j, both from 1) into this PNG file")
    ap.add_argument("--layers", help="layers to draw with --plot, comma-separated (default: "
                    "the first, the shown one and the last)")
    args = ap.parse_args(argv)

    model = msrnn.load(args.model)
    tok = msrnn.load_tokenizer(args.model)
    layer = model.cfg.n_layers // 2 if args.layer is None else args.layer
    if not 0 <= layer < model.cfg.n_layers:
        ap.error(f"--layer must be in 0..{model.cfg.n_layers - 1}")
    try:
        policy = Watch.of(msrnn.policies.from_name(args.policy, args.size, args.sinks))
    except ValueError as e:
        ap.error(str(e))
    if not policy.bounded:
        ap.error("the full policy evicts nothing; pick a bounded one to watch")
    text = (tok.apply_chat_template([{"role": "user", "content": args.prompt}])
            if args.chat else args.prompt)
    ids = tok.encode(text)
    if not ids:
        ap.error("empty prompt")

    n_layers = model.cfg.n_layers
    try:
        plotted = (parse_layers(args.layers, n_layers) if args.layers
                   else sorted({0, layer, n_layers - 1}))
    except ValueError as e:
        ap.error(str(e))
    if args.layers and not args.plot:
        ap.error("--layers chooses the layers of --plot; give --plot FILE too")
    if args.plot:
        from msrnn.paths import writable_file
        try:
            writable_file(args.plot, "--plot")              # before the steps, not after
        except ValueError as e:
            ap.error(str(e))

    print(f"{n_layers} layers; policy {policy.inner}; showing layer {layer}"
          f"{', KV head 0' if policy.per_head else ''}. Steps and tokens count from 1, as in "
          f"the paper: step t reads token t; [j]'token' is token j (the code's position j - 1).")
    print(f"prompt mode: {args.prompt_mode} ("
          + ("every prompt token is a step" if args.prompt_mode == "sequential" else
             "the prompt in one parallel pass, then each layer keeps the k it ranks best; "
             "what msrnn.generate does by default") + ")")
    try:
        msrnn.positions.check_range(policy, args.positions, model.cfg.max_positions,
                                    len(ids) + args.max_new_tokens,
                                    len(ids) if args.prompt_mode == "oneshot" else 0,
                                    args.past_range, layers=n_layers)
    except ValueError as e:
        ap.error(str(e))
    state = model.init_state(1, policy, positions=args.positions,
                             allow_past_range=args.past_range)
    n_prompt = len(ids)
    history = {l: [] for l in plotted}             # layer -> [(step, kept positions)]

    def record(t):
        for l in plotted:
            history[l].append((t, state.positions(l)[0, 0].tolist()))

    start = 0
    with torch.inference_mode():
        if args.prompt_mode == "oneshot":         # the whole prompt at once, as generate does
            policy.calls.clear()
            logits, state = prefill(model, torch.tensor([ids]), state, mode="oneshot")
            produced = int(logits[0, -1].argmax())
            ids.append(produced)
            kept = state.positions(layer)[0, 0].tolist()
            evicted = sorted(set(range(n_prompt)) - set(kept))
            t = n_prompt - 1
            record(t)
            report(tok, ids, t, produced, kept, evicted, policy.calls, layer, args.compact,
                   False)
            start = n_prompt if produced not in tok.eos_ids else n_prompt + args.max_new_tokens
        for t in range(start, n_prompt + args.max_new_tokens - 1):
            before = set(state.positions(layer)[0, 0].tolist()) | {t}
            policy.calls.clear()
            logits, state = model.step(torch.tensor([ids[t]]), state)
            produced = int(logits[0].argmax())
            in_prompt = t + 1 < n_prompt
            if not in_prompt:                     # past the prompt: the output is the next input
                ids.append(produced)
            kept = state.positions(layer)[0, 0].tolist()
            evicted = sorted(before - set(kept))
            record(t)
            report(tok, ids, t, produced, kept, evicted, policy.calls, layer, args.compact,
                   in_prompt)
            if not in_prompt and produced in tok.eos_ids:
                break
    print(f"\nmulti-state after {state.length} steps: {state.slots} slots per layer, "
          f"{state.total_budget()} states in all, {state.nbytes() / 2**20:.2f} MiB for all "
          f"{n_layers} layers")
    if args.plot:
        from msrnn.cli.evaluate import kept_matrix, plot_multistate

        name = args.model.rstrip("/").split("/")[-1]
        plot_multistate({l: kept_matrix(h) for l, h in history.items()}, args.plot,
                        f"{policy.inner}, {name}, prompt {n_prompt} tokens ({args.prompt_mode})"
                        f"{', KV head 0' if policy.per_head else ''}", prompt=n_prompt,
                        window=policy.size)
        print(f"plot: {args.plot}")


def parse_layers(text: str, n_layers: int) -> list[int]:
    """'0,15,29' -> [0, 15, 29], each checked to be a layer of the model."""
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated layer numbers, got {text!r}") from None
    bad = [l for l in layers if not 0 <= l < n_layers]
    if not layers or bad:
        raise ValueError(f"--layers must name layers in 0..{n_layers - 1}, got {text!r}")
    return sorted(set(layers))


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
        print(f"t={t + 1:4d} read {read:>14} -> {out:14} | evicted {gone} | kept "
              + " ".join(str(p + 1) for p in kept))
        return
    print(f"\nstep {t + 1}: read {read}, produced {out}")
    items = [f"{show(tok, ids, p)} {scores[p]:.3f}" if p in scores else show(tok, ids, p)
             for p in kept]
    print(wrap(f"  layer {layer} keeps {len(kept)}:", items))
    print(f"  evicted: {gone}")


if __name__ == "__main__":
    sys.exit(main())

"""`msrnn drift`: how far each policy's greedy generation drifts from Full's (msrnn/drift.py):
the first step that differs, Full's perplexity of its text and its repeated 4-grams, against
multi-state size."""

import json
import os
import sys
import time

from tqdm import tqdm

from .common import (UsageError, add_backend_arg, add_device_args, add_policy_args,
                     add_positions_args, add_prompt_mode_arg, check_device, check_out_dir,
                     check_positive, check_reach, check_seed, load_model, model_config,
                     parse_list, policy_help)
from .evaluate import text_digest
from .output import Results, figure, save_figure

MEASURES = ("first_divergence", "full_ppl", "repeat_4gram")
FIELDS = ["kind", "policy", "size", *MEASURES, "tokens", "samples", "seconds"]
KINDS = ("opening", "story")


def add_commands(commands):
    import argparse

    p = commands.add_parser("drift", help="how far a bounded generation drifts from Full's: "
                            "first divergence, Full's perplexity of it, repeated 4-grams",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=policy_help())
    p.add_argument("model")
    p.add_argument("--text", nargs="+", help="texts the openings are cut from (default: the "
                   "two public-domain books msrnn ships)")
    add_policy_args(p, multiple=True)
    p.add_argument("--samples", type=int, default=2, help="prompts of each kind (openings, "
                   "story requests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--new-tokens", type=int, default=1024, help="tokens generated greedily")
    p.add_argument("--prompt-tokens", type=int, default=512, help="length of the openings")
    add_prompt_mode_arg(p)
    p.add_argument("--observe", type=int, default=1, metavar="N", help="oneshot: rank the "
                   "prompt by the mean attention of its last N queries (the observation window "
                   "ω; TOVA; default 1, the paper's rule)")
    add_positions_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON list on stdout")
    p.add_argument("--out", help="directory for results.json/.csv and drift.png (resumable)")
    add_backend_arg(p)
    add_device_args(p)
    p.set_defaults(run=run_drift)


def run_drift(args):
    from .. import drift, load_tokenizer
    from ..data import BOOKS
    from ..evaluate import read_text
    from ..needle import haystack_ids
    from ..policies import NAMES, Full, grid

    names = parse_list("--policies", args.policies)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise UsageError(f"unknown policy {unknown[0]!r}; choose from {', '.join(NAMES)}")
    sizes = parse_list("--sizes", args.sizes, int)
    if any(s < 1 for s in sizes):
        raise UsageError(f"--sizes must be positive, got {args.sizes!r}")
    for name, value in (("--samples", args.samples), ("--new-tokens", args.new_tokens),
                        ("--prompt-tokens", args.prompt_tokens), ("--observe", args.observe)):
        check_positive(name, value)
    check_seed(args.seed)
    check_device(args.device)
    check_out_dir(args.out)
    configs = [c for c in grid(names, sizes, args.sinks, args.observe) if c[0] != "full"]
    directory, cfg = model_config(args.model)
    end = args.prompt_tokens + args.new_tokens - 1
    for _, _, policy in configs + [("full", None, Full())]:
        check_reach(cfg, policy, args.positions, end, f"--prompt-tokens {args.prompt_tokens} "
                    f"plus --new-tokens {args.new_tokens} ({policy})",
                    args.prompt_tokens if args.prompt_mode == "oneshot" else 0, args.past_range)
    args.text = args.text or list(BOOKS)
    tok = load_tokenizer(directory)
    haystacks = haystack_ids(tok, [read_text(path) for path in args.text])
    try:
        prompts = {"opening": drift.openings(tok, haystacks, args.samples, args.prompt_tokens,
                                             args.seed),
                   "story": drift.stories(tok, args.samples, args.seed)}
    except ValueError as e:
        raise UsageError(str(e)) from None
    setup = {"model": os.path.abspath(directory), "text": [os.path.basename(t) for t in args.text],
             "digest": text_digest(args.text), "samples": args.samples, "seed": args.seed,
             "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
             "prompt_mode": args.prompt_mode, "observe": args.observe, "dtype": args.dtype,
             "sinks": args.sinks, "backend": args.backend, "positions": args.positions}
    if args.quantize:                      # older results directories stay valid without it
        setup["quantize"] = args.quantize
    results = Results(args.out, setup, key=("kind", "policy", "size"), fields=FIELDS)
    everything = [("full", None, Full())] + configs
    todo = [(kind, c) for kind in KINDS for c in everything
            if results.get(kind, c[0], c[1]) is None]
    log = sys.stderr
    print(f"[msrnn drift] {len(everything)} configurations x {len(KINDS)} kinds x "
          f"{args.samples} prompts, {args.new_tokens} new tokens; {len(todo)} to run", file=log)
    model = load_model(directory, args.dtype, args.device, args.backend, args.tp,
                       quantize=args.quantize) if todo else None
    scheme = dict(mode=args.prompt_mode, positions=args.positions,
                  allow_past_range=args.past_range)
    started = time.perf_counter()
    for kind, (name, size, policy) in tqdm(todo, desc="drift", unit="config", file=log):
        begin = time.perf_counter()
        outputs = drift.run(model, prompts[kind], policy, args.new_tokens, **scheme)
        full = outputs if name == "full" else results.get(kind, "full", None)["outputs"]
        row = drift.measure(model, prompts[kind], outputs, full)
        results.add({"kind": kind, "policy": name, "size": size,
                     **{k: round(v, 4) for k, v in row.items()}, "samples": args.samples,
                     "seconds": round(time.perf_counter() - begin, 1), "outputs": outputs})
        tqdm.write(f"[msrnn drift] {kind} {policy}: first divergence "
                   f"{row['first_divergence']:.0f}, Full's ppl {row['full_ppl']:.2f}, repeated "
                   f"4-grams {row['repeat_4gram']:.2f}", file=log)
    if todo:
        print(f"[msrnn drift] {time.perf_counter() - started:.0f} s", file=log)
    rows = [results.get(kind, name, size) for kind in KINDS for name, size, _ in everything]
    if args.out:
        plot_drift(rows, os.path.join(args.out, "drift.png"),
                   f"{os.path.basename(os.path.abspath(directory))}, {args.samples} prompts of "
                   f"each kind, {args.new_tokens} new tokens, {args.prompt_mode} prompt")
    if args.json:
        print(json.dumps([{k: r[k] for k in ("kind", "policy", "size", *MEASURES, "tokens",
                                             "samples")} for r in rows]))
    else:
        print(f"{'kind':>8} {'policy':>8} {'size':>5} {'diverges':>9} {'full_ppl':>9} "
              f"{'rep4':>6}")
        for r in rows:
            print(f"{r['kind']:>8} {r['policy']:>8} {str(r['size'] or '-'):>5} "
                  f"{r['first_divergence']:9.1f} {r['full_ppl']:9.2f} {r['repeat_4gram']:6.3f}")
    return 0


def plot_drift(rows, path: str, title: str):
    """Each measure against multi-state size (a panel each), a line per policy and prompt kind
    (solid: openings, dashed: stories), Full's level dotted."""
    fig, axes = figure(1, len(MEASURES), figsize=(4.2 * len(MEASURES), 3.6))
    styles = {"opening": "-", "story": "--"}
    for ax, measure in zip(axes, MEASURES):
        for r in rows:
            if r["policy"] == "full" and measure != "first_divergence":
                ax.axhline(r[measure], color="black", linestyle=":" if r["kind"] == "opening"
                           else "-.", label=f"full, {r['kind']}")
        for kind in KINDS:
            for i, policy in enumerate(dict.fromkeys(r["policy"] for r in rows
                                                     if r["policy"] != "full")):
                pts = sorted((r["size"], r[measure]) for r in rows
                             if r["policy"] == policy and r["kind"] == kind)
                ax.plot(*zip(*pts), styles[kind], marker="o", color=f"C{i}",
                        label=f"{policy}, {kind}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("multi-state size k (log2)")
        ax.set_title(measure, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)

"""`msrnn drift`: how far each policy's greedy generation drifts from Full's (msrnn/experiments/drift.py):
the first step that differs, Full's perplexity of its text and its repeated 4-grams, against
multi-state size."""

import functools
import json
import os
import time

from .common import (UsageError, add_batch_args, add_device_args, add_output_args,
                     add_policy_args, add_positions_args, add_prompt_mode_arg, add_sample_args,
                     add_worker_args, batch_configs, check_device, check_observe, check_out_dir,
                     check_policies, check_positive, check_reach, check_seed, check_workers,
                     command, loader, model_config, options, read_texts, setup, workers)
from ..experiments.output import figure, save_figure

MEASURES = ("first_divergence", "full_ppl", "repeat_4gram")
FIELDS = ["kind", "policy", "size", *MEASURES, "tokens", "samples", "seconds"]
KINDS = ("opening", "story")


def add_commands(commands):
    p = command(commands, "drift", "how far a bounded generation drifts from Full's: first "
                "divergence, Full's perplexity of it, repeated 4-grams", run_drift,
                options(add_policy_args, multiple=True), options(add_sample_args, 2),
                options(add_prompt_mode_arg, observe=True), options(add_positions_args),
                options(add_output_args, "results.json/.csv and drift.png"),
                options(add_device_args), options(add_worker_args), options(add_batch_args))
    p.add_argument("--text", nargs="+", help="texts the openings are cut from (default: the "
                   "two public-domain books msrnn ships)")
    p.add_argument("--new-tokens", type=int, default=1024, help="tokens generated greedily")
    p.add_argument("--prompt-tokens", type=int, default=512, help="length of the openings")


def run_drift(args):
    from .. import load_tokenizer
    from ..data import BOOKS
    from ..experiments import drift, text
    from ..experiments.sweep import Config, Sweep
    from ..policies import Full

    for name, value in (("--samples", args.samples), ("--new-tokens", args.new_tokens),
                        ("--prompt-tokens", args.prompt_tokens)):
        check_positive(name, value)
    check_observe(args)
    check_positive("--batch-configs", args.batch_configs, allow_none=True)
    check_seed(args.seed)
    check_device(args.device, args.ray)
    check_workers(args)
    check_out_dir(args.out)
    end = args.prompt_tokens + args.new_tokens - 1
    configs = [Config("full", None, Full(), args.positions)] + check_policies(
        args, end + 1, f"--prompt-tokens plus --new-tokens ({end + 1})", bounded_only=True)
    directory, cfg = model_config(args.model)
    for c in configs:
        check_reach(cfg, c.policy, args.positions, end, f"--prompt-tokens {args.prompt_tokens} "
                    f"plus --new-tokens {args.new_tokens} ({c.policy})",
                    args.prompt_tokens if args.prompt_mode == "oneshot" else 0, args.past_range)
    args.text = args.text or list(BOOKS)
    tok = load_tokenizer(directory)
    haystacks = text.haystacks(tok, read_texts(args.text))
    try:
        prompts = {"opening": drift.openings(tok, haystacks, args.samples, args.prompt_tokens,
                                             args.seed),
                   "story": drift.stories(tok, args.samples, args.seed)}
    except ValueError as e:
        raise UsageError(str(e)) from None
    sweep = Sweep("drift", args.out, setup(
        args, directory, {"text": args.text}, samples=args.samples, seed=args.seed,
        new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
        prompt_mode=args.prompt_mode, observe=args.observe, positions=args.positions),
        key=("kind", "policy", "size"), fields=FIELDS)
    cells = [{"kind": kind} for kind in KINDS]
    todo = sweep.pending(cells, configs)
    sweep.say(f"{len(configs)} configurations x {len(KINDS)} kinds x {args.samples} prompts, "
              f"{args.new_tokens} new tokens; {sum(len(c) for _, c in todo)} to run")

    def work(fulls, model, cell, todo_configs):
        """The configurations together, as the rows of one batch; each is measured against
        Full's generations (`fulls`, by kind; Full's own where it is one of them)."""
        kind, begin = cell["kind"], time.perf_counter()
        outputs = drift.run(model, prompts[kind], [c.policy for c in todo_configs],
                            args.new_tokens, args.prompt_mode, None, args.positions,
                            args.past_range)
        seconds = (time.perf_counter() - begin) / len(todo_configs)
        for c, out in zip(todo_configs, outputs):
            full = out if c.name == "full" else fulls[kind]
            row = drift.measure(model, prompts[kind], out, full)
            yield c, {**{k: round(v, 4) for k, v in row.items()}, "samples": args.samples,
                      "seconds": round(seconds, 1), "outputs": out}, \
                f"{kind} {c.policy}: first divergence {row['first_divergence']:.0f}, Full's " \
                f"ppl {row['full_ppl']:.2f}, repeated 4-grams {row['repeat_4gram']:.2f}"

    # Full first, the others after: they are measured against its text, which a worker
    # elsewhere (--ray) gets with its work rather than from this process's results.
    load = loader(args, directory)
    sweep.run([(cell, c[:1]) for cell, c in todo if c[0].name == "full"], load,
              functools.partial(work, {}), **workers(args))
    fulls = {cell["kind"]: sweep.get(cell, configs[0])["outputs"] for cell in cells}
    batch = batch_configs(args, cfg, args.samples, configs[1:], end + 1, sweep.say)
    sweep.run(sweep.pending(cells, configs[1:]), load, functools.partial(work, fulls),
              batch=batch, **workers(args))
    rows = sweep.rows(cells, configs)
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

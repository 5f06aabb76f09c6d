"""`msrnn needle`: needle / passkey retrieval against prompt length, fact depth and multi-state
size, as heat maps (the command line of msrnn/experiments/needle.py: arguments checked first, then the
computation, then files, plots and the printed table)."""

import json
import os

from .common import (UsageError, add_batch_args, add_device_args, add_output_args,
                     add_policy_module_arg, add_positions_args, add_prompt_mode_arg,
                     add_sample_args, add_worker_args, batch_configs, check_device,
                     check_observe, check_out_dir, check_policies, check_positive, check_reach,
                     check_seed, check_workers, command, loader, model_config, options,
                     parse_list, read_texts, setup, workers)
from ..experiments.output import figure, save_figure
from ..policies import smallest

FIELDS = ["policy", "size", "length", "depth", "accuracy", "samples", "correct", "seconds",
          "tokens_per_s"]


def add_commands(commands):
    p = grid_command(commands, "needle", "needle / passkey retrieval: accuracy against "
                     "length, depth and multi-state size, as heat maps", run_needle,
                     ("512,1024,2048,4096", "full,sinks,h2o,tova", "64,128,256,512", 5),
                     "results.json/.csv and the heat maps")
    p.add_argument("--haystack", nargs="+", help="text files the haystack passages are cut "
                   "from (--task needle; default: the two public-domain books msrnn ships)")
    p.add_argument("--task", choices=("needle", "passkey"), default="needle",
                   help="needle: a book passage; passkey: the classic repeated filler")
    p.add_argument("--max-new-tokens", type=int, default=24,
                   help="answer tokens at most (a verbose answer needs about 20)")


def add_grid(p, lengths, policies, sizes, samples):
    """The grid `msrnn needle` and `msrnn tasks` share: lengths, depths, policies, sizes, the
    prompts (samples, seed, mode, observation window, chat) and positions."""
    from ..policies import NAMES

    p.add_argument("--lengths", default=lengths, help="prompt lengths in tokens")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="relative depths of the fact")
    p.add_argument("--policies", default=policies,
                   help=f"comma-separated, from: {', '.join(NAMES)}")
    add_policy_module_arg(p)
    p.add_argument("--sizes", default=sizes, help="multi-state sizes k")
    p.add_argument("--sinks", type=int, help="first tokens never evicted (sinks: default 4)")
    add_sample_args(p, samples)
    add_prompt_mode_arg(p, observe=True)
    add_positions_args(p)
    p.add_argument("--no-chat", action="store_true", help="the raw prompt, no chat template")


def grid_command(commands, name: str, help: str, run, defaults: tuple, files: str):
    """A command over the grid (`msrnn needle`, `msrnn tasks`): `defaults` are those of
    --lengths, --policies, --sizes and --samples; `files`, what --out holds."""
    return command(commands, name, help, run, options(add_grid, *defaults),
                   options(add_output_args, files), options(add_device_args),
                   options(add_worker_args), options(add_batch_args))


def check_grid(args, extra: int):
    """(lengths, depths, configurations, model directory, Config), every argument of the grid
    checked before any work; `extra`: new tokens after the longest prompt."""
    lengths = parse_list("--lengths", args.lengths, int)
    if any(n < 1 for n in lengths):
        raise UsageError(f"--lengths must be positive, got {args.lengths!r}")
    lengths = sorted(set(lengths))
    depths = sorted(set(parse_depths(args.depths)))
    check_observe(args)
    configs = check_policies(args, max(lengths), f"--lengths {max(lengths)}", name="--sizes")
    check_positive("--samples", args.samples)
    check_positive("--batch-configs", args.batch_configs, allow_none=True)
    check_seed(args.seed)
    check_device(args.device, args.ray)
    check_workers(args)
    check_out_dir(args.out)
    directory, cfg = model_config(args.model)
    for c in configs:
        check_reach(cfg, c.policy, args.positions, max(lengths) + extra - 1,
                    f"--lengths {max(lengths)} plus {extra} new tokens ({c.policy})",
                    max(lengths) if args.prompt_mode == "oneshot" else 0, args.past_range)
    return lengths, depths, configs, directory, cfg


def parse_depths(text: str) -> list[float]:
    try:
        depths = [float(x) for x in parse_list("--depths", text)]
    except ValueError as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"--depths must be comma-separated numbers in [0, 1], got "
                         f"{text!r}") from None
    bad = [d for d in depths if not 0 <= d <= 1]
    if bad:
        raise UsageError(f"--depths must be in [0, 1] (0: the start of the haystack, 1: its end), "
                         f"got {bad[0]:g}")
    return depths


def evicts(layers: int):
    """Whether a configuration belongs to a cell: one whose every layer and head keeps the whole
    prompt would never evict (Full always runs). The fewest states a layer keeps decides, not
    the nominal size: a budgeted policy (PyramidKV) evicts from its smaller layers first."""
    def belongs(cell, config) -> bool:
        return not config.policy.bounded or smallest(config.policy, layers) < cell["length"]
    return belongs


def skipped(sweep, configs, lengths, layers: int):
    for c in configs:
        for n in lengths:
            if not evicts(layers)({"length": n}, c):
                sweep.say(f"{c.name} {c.size} at length {n}: the multi-state holds the whole "
                          f"prompt, skipped")


def run_needle(args):
    from .. import load_tokenizer
    from ..experiments import needle, text
    from ..experiments.sweep import Sweep

    check_positive("--max-new-tokens", args.max_new_tokens)
    lengths, depths, configs, directory, cfg = check_grid(args, args.max_new_tokens)
    if args.task == "needle" and not args.haystack:
        from ..data import BOOKS
        args.haystack = list(BOOKS)                    # shipped in the package: any directory
    texts = read_texts(args.haystack or [])
    tok = load_tokenizer(directory)
    _, _, chat = needle.template(tok, not args.no_chat)
    short = min(lengths)
    if short <= needle.overhead(tok, args.task, chat):
        raise UsageError(f"--lengths {short} is too short: the template, fact and question alone "
                         f"take {needle.overhead(tok, args.task, chat)} tokens")
    if args.task == "needle":
        haystacks = text.haystacks(tok, texts)
        for path, ids in zip(args.haystack, haystacks):
            if len(ids) < max(lengths):
                raise UsageError(f"--haystack {path} has {len(ids)} tokens, shorter than the "
                                 f"longest --lengths {max(lengths)}; use a longer text or "
                                 f"shorter lengths")
    else:
        haystacks = text.filler(tok, max(lengths))
    extra = {"observe": args.observe} if args.observe != 1 else {}   # older results stay valid
    sweep = Sweep("needle", args.out, setup(
        args, directory, {"haystack": args.haystack or []}, task=args.task,
        samples=args.samples, seed=args.seed, prompt_mode=args.prompt_mode, chat=chat,
        max_new_tokens=args.max_new_tokens, positions=args.positions, **extra),
        key=("policy", "size", "length", "depth"), fields=FIELDS)
    if not chat:
        sweep.say(f"{os.path.basename(os.path.abspath(directory))} has no chat template"
                  f"{' (or --no-chat)' if args.no_chat else ''}: the raw prompt is used")
    cells = [{"length": n, "depth": d} for n in lengths for d in depths]
    skipped(sweep, configs, lengths, cfg.n_layers)
    todo = sweep.pending(cells, configs, evicts(cfg.n_layers))
    sweep.say(f"{args.task}, {args.prompt_mode} prompts, {len(configs)} configurations x "
              f"{len(cells)} (length, depth) cells x {args.samples} samples; {len(todo)} cells "
              f"to run")

    def work(model, cell, todo_configs):
        n, d = cell["length"], cell["depth"]
        rows = needle.retrieval(model, tok, haystacks, [c.policy for c in todo_configs], n, d,
                                args.samples, args.seed, args.task, args.prompt_mode, chat,
                                args.max_new_tokens, args.positions, args.past_range)
        for c, r in zip(todo_configs, rows):
            speed = args.samples * n / r["seconds"]
            yield c, {"accuracy": r["accuracy"], "samples": args.samples,
                      "correct": r["correct"], "seconds": round(r["seconds"], 3),
                      "tokens_per_s": round(speed, 1), "answers": r["answers"]}, \
                f"{c.policy} length {n} depth {d:g}: {r['correct']}/{args.samples}, " \
                f"{speed:.0f} tok/s"

    batch = batch_configs(args, cfg, args.samples, configs,
                          max(lengths) + args.max_new_tokens, sweep.say)
    sweep.run(todo, loader(args, directory, warm=needle.warm_up), work, batch=batch,
              sequential=args.prompt_mode == "sequential", **workers(args))
    rows = sweep.rows(cells, configs, evicts(cfg.n_layers))
    if args.out:
        title = (f"{os.path.basename(os.path.abspath(directory))}, {args.task}, "
                 f"{args.prompt_mode} prompt, {args.samples} samples")
        plot_all(rows, args.out, title)
    if args.json:
        print(json.dumps([{k: r[k] for k in ("policy", "size", "length", "depth", "accuracy",
                                             "samples")} for r in rows]))
    else:
        print(f"{'policy':>8} {'size':>6} {'length':>7} {'depth':>6} {'accuracy':>9}")
        for r in rows:
            print(f"{r['policy']:>8} {str(r['size'] or '-'):>6} {r['length']:7d} "
                  f"{r['depth']:6g} {r['accuracy']:9.2f}")
    return 0


def label(policy: str, size) -> str:
    return policy if size is None else f"{policy}({size})"


def grid(rows, policy, size, value="accuracy"):
    """(lengths, depths, matrix of `value` [depths][lengths], None where not run)."""
    mine = [r for r in rows if r["policy"] == policy and r["size"] == size]
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows}, key=lambda d: -1 if d is None else d)
    acc = {(r["length"], r["depth"]): r[value] for r in mine}
    return lengths, depths, [[acc.get((n, d)) for n in lengths] for d in depths]


def draw_heatmap(ax, rows, policy, size, value="accuracy", top=1):
    """One (policy, size)'s `value` (0..top) against length and depth (None: a task without)."""
    import numpy as np

    lengths, depths, m = grid(rows, policy, size, value)
    data = np.array([[np.nan if v is None else v for v in row] for row in m], dtype=float)
    image = ax.imshow(data, origin="upper", aspect="auto", cmap="RdYlGn", vmin=0, vmax=top)
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            ax.text(j, i, "-" if v is None else f"{v:.{0 if top > 1 else 2}f}", ha="center",
                    va="center", fontsize=7)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), ["-" if d is None else f"{d:g}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("depth of the fact")
    ax.set_title(label(policy, size), fontsize=9)
    return image


def plot_all(rows, out: str, title: str):
    """One heat map per (policy, size) (needle-POLICY-SIZE.png), all of them on one page
    (needle-grid.png), and accuracy against multi-state size (needle-sizes.png)."""
    configs = list(dict.fromkeys((r["policy"], r["size"]) for r in rows))
    for policy, size in configs:
        fig, ax = figure(figsize=(5, 3.6))
        fig.colorbar(draw_heatmap(ax, rows, policy, size), ax=ax, label="accuracy")
        ax.set_title(f"{label(policy, size)}: {title}", fontsize=8)
        save_figure(fig, os.path.join(out, f"needle-{policy}-{size or 'full'}.png"))
    heatmap_page(rows, os.path.join(out, "needle-grid.png"), title)
    fig, ax = figure(figsize=(6.5, 4.2))
    draw_sizes(ax, rows)
    ax.set_ylabel("retrieval accuracy (mean over lengths, depths)")
    ax.set_title(title, fontsize=9)
    save_figure(fig, os.path.join(out, "needle-sizes.png"))


def draw_sizes(ax, rows, value="accuracy", top=1):
    """`value` (mean over lengths and depths) against multi-state size, a line per policy; Full
    (or any policy without a size) as a dashed level."""
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mean = {}
        for r in rows:
            if r["policy"] == policy:
                mean.setdefault(r["size"], []).append(r[value])
        if policy == "full" or None in mean:
            level = sum(mean[None]) / len(mean[None])
            ax.axhline(level, color="black", linestyle="--",
                       label=f"{policy} ({level:.{0 if top > 1 else 2}f})")
            continue
        pts = sorted((s, sum(v) / len(v)) for s, v in mean.items())
        ax.plot(*zip(*pts), marker="o", label=policy)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03 * top, 1.03 * top)
    ax.set_xlabel("multi-state size k (log2)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def heatmap_page(rows, path: str, title: str, value="accuracy", top=1):
    """Every (policy, size)'s heat map on one page: a row per policy, a column per size."""
    import numpy as np

    configs = list(dict.fromkeys((r["policy"], r["size"]) for r in rows))
    policies = list(dict.fromkeys(p for p, _ in configs))
    sizes = sorted({s for _, s in configs if s is not None})
    cols = max(len(sizes), 1)
    fig, axes = figure(len(policies), cols, figsize=(3.3 * cols, 2.6 * len(policies)))
    axes = np.array(axes).reshape(len(policies), cols)
    for i, policy in enumerate(policies):
        for j in range(cols):
            ax = axes[i, j]
            size = None if policy == "full" else sizes[j] if sizes else None
            if (policy == "full" and j) or (policy, size) not in configs:
                ax.axis("off")
                continue
            draw_heatmap(ax, rows, policy, size, value, top)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)

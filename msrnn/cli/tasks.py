"""`msrnn tasks`: RULER's synthetic tasks (msrnn/experiments/tasks.py) against length, depth and multi-state
size, with `msrnn needle`'s grid, options, resumable results and heat maps (cli/needle.py)."""

import json
import os

from .common import (UsageError, batch_configs, check_positive, loader, parse_list,
                     read_texts, setup, workers)
from .needle import check_grid, draw_sizes, grid_command, heatmap_page
from ..experiments.output import figure, save_figure

FIELDS = ["task", "policy", "size", "length", "depth", "score", "samples", "prompt_mode",
          "observe", "seconds", "tokens_per_s"]
JSON = ("task", "policy", "size", "length", "depth", "score", "samples", "prompt_mode")


def add_commands(commands):
    from ..experiments.tasks import MAX_NEW_TOKENS, TASKS

    p = grid_command(commands, "tasks", "RULER's synthetic tasks (needles, variable tracking, "
                     "word extraction): score against length, depth and multi-state size",
                     run_tasks, ("1024,2048,4096", "full,window,sinks,h2o,tova", "64,128,256,512",
                                 4), "results.json/.csv and the plots")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from: "
                   f"{', '.join(TASKS)}")
    p.add_argument("--haystack", nargs="+", help="text files the haystack passages and word "
                   "lists come from (default: the two public-domain books msrnn ships)")
    p.add_argument("--noise", action="store_true", help="haystacks of repeated noise sentences "
                   "instead of book passages (the needle tasks and vt)")
    p.add_argument("--max-new-tokens", type=int, help="answer tokens at most (default per task: "
                   + ", ".join(f"{t} {n}" for t, n in MAX_NEW_TOKENS.items()) + ")")


def run_tasks(args):
    from .. import load_tokenizer
    from ..data import BOOKS
    from ..experiments import needle, tasks, text
    from ..experiments.sweep import Sweep
    from .needle import evicts

    names = list(dict.fromkeys(parse_list("--tasks", args.tasks)))
    unknown = [t for t in names if t not in tasks.TASKS]
    if unknown:
        raise UsageError(f"unknown task {unknown[0]!r}; choose from {', '.join(tasks.TASKS)}")
    check_positive("--max-new-tokens", args.max_new_tokens, allow_none=True)
    new = {t: args.max_new_tokens or tasks.MAX_NEW_TOKENS[t] for t in names}
    lengths, depths, configs, directory, cfg = check_grid(args, max(new.values()))
    args.haystack = args.haystack or list(BOOKS)
    texts = read_texts(args.haystack)
    tok = load_tokenizer(directory)
    _, _, chat = needle.template(tok, not args.no_chat)
    words = tasks.vocabulary(texts)
    if len(words) < 1000:
        raise UsageError(f"--haystack has {len(words)} distinct words of 4-10 letters; the "
                         f"tasks draw keys and word lists from at least 1000: give longer texts")
    if args.noise:
        haystacks = text.filler(tok, max(lengths))          # RULER's noise: the filler repeated
    else:
        haystacks = text.haystacks(tok, texts)
        if max(len(h) for h in haystacks) < max(lengths):
            raise UsageError(f"every --haystack is shorter than the longest --lengths "
                             f"{max(lengths)} tokens; use a longer text or shorter lengths")
    cells = [{"task": t, "length": n, "depth": d} for t in names for n in lengths
             for d in (depths if t in tasks.DEPTH else [None])]
    for t in names:                        # too short for the template and statements?
        try:
            tasks.build(tok, t, haystacks, words, min(lengths),
                        depths[0] if t in tasks.DEPTH else None, 1, args.seed, chat)
        except ValueError as e:
            raise UsageError(f"--lengths {min(lengths)}: {e}") from None
    sweep = Sweep("tasks", args.out, setup(
        args, directory, {"haystack": args.haystack}, noise=args.noise, samples=args.samples,
        seed=args.seed, prompt_mode=args.prompt_mode, observe=args.observe, chat=chat,
        max_new_tokens=args.max_new_tokens, positions=args.positions),
        key=("task", "policy", "size", "length", "depth"), fields=FIELDS)
    todo = sweep.pending(cells, configs, evicts(cfg.n_layers))
    sweep.say(f"{', '.join(names)}; {args.prompt_mode} prompts (observe {args.observe}), "
              f"{len(configs)} configurations x {len(cells)} cells x {args.samples} samples; "
              f"{len(todo)} cells to run")

    def work(model, cell, todo_configs):
        t, n, d = cell["task"], cell["length"], cell["depth"]
        ids, expected = tasks.build(tok, t, haystacks, words, n, d, args.samples, args.seed,
                                    chat)
        outs = needle.answer(model, ids, [c.policy for c in todo_configs], args.prompt_mode,
                             new[t], tok.eos_ids or None, args.positions, args.past_range)
        for c, (new_ids, seconds) in zip(todo_configs, outs):
            score, answers = tasks.scores(tok, new_ids, expected)
            speed = args.samples * n / seconds
            yield c, {"score": round(score, 2), "samples": args.samples,
                      "prompt_mode": args.prompt_mode, "observe": args.observe,
                      "seconds": round(seconds, 3), "tokens_per_s": round(speed, 1),
                      "answers": answers, "expected": expected}, \
                f"{t} {c.policy} length {n}" + ("" if d is None else f" depth {d:g}") + \
                f": {score:.0f}, {speed:.0f} tok/s"

    batch = batch_configs(args, cfg, args.samples, configs, max(lengths) + max(new.values()),
                          sweep.say)
    sweep.run(todo, loader(args, directory, warm=needle.warm_up), work, batch=batch,
              sequential=args.prompt_mode == "sequential", **workers(args))
    rows = sweep.rows(cells, configs, evicts(cfg.n_layers))
    if args.out:
        title = (f"{os.path.basename(os.path.abspath(directory))}, {args.prompt_mode} prompt"
                 f"{'' if args.observe == 1 else f' (observe {args.observe})'}, "
                 f"{args.samples} samples")
        plot_tasks(rows, args.out, title)
    if args.json:
        print(json.dumps([{k: r[k] for k in JSON} for r in rows]))
    else:
        print(f"{'task':>16} {'policy':>8} {'size':>5} {'length':>6} {'depth':>5} {'score':>6}")
        for r in rows:
            depth = "-" if r["depth"] is None else f"{r['depth']:g}"
            print(f"{r['task']:>16} {r['policy']:>8} {str(r['size'] or '-'):>5} "
                  f"{r['length']:6d} {depth:>5} {r['score']:6.1f}")
    return 0


def plot_tasks(rows, out: str, title: str):
    """Per task, every (policy, size)'s heat map of score against length and depth on one page
    (tasks-TASK.png); and one summary, score against multi-state size, a panel per task, a line
    per policy (tasks-sizes.png)."""
    names = list(dict.fromkeys(r["task"] for r in rows))
    for t in names:
        heatmap_page([r for r in rows if r["task"] == t], os.path.join(out, f"tasks-{t}.png"),
                     f"{t}: {title}", "score", 100)
    cols = min(4, len(names))
    lines = (len(names) + cols - 1) // cols
    fig, axes = figure(lines, cols, figsize=(3.6 * cols, 3.0 * lines), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(names):
            ax.axis("off")
            continue
        draw_sizes(ax, [r for r in rows if r["task"] == names[i]], "score", 100)
        ax.set_title(names[i], fontsize=9)
        ax.set_ylabel("score (mean over lengths, depths)", fontsize=7)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, os.path.join(out, "tasks-sizes.png"))

"""`msrnn ppl` and `msrnn retention`: the command line of msrnn/experiments/evaluate.py (arguments checked
first, then the computation, then files, plots and the printed table)."""

import functools
import json
import os
import sys

from .common import (UsageError, add_batch_args, add_device_args, add_output_args,
                     add_policy_args, add_policy_module_arg, add_positions_args,
                     add_worker_args, batch_configs, check_decoder_options, check_device,
                     check_out_dir, check_policies, check_positive, check_reach, check_workers,
                     command, compile_option, loader, model_config, options, parse_list,
                     read_texts, setup, workers)
from ..experiments.output import figure, save_figure, write_atomic


def add_commands(commands):
    p = command(commands, "ppl", "perplexity against multi-state size (paper Fig. 3)", run_ppl,
                options(add_policy_args, multiple=True),
                options(add_positions_args, multiple=True),
                options(add_output_args, "results.json/.csv, ppl.png and ppl-position.png"),
                options(add_device_args), options(add_worker_args, local=True),
                options(add_batch_args))
    p.add_argument("--text", nargs="+", required=True, help="text files")
    p.add_argument("--context", type=int, default=2048, help="tokens per chunk (past the "
                   "model's range: a bounded policy with --positions cache or compressed)")
    p.add_argument("--buckets", type=int, default=512, metavar="B",
                   help="also report the perplexity of each block of B positions")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (a "
                   "long context is decoded step by step)")
    p.add_argument("--cpp-wrapper", action="store_true", help="with --compile, on the CPU: "
                   "inductor's C++ wrapper launches the step's kernels (a faster step, a longer "
                   "first compile)")
    p.add_argument("--max-chunks", type=int, help="at most this many chunks per text")
    p.add_argument("--batch", type=int, default=8, help="chunks per batch (of each "
                   "configuration)")

    r = command(commands, "retention", "which tokens TOVA keeps, and for how long",
                run_retention, options(add_positions_args), options(add_policy_module_arg),
                options(add_output_args, "retention.json and retention.png"),
                options(add_device_args), options(add_worker_args, jobs=False),
                options(add_batch_args))
    r.add_argument("--text", nargs="+", required=True)
    r.add_argument("--context", type=int, default=2048)
    r.add_argument("--size", default="256", help="TOVA's multi-state size k; several, "
                   "comma-separated, run together (--batch-configs) and each writes its own "
                   "files, retention-K.json/.png (and --plot FILE-K.png)")
    r.add_argument("--max-chunks", type=int)
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--plot", metavar="FILE", help="draw which positions the --layers keep at "
                   "each step of the first chunk (x: step, y: position) into this PNG file")
    r.add_argument("--layers", help="layers to draw with --plot, comma-separated (default: the "
                   "first, the middle and the last)")


# ----------------------------------------------------------------------------- ppl


def run_ppl(args):
    from .. import load_tokenizer
    from ..experiments import evaluate
    from ..experiments.sweep import Sweep
    from ..positions import Scheme

    if args.context < 2:
        raise UsageError(f"--context must be at least 2, got {args.context}")
    check_positive("--batch-configs", args.batch_configs, allow_none=True)
    check_positive("--batch", args.batch)
    check_positive("--buckets", args.buckets)
    check_positive("--max-chunks", args.max_chunks, allow_none=True)
    check_device(args.device, args.ray)
    check_workers(args, local=True)
    schemes = [Scheme.of(s).value for s in parse_list("--positions", args.positions)]
    configs = check_policies(args, args.context, f"the context {args.context}", schemes)
    read_texts(args.text)                             # exist, and are UTF-8 text
    check_out_dir(args.out)
    directory, cfg = model_config(args.model)
    for c in configs:
        check_reach(cfg, c.policy, c.positions, args.context, f"--context {args.context} "
                    f"({c.policy}, positions {c.positions})", past_range=args.past_range)
    compile = compile_option(args)
    check_decoder_options(args.backend, compile, args.quantize)
    sweep = Sweep("ppl", args.out, setup(
        args, directory, {"texts": args.text}, context=args.context,
        max_chunks=args.max_chunks, buckets=args.buckets, past_range=args.past_range),
        key=("policy", "size", "positions"),
        fields=["policy", "size", "positions", "ppl", "tokens", "seconds"])
    chunks = evaluate.load_chunks(load_tokenizer(directory), args.text, args.context,
                                  args.max_chunks)
    todo = sweep.pending([{}], configs)
    sweep.say(f"{len(chunks)} chunks x {args.context} tokens, {len(configs)} configurations, "
              f"{len(configs) - sum(len(c) for _, c in todo)} done before")
    here = args.ray is None and (args.jobs or 1) == 1        # a bar per chunk: only here
    work = functools.partial(evaluate.sweep_work, chunks, args.batch, args.buckets,
                             args.past_range, here)
    per_config = min(args.batch, len(chunks))     # a configuration's rows: its chunks at once
    batch = batch_configs(args, cfg, per_config, configs, args.context, sweep.say)
    sweep.run(todo, loader(args, directory, compile), work, batch=batch, sequential=True,
              **workers(args))
    rows = sweep.rows([{}], configs)
    if args.out:
        title = (f"{os.path.basename(os.path.abspath(directory))}, context {args.context}, "
                 f"{len(chunks)} chunks")
        plot_ppl(sweep.results.rows, os.path.join(args.out, "ppl.png"), title)
        plot_buckets(sweep.results.rows, os.path.join(args.out, "ppl-position.png"), title,
                     cfg.max_positions)
    if args.json:
        print(json.dumps([{k: r[k] for k in ("policy", "size", "positions", "ppl", "tokens",
                                             "buckets")} for r in rows]))
    else:
        for r in rows:
            print(f"{r['policy']:>10} {str(r['size'] or '-'):>6} {r['positions']:>10} "
                  f"{r['ppl']:10.3f}")
    return 0


def label(row) -> str:
    """A configuration's name in plots: policy, and the scheme where it is not the default."""
    scheme = "" if row["positions"] == "original" else f", {row['positions']}"
    return f"{row['policy']}{scheme}"


def plot_ppl(rows, path: str, title: str):
    """The paper's Figure 3: perplexity against multi-state size (log2 x), one line per policy,
    the full model dashed."""
    fig, ax = figure(figsize=(6.5, 4.2))
    for name in dict.fromkeys(label(r) for r in rows if r["size"] is not None):
        pts = sorted((r["size"], r["ppl"]) for r in rows if label(r) == name and r["size"])
        ax.plot(*zip(*pts), marker="o", label=name)
    for r in rows:
        if r["size"] is None:
            ax.axhline(r["ppl"], color="black", linestyle="--", label=f"full ({r['ppl']:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("multi-state size k (log2)")
    ax.set_ylabel("perplexity (log)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_buckets(rows, path: str, title: str, limit: int):
    """Perplexity against position (each block of --buckets positions), one line per
    configuration, the model's range marked: where each scheme holds and where it breaks."""
    fig, ax = figure(figsize=(7.5, 4.5))
    for r in rows:
        x = [(start + end - 1) / 2 for start, end, _ in r["buckets"]]
        ax.plot(x, [ppl for _, _, ppl in r["buckets"]], lw=1.2,
                label=f"{label(r)} {r['size'] or ''}".strip(),
                color="black" if r["size"] is None else None)
    ax.axvline(limit, color="gray", linestyle=":", label=f"model's range ({limit})")
    ax.set_yscale("log")
    ax.set_xlabel("position in the context (tokens)")
    ax.set_ylabel("perplexity of the block (log)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- retention


def plot_retention(summary, r, path: str, title: str):
    """Two panels: per layer, the share of kept states that are recent and how often the first
    token stays throughout; and how many steps tokens stay in the multi-state. Saved atomically;
    returns each panel's (x label, y label)."""
    layers = summary["layers"]
    fig, (a, b) = figure(1, 2, figsize=(10, 3.8))
    a.bar([l["layer"] for l in layers], [l["recent"] for l in layers], color="tab:blue",
          label="kept states that are recent (share of kept states)")
    a.plot([l["layer"] for l in layers], [l["first_kept"] for l in layers], "k^",
           label="first token kept throughout (share of chunks)")
    a.set_ylim(0, 1.05)
    a.set_xlabel("layer l")
    a.set_ylabel("share (0 to 1)")
    a.set_title("what each layer keeps", fontsize=9)
    a.legend(fontsize=7, loc="lower right")
    b.hist(r["lifetime"].flatten().numpy(), bins=50, color="tab:orange", log=True)
    b.set_xlabel("steps a token stays in the multi-state (capped)")
    b.set_ylabel("tokens x layers (log)")
    b.set_title("how long tokens stay", fontsize=9)
    fig.suptitle(title, fontsize=9)
    labels = [(ax.get_xlabel(), ax.get_ylabel()) for ax in (a, b)]
    save_figure(fig, path)
    return labels


def kept_matrix(history):
    """[(step t, kept positions after step t)] -> bool tensor [positions, steps]: entry [p, t]
    says whether position p is in the multi-state H_t (steps that were not recorded stay empty)."""
    import torch

    steps = max(t for t, _ in history) + 1
    positions = max((max(kept) for _, kept in history if kept), default=0) + 1
    m = torch.zeros(positions, steps, dtype=torch.bool)
    for t, kept in history:
        m[torch.tensor(kept, dtype=torch.long), t] = True
    return m


def plot_multistate(kept, path: str, title: str, prompt: int | None = None,
                    window: int | None = None):
    """The multi-state as a picture (the paper's kind of figure): one panel per layer, x the
    step t, y the token j, in the paper's count from 1 (token x_j sits at position j - 1), a
    dark mark where j is in H_t. kept: {layer: bool [P, T]}, entry [p, t] for position p after
    the step at position t (see kept_matrix). The new token's own cell (j = t) is orange where
    it stays and red where it leaves at once. A window is a band along the diagonal; a kept
    token is a horizontal line. prompt: the prompt's length, drawn as a dashed line at its last
    step. window: a last panel with what Window(window) keeps over the same steps (the same in
    every layer; `Window.visible` says which positions it holds). Saved atomically; returns the
    panels' titles and the legend's labels."""
    import torch
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from ..policies import Window

    panels = {f"layer {layer}": m for layer, m in kept.items()}
    if window is not None:
        m = next(iter(kept.values()))
        P, T = m.shape
        p, t = torch.arange(P)[:, None], torch.arange(T)[None]
        held = (p <= t) & Window(window).visible(t + 1, p)       # H_t: what step t + 1 still sees
        panels[f"Window({window}), every layer"] = held & m.any(0)
    fig, axes = figure(1, len(panels), figsize=(min(4.2 * len(panels), 16), 4.2))
    axes = axes if len(panels) > 1 else [axes]
    colors = ["white", "#1f3b73", "tab:orange", "tab:red"]
    for ax, (name, m) in zip(axes, panels.items()):
        P, T = m.shape
        picture = m.long()
        steps = torch.arange(min(P, T))
        recorded = m[:, :len(steps)].any(0)                       # steps that were recorded
        new = picture[steps, steps]
        picture[steps, steps] = torch.where(recorded, torch.where(new > 0, 2, 3), new)
        ax.imshow(picture.numpy(), origin="lower", aspect="auto", interpolation="nearest",
                  cmap=ListedColormap(colors), vmin=0, vmax=3,
                  extent=(0.5, T + 0.5, 0.5, P + 0.5))
        if prompt is not None and prompt <= T:
            ax.axvline(prompt, color="tab:red", lw=0.8, ls="--", label="last prompt token")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step t")
        ax.set_ylabel("token j (dark: j in H_t, kept)")
        ax.set_xlim(0.5, T + 0.5)
        ax.set_ylim(0.5, P + 0.5)
    handles = [Patch(color=colors[1], label="kept: j in H_t"),
               Patch(color=colors[2], label="new token x_t (j = t), kept"),
               Patch(color=colors[3], label="new token x_t, evicted at once")]
    handles += axes[0].get_legend_handles_labels()[0]
    legend = axes[0].legend(handles=handles, fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
    return [ax.get_title() for ax in axes], [x.get_text() for x in legend.get_texts()]


def plot_layers(args, n_layers: int) -> list[int]:
    """The layers `--plot` draws: --layers, or the first, the middle and the last; [] without
    --plot. Checked before any work, and --plot's directory must exist."""
    if not args.plot:
        if args.layers:
            raise UsageError("--layers chooses the layers of --plot; give --plot FILE too")
        return []
    from ..paths import writable_file
    writable_file(args.plot, "--plot")
    if not args.layers:
        return sorted({0, n_layers // 2, n_layers - 1})
    try:
        layers = sorted({int(x) for x in args.layers.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--layers must be comma-separated layer numbers, got "
                         f"{args.layers!r}") from None
    if not layers or not all(0 <= l < n_layers for l in layers):
        raise UsageError(f"--layers must name layers in 0..{n_layers - 1}, got {args.layers!r}")
    return layers


def run_retention(args):
    from ..experiments import evaluate
    from ..experiments.sweep import Config
    from .. import load_tokenizer
    from ..policies import TOVA

    sizes = parse_list("--size", args.size, int)
    for k in sizes:
        if not 0 < k < args.context:
            raise UsageError(f"--size must be between 1 and --context - 1, got {k}")
    check_positive("--batch", args.batch)
    check_positive("--max-chunks", args.max_chunks, allow_none=True)
    check_positive("--batch-configs", args.batch_configs, allow_none=True)
    check_device(args.device, args.ray)
    check_workers(args)
    check_out_dir(args.out)
    directory, cfg = model_config(args.model)
    for k in sizes:
        check_reach(cfg, TOVA(k), args.positions, args.context, f"--context {args.context}",
                    k, args.past_range)
    layers = plot_layers(args, cfg.n_layers)
    read_texts(args.text)                             # exist, and are UTF-8 text
    tok = load_tokenizer(directory)
    chunks = evaluate.load_chunks(tok, args.text, args.context, args.max_chunks)

    def say(line):
        print(f"[msrnn retention] {line}", file=sys.stderr)

    n = batch_configs(args, cfg, min(args.batch, len(chunks)),
                      [Config("tova", k, TOVA(k)) for k in sizes],
                      args.context, say) if len(sizes) > 1 else 1

    def measure(model):                     # up to n sizes as the rows of one batch at a time
        return [r for i in range(0, len(sizes), n)
                for r in evaluate.retention(model, chunks, sizes[i:i + n], args.batch,
                                            record=layers, positions=args.positions,
                                            allow_past_range=args.past_range)]

    if args.ray is None:
        results = measure(loader(args, directory)())
    else:                                          # on one worker of the cluster
        from ..experiments import cluster
        results = cluster.call(loader(args, directory), measure, args.ray, workers(args)["gpu"])
    summaries = []
    for k, r in zip(sizes, results):
        one = "" if len(sizes) == 1 else f"-{k}"
        if args.plot:
            stem, ext = os.path.splitext(args.plot)
            plot_multistate(r["kept"], f"{stem}{one}{ext or '.png'}",
                            f"TOVA({k}), {os.path.basename(directory)}, first chunk of "
                            f"{args.context} tokens")
        summary = {"size": k, "context": args.context, "chunks": len(chunks),
                   "backend": args.backend, **evaluate.summarize_retention(r, chunks, tok)}
        if args.out:
            write_atomic(os.path.join(args.out, f"retention{one}.json"),
                         json.dumps(summary, indent=1))
            plot_retention(summary, r, os.path.join(args.out, f"retention{one}.png"),
                           f"TOVA({k}), {os.path.basename(directory)}, "
                           f"{len(chunks)} chunks x {args.context}")
        summaries.append(summary)
    if args.json:
        print(json.dumps(summaries[0] if len(sizes) == 1 else summaries))
        return 0
    for summary in summaries:
        print_retention(summary, len(chunks), args.context)
    return 0


def print_retention(summary, chunks: int, context: int):
    """One size's summary as the table a reader scans."""
    k = summary["size"]
    print(f"TOVA({k}) over {chunks} chunks of {context} tokens")
    print(f"first token kept after every step, in every layer and chunk: "
          f"{summary['first_kept_everywhere']}")
    print(f"share of kept states among the last {k} positions: {summary['recent']:.3f}")
    print("layer  first-kept  recent  mean-lifetime")
    for l in summary["layers"]:
        print(f"{l['layer']:5d}  {l['first_kept']:10.2f}  {l['recent']:6.3f}  "
              f"{l['mean_lifetime']:13.1f}")
    print("tokens kept longest on average (steps, over layers and occurrences):")
    for t in summary["longest_kept"]:
        print(f"  {t['token']!r:>16}  {t['mean_lifetime']:7.1f}  (x{t['count']})")

"""Long-range evaluation (the paper's Sec. 5 and 7): perplexity against multi-state size, and
which tokens TOVA keeps.

Perplexity: each text is tokenized and cut into non-overlapping chunks of `context` tokens (a
shorter remainder is dropped). Every chunk starts from an empty multi-state; tokens 2..N are
predicted, and

    ppl = exp(mean over all predicted tokens of all chunks of -log p(x_t | x_<t))

where p comes from the bounded MSRNN run exactly as DESIGN.md defines it (`sequential`).
"""

import hashlib
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import policies
from .cli import load_model
from .policies import Full, Window

# ----------------------------------------------------------------------------- data


def load_chunks(tok, files, context: int, max_chunks: int | None = None):
    """LongTensor [N, context]: each text's tokens cut into whole chunks (at most max_chunks per
    text), the remainder dropped."""
    chunks = []
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text file not found: {path}")
        with open(path, encoding="utf-8") as f:
            ids = tok.encode(f.read())
        n = len(ids) // context
        if n == 0:
            raise ValueError(f"{path} has {len(ids)} tokens, fewer than one chunk of --context "
                             f"{context}: use a longer text or a smaller context")
        n = min(n, max_chunks) if max_chunks else n
        chunks.append(torch.tensor(ids[: n * context]).view(n, context))
    return torch.cat(chunks)


# ----------------------------------------------------------------------------- perplexity


def token_nll(model, hidden, targets, piece: int = 256):
    """-log p(target) [B, n] from hidden states [B, n, C], a piece at a time (a [B, n, V] logits
    tensor for a whole chunk would take gigabytes)."""
    out = []
    for i in range(0, hidden.shape[1], piece):
        logits = model.logits(hidden[:, i:i + piece]).float()
        out.append(F.cross_entropy(logits.transpose(1, 2), targets[:, i:i + piece],
                                   reduction="none"))
    return torch.cat(out, 1)


@torch.inference_mode()
def chunk_nll(model, ids, policy) -> torch.Tensor:
    """-log p(x_t | x_<t) for t = 1..T-1 of chunks ids [B, T], each from an empty multi-state.

    Full, Window and Sinks keep states that do not depend on attention, so their whole chunk
    runs as one parallel pass, masked to what the policy keeps (Window.visible; tests check it
    equals stepping). Attention-based policies step, after one parallel pass over the first k+1
    tokens, which is exact (Transformer.prefill explains why)."""
    B, T = ids.shape
    if isinstance(policy, (Full, Window)):
        state = model.init_state(B, Full(), capacity=T)
        restrict = None if isinstance(policy, Full) else policy.visible
        return token_nll(model, model.hidden(ids, state, restrict)[:, :-1], ids[:, 1:])
    state = model.init_state(B, policy)
    n = min(T, policy.size + 1)
    hidden = model.hidden(ids[:, :n], state)
    nll = [token_nll(model, hidden[:, :-1], ids[:, 1:n])]
    logits = model.logits(hidden[:, -1])
    for t in range(n, T):
        nll.append(F.cross_entropy(logits.float(), ids[:, t], reduction="none")[:, None])
        if t < T - 1:
            logits, state = model.step(ids[:, t], state)
    return torch.cat(nll, 1)


def perplexity(model, chunks, policy, batch_size: int = 8, progress=None):
    """(ppl, predicted tokens) of `policy` over chunks [N, T], batch_size chunks at a time."""
    total, count = 0.0, 0
    for i in range(0, len(chunks), batch_size):
        nll = chunk_nll(model, chunks[i:i + batch_size].to(model.embed.weight.device), policy)
        total += nll.double().sum().item()
        count += nll.numel()
        if progress is not None:
            progress.update(len(chunks[i:i + batch_size]))
    return math.exp(total / count), count


def configurations(names: str, sizes: str, sinks: int | None, context: int):
    """[(name, size or None, Policy)] for every policy name and size; Full once."""
    try:
        size_list = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--sizes must be comma-separated integers, got {sizes!r}") from None
    out = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name == "full":
            out.append(("full", None, Full()))
            continue
        for size in size_list:
            if size >= context:
                raise ValueError(f"size {size} is not smaller than the context {context}: a "
                                 f"multi-state that large never evicts; use smaller --sizes")
            out.append((name, size, policies.from_name(name, size, sinks)))
    if not out:
        raise ValueError("no configuration to run: give --policies (and --sizes)")
    return out


# ----------------------------------------------------------------------------- results


def write_atomic(path: str, text: str):
    """Write a whole file or nothing: a temporary file in the same directory, then a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def figure(*grid, figsize):
    """A new matplotlib figure and its axes (plt.subplots), drawn off-screen."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*grid, figsize=figsize)


def save_figure(fig, path: str):
    """Save a matplotlib figure as PNG atomically (a temporary file, then a rename); close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, path)


class Results:
    """results.json (+ .csv, + ppl.png) in --out DIR: what has been computed, so a sweep that
    was interrupted resumes with what is missing. A DIR made with another setup is refused."""

    def __init__(self, directory: str | None, setup: dict):
        self.directory, self.setup, self.rows = directory, setup, []
        if directory is None:
            return
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved["setup"] != setup:
                raise ValueError(f"{path} holds results of another setup ({saved['setup']}); "
                                 f"use another --out directory")
            self.rows = saved["results"]

    def get(self, name, size):
        return next((r for r in self.rows if r["policy"] == name and r["size"] == size), None)

    def add(self, row: dict):
        self.rows.append(row)
        if self.directory is None:
            return
        write_atomic(os.path.join(self.directory, "results.json"),
                     json.dumps({"setup": self.setup, "results": self.rows}, indent=1))
        fields = ["policy", "size", "ppl", "tokens", "seconds"]
        lines = [",".join(fields)] + [",".join(str(r[k]) for k in fields) for r in self.rows]
        write_atomic(os.path.join(self.directory, "results.csv"), "\n".join(lines) + "\n")


def plot_ppl(rows, path: str, title: str):
    """The paper's Figure 3: perplexity against multi-state size (log2 x), one line per policy,
    the full model dashed."""
    fig, ax = figure(figsize=(6.5, 4.2))
    for name in dict.fromkeys(r["policy"] for r in rows if r["size"] is not None):
        pts = sorted((r["size"], r["ppl"]) for r in rows if r["policy"] == name)
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


def text_digest(files):
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def sweep(args, chunks, configs, log):
    """Yield (name, size, policy, ppl, tokens, seconds) for each configuration as it finishes.

    With --jobs N, N configurations run at once, each in its own process with its share of the
    CPU threads. A decode step with a few rows is bound by reading the weights, and the library's
    matrix multiply reads them barely faster with two threads than with one; two one-thread
    processes finish about 1.6x as many steps on two cores (docs/results.md)."""
    if args.jobs == 1:
        model = load_model(args)
        for name, size, policy in configs:
            start = time.perf_counter()
            with tqdm(total=len(chunks), desc=f"{name} {size or ''}".strip(), unit="chunk",
                      file=log, leave=False) as bar:
                ppl, tokens = perplexity(model, chunks, policy, args.batch, bar)
            yield name, size, policy, ppl, tokens, time.perf_counter() - start
        return
    threads = max(1, torch.get_num_threads() // args.jobs)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_start, initargs=(args, threads)) as pool:
        jobs = {pool.submit(_worker_run, policy, chunks, args.batch): (name, size, policy)
                for name, size, policy in configs}
        with tqdm(total=len(jobs), desc="configurations", file=log, leave=False) as bar:
            for job in as_completed(jobs):
                bar.update(1)
                yield (*jobs[job], *job.result())


_worker_model = None


def _worker_start(args, threads: int):
    global _worker_model
    torch.set_num_threads(threads)
    _worker_model = load_model(args)


def _worker_run(policy, chunks, batch_size):
    start = time.perf_counter()
    ppl, tokens = perplexity(_worker_model, chunks, policy, batch_size)
    return ppl, tokens, time.perf_counter() - start


def run_ppl(args):
    from . import load_tokenizer
    from .loading import resolve

    if args.context < 2:
        raise ValueError(f"--context must be at least 2, got {args.context}")
    if args.jobs < 1 or args.batch < 1:
        raise ValueError(f"--jobs and --batch must be at least 1, got {args.jobs}, {args.batch}")
    configs = configurations(args.policies, args.sizes, args.sinks, args.context)
    args.model = resolve(args.model)                       # a Hub repo id downloads once, here
    chunks = load_chunks(load_tokenizer(args.model), args.text, args.context, args.max_chunks)
    setup = {"model": os.path.abspath(args.model), "texts": [os.path.basename(t) for t in
             args.text], "digest": text_digest(args.text), "context": args.context,
             "max_chunks": args.max_chunks, "dtype": args.dtype,
             "sinks": 4 if args.sinks is None else args.sinks}
    results = Results(args.out, setup)
    log = sys.stderr
    todo = [c for c in configs if results.get(c[0], c[1]) is None]
    print(f"[msrnn ppl] {len(chunks)} chunks x {args.context} tokens, {len(configs)} "
          f"configurations, {len(configs) - len(todo)} done before", file=log)
    for name, size, policy, ppl, tokens, seconds in sweep(args, chunks, todo, log):
        results.add({"policy": name, "size": size, "ppl": ppl, "tokens": tokens,
                     "seconds": round(seconds, 2)})
        tqdm.write(f"[msrnn ppl] {policy}: ppl {ppl:.3f} over {tokens} tokens, "
                   f"{chunks.numel() / seconds:.0f} tok/s", file=log)
    rows = [results.get(name, size) for name, size, _ in configs]
    if args.out:
        plot_ppl(results.rows, os.path.join(args.out, "ppl.png"),
                 f"{os.path.basename(os.path.abspath(args.model))}, context {args.context}, "
                 f"{len(chunks)} chunks")
    if args.json:
        print(json.dumps([{k: r[k] for k in ("policy", "size", "ppl", "tokens")} for r in rows]))
    else:
        for r in rows:
            print(f"{r['policy']:>10} {str(r['size'] or '-'):>6} {r['ppl']:10.3f}")
    return 0


# ----------------------------------------------------------------------------- retention


@torch.inference_mode()
def retention(model, chunks, size: int, batch_size: int = 8, horizon: int | None = None):
    """Follow TOVA(size) over chunks [N, T] and measure, per layer, which states it keeps.

    Returns a dict of tensors:
      lifetime [L, N, T - horizon]  steps each token stayed in layer l's multi-state after it
                                    entered, capped at `horizon` (default T/2); only positions
                                    with a whole horizon ahead, so late tokens don't look short-lived
      first_kept [L, N]             whether position 0 was kept after every step
      recent [L]                    mean share of the kept states that are among the last `size`
                                    positions (what a window of the same size would hold), over
                                    the steps after the multi-state filled."""
    N, T = chunks.shape
    L, horizon = model.cfg.n_layers, horizon or T // 2
    lifetime = torch.zeros(L, N, T, dtype=torch.long)
    first_kept = torch.ones(L, N, dtype=torch.bool)
    recent = torch.zeros(L, dtype=torch.float64)
    for i in tqdm(range(0, N, batch_size), desc=f"retention TOVA({size})", unit="batch",
                  file=sys.stderr, leave=False):
        ids = chunks[i:i + batch_size].to(model.embed.weight.device)
        B = len(ids)
        state = model.init_state(B, policies.TOVA(size))
        model.prefill(ids[:, :size], state)        # the first `size` tokens: nothing leaves yet
        lifetime[:, i:i + B, :size] += size - torch.arange(size)
        for t in range(size, T):
            model.step(ids[:, t], state)
            pos = torch.stack([layer.pos[:, 0] for layer in state.layers]).cpu()  # [L, B, S]
            alive = torch.zeros(L, B, T + 1, dtype=torch.long)   # column 0 takes empty slots
            alive.scatter_(2, pos + 1, 1)
            alive = alive[:, :, 1:]
            lifetime[:, i:i + B] += alive
            first_kept[:, i:i + B] &= alive[:, :, 0].bool()
            recent += (pos > t - size).sum((1, 2)).double() / size
    return {"lifetime": lifetime.clamp(max=horizon)[:, :, :T - horizon],
            "first_kept": first_kept, "recent": recent / (N * (T - size))}


def summarize_retention(r, chunks, tok, top: int = 15, min_count: int = 5):
    """Per-layer numbers and the tokens kept longest on average (over layers and occurrences)."""
    lifetime = r["lifetime"].double()                        # [L, N, P]
    per_token = lifetime.mean(0).flatten()                    # [N * P], mean over layers
    ids = chunks[:, : lifetime.shape[2]].flatten()
    counts = torch.bincount(ids)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, ids, per_token)
    mean = torch.where(counts >= min_count, sums / counts.clamp(min=1), -1.0)
    best = [i for i in mean.argsort(descending=True)[:top].tolist() if mean[i] >= 0]
    return {
        "layers": [{"layer": l, "first_kept": r["first_kept"][l].double().mean().item(),
                    "recent": r["recent"][l].item(), "mean_lifetime": lifetime[l].mean().item()}
                   for l in range(lifetime.shape[0])],
        "first_kept_everywhere": bool(r["first_kept"].all()),
        "recent": r["recent"].mean().item(),
        "mean_lifetime": lifetime.mean().item(),
        "longest_kept": [{"token": tok.decode([i]), "id": i, "count": int(counts[i]),
                          "mean_lifetime": mean[i].item()} for i in best],
    }


def plot_retention(summary, r, path: str, title: str):
    layers = summary["layers"]
    fig, (a, b) = figure(1, 2, figsize=(10, 3.8))
    a.bar([l["layer"] for l in layers], [l["recent"] for l in layers], color="tab:blue",
          label="share of kept states that are recent")
    a.plot([l["layer"] for l in layers], [l["first_kept"] for l in layers], "k^",
           label="first token kept throughout (share of chunks)")
    a.set_ylim(0, 1.05)
    a.set_xlabel("layer")
    a.legend(fontsize=7, loc="lower right")
    b.hist(r["lifetime"].flatten().numpy(), bins=50, color="tab:orange", log=True)
    b.set_xlabel("steps a token stays in the multi-state (capped)")
    b.set_ylabel("tokens x layers")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def run_retention(args):
    from . import load_tokenizer

    if not 0 < args.size < args.context:
        raise ValueError(f"--size must be between 1 and --context - 1, got {args.size}")
    model = load_model(args)
    tok = load_tokenizer(model.source)
    chunks = load_chunks(tok, args.text, args.context, args.max_chunks)
    r = retention(model, chunks, args.size, args.batch)
    summary = {"size": args.size, "context": args.context, "chunks": len(chunks),
               **summarize_retention(r, chunks, tok)}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_atomic(os.path.join(args.out, "retention.json"), json.dumps(summary, indent=1))
        plot_retention(summary, r, os.path.join(args.out, "retention.png"),
                       f"TOVA({args.size}), {os.path.basename(model.source)}, "
                       f"{len(chunks)} chunks x {args.context}")
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"TOVA({args.size}) over {len(chunks)} chunks of {args.context} tokens")
    print(f"first token kept after every step, in every layer and chunk: "
          f"{summary['first_kept_everywhere']}")
    print(f"share of kept states among the last {args.size} positions: {summary['recent']:.3f}")
    print("layer  first-kept  recent  mean-lifetime")
    for l in summary["layers"]:
        print(f"{l['layer']:5d}  {l['first_kept']:10.2f}  {l['recent']:6.3f}  "
              f"{l['mean_lifetime']:13.1f}")
    print("tokens kept longest on average (steps, over layers and occurrences):")
    for t in summary["longest_kept"]:
        print(f"  {t['token']!r:>16}  {t['mean_lifetime']:7.1f}  (x{t['count']})")
    return 0


def add_commands(commands):
    from .cli import add_device_args, add_policy_args

    p = commands.add_parser("ppl", help="perplexity against multi-state size (paper Fig. 3)")
    p.add_argument("model")
    p.add_argument("--text", nargs="+", required=True, help="text files")
    p.add_argument("--context", type=int, default=2048, help="tokens per chunk")
    add_policy_args(p, multiple=True)
    p.add_argument("--max-chunks", type=int, help="at most this many chunks per text")
    p.add_argument("--batch", type=int, default=8, help="chunks per batch")
    p.add_argument("--jobs", type=int, default=1, help="configurations run at once, each in its "
                   "own process (2 is fastest on a 2-core CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--out", help="directory for results.json/.csv and ppl.png (resumable)")
    add_device_args(p)
    p.set_defaults(run=run_ppl)

    r = commands.add_parser("retention", help="which tokens TOVA keeps, and for how long")
    r.add_argument("model")
    r.add_argument("--text", nargs="+", required=True)
    r.add_argument("--context", type=int, default=2048)
    r.add_argument("--size", type=int, default=256)
    r.add_argument("--max-chunks", type=int)
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--json", action="store_true")
    r.add_argument("--out", help="directory for retention.json and retention.png")
    add_device_args(r)
    r.set_defaults(run=run_retention)

"""Long-range evaluation (the paper's Sec. 5 and 7): perplexity against multi-state size, and
which tokens TOVA keeps. Functions of models, policies and token ids that return numbers; the
command line (`msrnn ppl`, `msrnn retention`: files, plots, printing) is msrnn/cli/evaluate.py.

Perplexity: each text is tokenized and cut into non-overlapping chunks of `context` tokens (a
shorter remainder is dropped). Every chunk starts from an empty multi-state; tokens 2..N are
predicted, and

    ppl = exp(mean over all predicted tokens of all chunks of -log p(x_t | x_<t))

where p comes from the bounded MSRNN run exactly as docs/design.md defines it (`sequential`).
A context may pass the model's range for a bounded policy whose states are renumbered
(positions "cache" or "compressed", msrnn.positions), or with allow_past_range; the loss of each
block of positions (`buckets`) then shows how a scheme holds up along the way.
"""

import math
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import policies
from ..backend import compile_seconds
from ..prompt import Mode, prefill
from .text import read_text

# ----------------------------------------------------------------------------- data


def load_chunks(tok, files, context: int, max_chunks: int | None = None):
    """LongTensor [N, context]: each text's tokens cut into whole chunks (at most max_chunks per
    text), the remainder dropped."""
    chunks = []
    for path in files:
        ids = tok.encode(read_text(path))
        n = len(ids) // context
        if n == 0:
            raise ValueError(f"{path} has {len(ids)} tokens, fewer than one chunk of --context "
                             f"{context}: use a longer text or a smaller context")
        n = min(n, max_chunks) if max_chunks else n
        chunks.append(torch.tensor(ids[: n * context]).view(n, context))
    return torch.cat(chunks)


# ----------------------------------------------------------------------------- perplexity


def token_nll(model, hidden, targets, cells: int = 512):
    """-log p(target) [B, n] from hidden states [B, n, E], a piece of rows x positions at a
    time: at most `cells` row-positions' logits at once. A row-position's loss holds about three
    float32 rows of the vocabulary at its peak (measured: 565 KB for the default model's 49,152
    tokens), so a whole [B, n, V] would take gigabytes, 512 cells take 300 MB, and 2,048 cells
    ran no faster (the same losses, bit for bit)."""
    B, n = targets.shape
    rows = max(1, min(B, cells // 256))
    piece = max(1, min(n, cells // rows))
    out = []
    for b in range(0, B, rows):
        line = []
        for i in range(0, n, piece):
            logits = model.logits(hidden[b:b + rows, i:i + piece]).float()
            line.append(F.cross_entropy(logits.transpose(1, 2), targets[b:b + rows, i:i + piece],
                                        reduction="none"))
        out.append(torch.cat(line, 1))
    return torch.cat(out)


@torch.inference_mode()
def chunk_nll(model, ids, policy, positions="original", allow_past_range=False) -> torch.Tensor:
    """-log p(x_t | x_<t) for t = 1..T-1 of chunks ids [B, T], each from an empty multi-state
    numbered by the scheme `positions`, run as the `sequential` prompt of docs/design.md
    (msrnn.prompt decides what runs in parallel and what steps; the chunks are the rows of one
    batch; `policy`: one, or one per row). `model`: any backend (msrnn's decoder, its compiled
    step, msrnn.hf.HFBackend)."""
    B, T = ids.shape
    state = model.init_state(B, policy, capacity=T,
                             positions=positions, allow_past_range=allow_past_range)
    hidden, _ = prefill(model, ids, state, mode=Mode.SEQUENTIAL, logits=False)
    return token_nll(model, hidden[:, :-1], ids[:, 1:])


def position_nll(model, chunks, policy, batch_size: int = 8, progress=None,
                 positions="original", allow_past_range=False) -> torch.Tensor:
    """The loss summed over chunks [N, T] at each predicted position 1..T-1: float64 [T - 1]
    (divide by N for the mean), batch_size chunks at a time, on any backend. `policy` a list:
    several configurations at once, as the rows of one batch (batch_size chunks for each, rows
    grouped by configuration): [len(policy), T - 1], one line per policy."""
    many = isinstance(policy, (list, tuple))
    group = list(policy) if many else [policy]
    total = torch.zeros(len(group), chunks.shape[1] - 1, dtype=torch.float64)
    for i in range(0, len(chunks), batch_size):
        rows = chunks[i:i + batch_size].to(model.shape.device)
        b = len(rows)
        every = [p for p in group for _ in range(b)] if many else policy
        nll = chunk_nll(model, rows.repeat(len(group), 1), every, positions, allow_past_range)
        total += nll.double().view(len(group), b, -1).sum(1).cpu()
        if progress is not None:
            progress.update(b)
    return total if many else total[0]


def perplexity(model, chunks, policy, batch_size: int = 8, progress=None,
               positions="original", allow_past_range=False):
    """(ppl, predicted tokens) of `policy` over chunks [N, T], batch_size chunks at a time, on
    any backend."""
    total = position_nll(model, chunks, policy, batch_size, progress, positions,
                         allow_past_range)
    count = len(chunks) * total.numel()
    return math.exp(total.sum().item() / count), count


def buckets(total, chunks: int, width: int) -> list:
    """[[start, end, ppl], ...]: the perplexity of the tokens at positions start..end-1 (blocks
    of `width` positions from 1, the first predicted), from position_nll's sums over `chunks`."""
    out = []
    for start in range(1, len(total) + 1, width):
        block = total[start - 1:start - 1 + width]
        out.append([start, start + len(block), math.exp(block.sum().item() / (chunks *
                                                                               len(block)))])
    return out


def sweep_work(chunks, batch_size: int, width: int, allow_past_range: bool, progress: bool,
               model, cell, configs):
    """A perplexity sweep's work (experiments.sweep): the configurations together, as the rows
    of one batch (one scheme; the harness groups them), each over every chunk; yields (config,
    row, line) with its perplexity and that of each block of `width` positions. `seconds` is
    the batch's time shared equally, less what a compiled step spent compiling
    (`compile_seconds`)."""
    start, compiled = time.perf_counter(), compile_seconds(model)
    names = ", ".join(f"{c.name} {c.size or ''}".strip() for c in configs)
    with tqdm(total=len(chunks), desc=f"{names} {configs[0].positions}", unit="chunk",
              file=sys.stderr, leave=False, disable=not progress) as bar:
        losses = position_nll(model, chunks, [c.policy for c in configs], batch_size, bar,
                              configs[0].positions, allow_past_range)
    compiling = compile_seconds(model) - compiled
    seconds = (time.perf_counter() - start - compiling) / len(configs)
    tokens = len(chunks) * losses.shape[1]
    for c, loss in zip(configs, losses):
        ppl = math.exp(loss.sum().item() / tokens)
        yield c, {"ppl": ppl, "tokens": tokens, "seconds": round(seconds, 2),
                  "compile_seconds": round(compiling / len(configs), 2),
                  "batched": len(configs), "buckets": buckets(loss, len(chunks), width)}, \
            f"{c.policy}, positions {c.positions}: ppl {ppl:.3f} over {tokens} tokens, " \
            f"{chunks.numel() / seconds:.0f} tok/s" + \
            (f" ({len(configs)} together)" if len(configs) > 1 else "") + \
            (f", compiled in {compiling:.1f} s" if compiling else "")


# ----------------------------------------------------------------------------- retention


@torch.inference_mode()
def retention(model, chunks, size, batch_size: int = 8, horizon: int | None = None,
              record: list[int] | None = None, positions="original",
              allow_past_range: bool = False):
    """Follow TOVA(size) over chunks [N, T] on any backend, its states numbered by the scheme
    `positions`, and measure, per layer, which states it keeps.

    Returns a dict of tensors:
      lifetime [L, N, T - horizon]  steps each token stayed in layer l's multi-state after it
                                    entered, capped at `horizon` (default T/2); only positions
                                    with a whole horizon ahead, so late tokens don't look short-lived
      first_kept [L, N]             whether position 0 was kept after every step
      recent [L]                    mean share of the kept states that are among the last `size`
                                    positions (what a window of the same size would hold), over
                                    the steps after the multi-state filled.
      kept {l: bool [T, T]}         only for the layers in `record`: the multi-state as a picture
                                    for the first chunk, [p, t] = position p is in H^l_t (the
                                    matrix msrnn.cli.evaluate.plot_multistate draws).

    `size` a list: several sizes at once, as the rows of one batch (batch_size chunks for each,
    a policy per row); then a list of those dicts, one per size."""
    sizes = list(size) if isinstance(size, (list, tuple)) else [size]
    N, T = chunks.shape
    P, L, horizon = len(sizes), model.shape.layers, horizon or T // 2
    lifetime = torch.zeros(P, L, N, T, dtype=torch.long)
    first_kept = torch.ones(P, L, N, dtype=torch.bool)
    recent = torch.zeros(P, L, dtype=torch.float64)
    record = list(record or [])
    kept = [{l: torch.zeros(T, T, dtype=torch.bool) for l in record} for _ in sizes]
    for s, k in enumerate(sizes):         # the first k steps keep every position so far
        for l in record:
            kept[s][l][:k, :k] = torch.ones(k, k, dtype=torch.bool).tril().T
    first = min(sizes)
    for i in tqdm(range(0, N, batch_size), desc=f"retention TOVA({', '.join(map(str, sizes))})",
                  unit="batch", file=sys.stderr, leave=False):
        ids = chunks[i:i + batch_size].to(model.shape.device)
        B = len(ids)
        state = model.init_state(P * B, [policies.TOVA(k) for k in sizes for _ in range(B)],
                                 positions=positions, allow_past_range=allow_past_range)
        prefill(model, ids[:, :first].repeat(P, 1), state, logits=False)  # nothing leaves yet
        lifetime[:, :, i:i + B, :first] += first - torch.arange(first)
        for t in range(first, T):
            model.step(ids[:, t].repeat(P), state)
            pos = torch.stack([layer.pos[:, 0] for layer in state.layers]).cpu()  # [L, PB, S]
            alive = torch.zeros(L, P * B, T + 1, dtype=torch.long)  # column 0 takes empty slots
            alive.scatter_(2, pos + 1, 1)
            alive = alive[:, :, 1:].view(L, P, B, T).transpose(0, 1)          # [P, L, B, T]
            lifetime[:, :, i:i + B] += alive
            first_kept[:, :, i:i + B] &= alive[..., 0].bool()
            for s, k in enumerate(sizes):
                if t >= k:                    # a window of k: what it would hold
                    recent[s] += (pos[:, s * B:(s + 1) * B] > t - k).sum((1, 2)).double() / k
                if i == 0:
                    for l in record:
                        kept[s][l][:, t] = alive[s, l, 0].bool()
    out = []
    for s, k in enumerate(sizes):
        one = {"lifetime": lifetime[s].clamp(max=horizon)[:, :, :T - horizon],
               "first_kept": first_kept[s], "recent": recent[s] / (N * (T - k))}
        if record:
            one["kept"] = kept[s]
        out.append(one)
    return out if isinstance(size, (list, tuple)) else out[0]


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

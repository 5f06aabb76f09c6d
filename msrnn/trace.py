"""The worked trace of docs/msrnn.md: a bounded multi-state of size k = 3 over six steps, computed
by the library itself, so that the page cannot drift from the code.

Time follows the paper: step t = 1, 2, ... reads token x_t, H_0 is empty, and H_t is the set of
tokens j (x_j) a layer keeps after step t. The code counts positions from 0: token x_j sits at
position j - 1 (`pos`, RoPE's angle), so this module adds 1 to every position it reports.

One layer, head dimension D = 16, two KV heads and four query heads: query heads 0 and 1 read
KV head 0, query heads 2 and 3 read KV head 1 (GQA with G = 2). The attention logits
q_{t,h} · K_j / sqrt(D) are set by hand (LOGITS[t - 1][h][j - 1]): in both KV heads the key of
token j is the unit vector e_j, and the query of head h at step t is sqrt(D) times its row of
LOGITS, so that query head h's attention is exactly the softmax of its row over the candidates
its KV head holds. Everything else is the real step, `attention.step`: `LayerState.insert`
writes the new token into the free slot, `attention.probabilities` masks the empty slots
(`visible`), `LayerState.evict` asks the policy (`TOVA`, `Window`, `Sinks`, `H2O`) and empties
the slot of the lowest score, the oldest on ties.

    python -m msrnn.trace        # prints the tables docs/msrnn.md shows (tests/test_teaching.py
                                 # checks that the page holds them verbatim)
"""

import torch

from . import attention as multistate
from .policies import H2O, TOVA, Policy, Sinks, Window
from .state import LayerState, average

K = 3                      # the multi-state size k
D = 16                     # head dimension (a power of 4, so that sqrt(D) is exact)
HQ, HKV = 4, 2             # query heads, KV heads: query head h reads KV head h // (HQ // HKV)
# LOGITS[t - 1][h][j - 1]: query head h's score q_{t,h} · K_j / sqrt(D) at step t, for j <= t.
LOGITS = [
    [[0.0]] * HQ,                                          # t = 1
    [[2.0, 0.0], [1.5, 0.0], [1.0, 0.5], [1.5, 0.0]],      # t = 2
    [[1.0, -1.0, 1.0], [1.0, -1.0, 0.5], [1.0, 0.5, -0.5], [0.5, 0.0, 0.5]],  # t = 3
    # t = 4: KV head 0's query heads attend least to token 2, KV head 1's to token 4; the mean
    # over all four is lowest at token 3, which neither KV head's group ranks last.
    [[2.0, -1.0, 0.0, 1.5], [2.0, 0.0, 0.0, 0.5],
     [2.0, 1.5, 0.0, -1.0], [2.0, 0.5, 0.0, -0.5]],
    # t = 5: the new token draws least in every head.
    [[2.0, 1.0, 0.0, 1.5, -1.0], [2.0, 1.0, 0.5, 1.0, -0.5],
     [2.0, 1.0, 0.0, 1.0, -1.0], [1.5, 1.0, 0.5, 1.0, -0.5]],
    # t = 6: tokens 2 and 4 have the same logits in every head: they tie.
    [[2.0, 0.5, 0.0, 0.5, 0.0, 1.0], [2.0, 0.0, 0.5, 0.0, 1.0, 1.0],
     [2.0, 0.5, 1.0, 0.5, 0.0, 1.0], [1.0, 0.0, 0.5, 0.0, 0.5, 1.0]],
]
POLICIES = {"TOVA": lambda: TOVA(K), "TOVA-head": lambda: TOVA(K, per_head=True),
            "Window": lambda: Window(K), "Window+1": lambda: Sinks(K, sinks=1),
            "H2O": lambda: H2O(K)}


def run(policy: Policy, logits=LOGITS):
    """Step `policy`'s multi-state through the steps of `logits`. One dict per step t = 1, 2, ...,
    lists per KV head (kv = 0, 1) where the heads may differ:
      slots      [kv][slot]    the token j each slot holds after the insert (None: empty)
      attention  [h][slot]     query head h's attention a_{t,h} to each slot
      score      [kv][slot]    what the policy ranked by: TOVA's mean attention over the heads
                               that share the choice (all four, or the KV head's two), H2O's
                               accumulated acc; None for Window
      evicted    [kv]          the token evicted (None: nothing left, the multi-state was filling)
      kept       [kv]          H_t, ascending"""
    state = LayerState(policy, batch=1, n_kv=HKV, slots=policy.size + 1, head_dim=D,
                       dtype=torch.float32, device="cpu")
    steps = []
    for t, rows in enumerate(logits, start=1):
        position = t - 1                                           # x_t sits at position t - 1
        key = torch.zeros(1, HKV, 1, D)
        key[..., position] = 1.0                                   # K_t = e_t in both KV heads
        q = torch.zeros(1, HQ, 1, D)
        q[0, :, 0, :t] = torch.tensor(rows) * D ** 0.5             # q_{t,h} · K_j / sqrt(D)
        q = q.view(1, HKV, HQ // HKV, 1, D)                        # grouped by KV head
        before = state.pos[0].tolist()
        slots = [[p + 1 if p >= 0 else None for p in head] for head in before]
        for head in slots:
            head[head.index(None)] = t                             # where insert puts x_t
        _, probs = multistate.step(state, q, key, key.clone(), torch.tensor([[[position]]]),
                                   D ** -0.5)
        attention = probs[0, :, :, 0].reshape(HQ, -1).tolist()     # [h][slot]
        if "acc" in state.memory:     # H2O's sums, this step's attention added (an evicted
            score = state.memory["acc"][0].tolist()   # slot keeps its value until reused)
        elif policy.reads:
            score = average(probs[:, :, :, 0], policy).expand(1, HKV, -1)[0].tolist()
        else:
            score = None
        after = state.pos[0].tolist()
        evicted, kept = [], []
        for head, now in zip(slots, after):
            gone = [j for j, p in zip(head, now) if j is not None and p != j - 1]
            evicted.append(gone[0] if gone else None)
            kept.append(sorted(p + 1 for p in now if p >= 0))
        steps.append({"t": t, "slots": slots, "attention": attention, "score": score,
                      "evicted": evicted, "kept": kept})
    return steps


def _set(tokens):
    return "{" + ", ".join(map(str, tokens)) + "}" if tokens else "∅"


def tova_table(steps) -> str:
    """The TOVA trace as a Markdown table: slots, the mean attention ā_t per candidate (over all
    query heads: TOVA makes one choice per layer), eviction, H_t."""
    lines = ["| t | slots after the insert: token j (ā_t(j)) | \\|C\\| | evicted e | H_t |",
             "|---|---|---|---|---|",
             f"| 0 | {', '.join(['empty'] * (K + 1))} | — | — | {_set([])} |"]
    for s in steps:
        slots, score, e = s["slots"][0], s["score"][0], s["evicted"][0]
        cells = [f"{j} ({a:.2f})" if j is not None else "empty" for j, a in zip(slots, score)]
        n = sum(j is not None for j in slots)
        if e is None:
            gone = "nothing (filling: \\|C\\| ≤ k)"
        else:
            a = score[slots.index(e)]
            ties = [j for j, b in zip(slots, score) if j is not None and j != e and b == a]
            gone = f"**{e}**"
            if e == s["t"]:
                gone += ", the new token itself"
            if ties:
                gone += f", tied with {', '.join(map(str, ties))}: the oldest leaves"
        lines.append(f"| {s['t']} | {', '.join(cells)} | {n} | {gone} | {_set(s['kept'][0])} |")
    return "\n".join(lines)


def heads_table(runs, t: int) -> str:
    """Step t head by head: each query head's attention to each candidate, the means TOVA-head
    ranks by (one per KV head, over its query group) and the one TOVA ranks by (over all four),
    and what each evicts. At this step all policies hold the same candidates."""
    s, per_head = runs["TOVA"][t - 1], runs["TOVA-head"][t - 1]
    slots = s["slots"][0]
    group = HQ // HKV
    heads = [", ".join(str(h) for h in range(kv * group, (kv + 1) * group)) for kv in range(HKV)]
    lines = ["| token j | " + " | ".join(f"head {h}" for h in range(HQ)) + " | "
             + " | ".join(f"KV head {kv} (heads {heads[kv]})" for kv in range(HKV))
             + f" | all {HQ} heads |",
             "|---|" + "---|" * (HQ + HKV + 1)]
    for i in sorted(range(len(slots)), key=lambda i: slots[i]):
        a = [s["attention"][h][i] for h in range(HQ)]
        means = [per_head["score"][kv][per_head["slots"][kv].index(slots[i])]
                 for kv in range(HKV)] + [s["score"][0][i]]
        lines.append(f"| {slots[i]} | " + " | ".join(f"{x:.2f}" for x in a + means) + " |")
    cells = ["evicted"] + ["—"] * HQ + [f"**{e}** (TOVA-head)" for e in per_head["evicted"]]
    lines.append("| " + " | ".join(cells + [f"**{s['evicted'][0]}** (TOVA)"]) + " |")
    return "\n".join(lines)


def _cell(s, kv, why):
    e = s["evicted"][kv]
    if e is None:
        return f"— → {_set(s['kept'][kv])}"
    if why:
        slot = s["slots"][kv].index(e)
        why = f" ({why} = {s['score'][kv][slot]:.2f})"
    return f"{e}{why} → {_set(s['kept'][kv])}"


def comparison_table(runs, columns) -> str:
    """What each policy evicts at each step, each on its own multi-state over the same logits;
    columns: [(heading, policy name, KV head, what its score is called or "")]."""
    lines = ["| t | " + " | ".join(c[0] for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for t in range(1, len(LOGITS) + 1):
        row = [_cell(runs[name][t - 1], kv, why) for _, name, kv, why in columns]
        lines.append(f"| {t} | " + " | ".join(row) + " |")
    return "\n".join(lines)


LAYER_AGAINST_HEAD = [("TOVA (one choice per layer)", "TOVA", 0, "ā"),
                      ("TOVA-head, KV head 0", "TOVA-head", 0, "ā"),
                      ("TOVA-head, KV head 1", "TOVA-head", 1, "ā")]
OTHERS = [("Window", "Window", 0, ""), ("Window+1", "Window+1", 0, ""),
          ("H2O, KV head 0", "H2O", 0, "acc"), ("H2O, KV head 1", "H2O", 1, "acc")]


def tables() -> list[str]:
    """The four tables docs/msrnn.md holds: TOVA's trace, step 4 head by head, TOVA against
    TOVA-head, the other policies."""
    runs = {name: run(make()) for name, make in POLICIES.items()}
    return [tova_table(runs["TOVA"]), heads_table(runs, 4),
            comparison_table(runs, LAYER_AGAINST_HEAD), comparison_table(runs, OTHERS)]


if __name__ == "__main__":
    print("\n\n".join(tables()))

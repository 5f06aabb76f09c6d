"""The worked trace of docs/msrnn.md: a bounded multi-state of size k = 3 over six steps, computed
by the library itself, so that the page cannot drift from the code.

One layer, one KV head, one query head, head dimension D = 16. The attention logits
q_t · K_p / sqrt(D) are set by hand (LOGITS[t][p]): the key of position p is the unit vector
e_p and the query of step t is sqrt(D) times row t of LOGITS, so the attention is exactly
softmax(LOGITS[t][p] for the candidates p). Everything else is the real step, `attention.step`:
`LayerState.insert` writes the new token into the free slot, `attention.probabilities` masks
the empty slots (`visible`), `LayerState.evict` asks the policy (`TOVA`, `Window`, `Sinks`,
`H2O`) and empties the slot of the lowest score, oldest on ties.

    python -m msrnn.trace        # prints the two tables docs/msrnn.md shows (tests/test_teaching.py
                                 # checks that the page holds them verbatim)
"""

import torch

from . import attention as multistate
from .policies import H2O, TOVA, Policy, Sinks, Window
from .state import LayerState

K = 3                      # the multi-state size k
D = 16                     # head dimension (a power of 4, so that sqrt(D) is exact)
# LOGITS[t][p]: the score q_t · K_p / sqrt(D) of step t's query for position p <= t.
LOGITS = [
    [0.0],
    [1.0, 0.0],
    [1.0, -0.5, 0.5],
    [2.0, 1.0, -0.5, 1.0],                 # t = 3: position 2 draws least (an ordinary eviction)
    [2.0, 1.0, 0.0, 1.5, -1.0],            # t = 4: the new token itself draws least
    [2.0, 0.5, 0.0, 0.5, 0.0, 1.0],        # t = 5: positions 1 and 3 tie (the oldest leaves)
]
POLICIES = {"TOVA": lambda: TOVA(K), "Window": lambda: Window(K),
            "Window+1": lambda: Sinks(K, sinks=1), "H2O": lambda: H2O(K)}


def run(policy: Policy, logits=LOGITS):
    """Step `policy`'s multi-state through the rows of `logits`; one dict per step t:
    slots (the position each slot holds after the insert, -1 empty), attention (per slot),
    evicted (a position, or None), kept (H_t, ascending), and H2O's accumulated score A per slot."""
    state = LayerState(policy, batch=1, n_kv=1, slots=policy.size + 1, head_dim=D,
                       dtype=torch.float32, device="cpu")
    steps = []
    for t, row in enumerate(logits):
        key = torch.zeros(1, 1, 1, D)
        key[..., t] = 1.0                                          # K_t = e_t
        q = torch.zeros(1, 1, 1, 1, D)
        q[..., : t + 1] = torch.tensor(row) * D ** 0.5             # q_t · K_p / sqrt(D) = row[p]
        slots = state.pos[0, 0].tolist()
        slots[slots.index(-1)] = t                                 # where insert puts t
        _, probs = multistate.step(state, q, key, key.clone(), torch.tensor([[[t]]]), D ** -0.5)
        attention = probs[0, 0, 0, 0].tolist()                     # [S]: a over C, per slot
        after = state.pos[0, 0].tolist()
        gone = [p for p, q_ in zip(slots, after) if p >= 0 and q_ != p]
        # H2O's A per slot, after this step's attention was added (an evicted state's slot
        # keeps its value until the next insert overwrites it).
        acc = state.memory["acc"][0, 0].tolist() if "acc" in state.memory else None
        steps.append({"t": t, "slots": slots, "attention": attention,
                      "evicted": gone[0] if gone else None,
                      "kept": sorted(p for p in after if p >= 0), "acc": acc})
    return steps


def _set(positions):
    return "{" + ", ".join(map(str, positions)) + "}"


def tova_table(steps) -> str:
    """The TOVA trace as a Markdown table: slots, attention per candidate, eviction, H_t."""
    lines = ["| t | slots after the insert: position (attention a_t) | \\|C\\| | evicted e | H_t |",
             "|---|---|---|---|---|"]
    for s in steps:
        cells = [f"{p} ({a:.2f})" if p >= 0 else "empty" for p, a in zip(s["slots"],
                                                                        s["attention"])]
        n = sum(p >= 0 for p in s["slots"])
        e = s["evicted"]
        if e is None:
            gone = "nothing (filling: \\|C\\| ≤ k)"
        else:
            a = s["attention"][s["slots"].index(e)]
            ties = [p for p, b in zip(s["slots"], s["attention"]) if p >= 0 and p != e and b == a]
            gone = f"**{e}**"
            if e == s["t"]:
                gone += ", the new token itself"
            if ties:
                gone += f", tied with {', '.join(map(str, ties))}: the oldest leaves"
        lines.append(f"| {s['t']} | {', '.join(cells)} | {n} | {gone} | {_set(s['kept'])} |")
    return "\n".join(lines)


def comparison_table(runs) -> str:
    """What each policy evicts at each step, each on its own run over the same logits."""
    names = list(runs)
    lines = ["| t | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in range(len(LOGITS)):
        row = []
        for name in names:
            s = runs[name][t]
            if s["evicted"] is None:
                row.append(f"— → {_set(s['kept'])}")
                continue
            slot, why = s["slots"].index(s["evicted"]), ""
            if name == "TOVA":
                why = f" (a = {s['attention'][slot]:.2f})"
            elif name == "H2O":
                why = f" (A = {s['acc'][slot]:.2f})"
            row.append(f"{s['evicted']}{why} → {_set(s['kept'])}")
        lines.append(f"| {t} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def tables() -> str:
    """Both tables, as docs/msrnn.md holds them."""
    runs = {name: run(make()) for name, make in POLICIES.items()}
    return tova_table(runs["TOVA"]) + "\n\n" + comparison_table(runs)


if __name__ == "__main__":
    print(tables())

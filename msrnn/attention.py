"""The step of a multi-state, written once: attention over the states a layer keeps, one decode
step (insert, attend, evict) and the prompt pass (Oren et al., 2024, Eq. 4-9).

Both backends call these functions with the same tensors: msrnn's decoder (model.Attention) and
transformers' attention modules (msrnn.hf), after each has made and rotated its own q, k and v.
Neither holds a copy of the semantics, so a rule changes in one place for both.

Shapes: B batch, Hkv KV heads, G query heads per KV head, T tokens of this call, S slots, D head
dim. Queries come grouped by KV head, q [B, Hkv, G, T, D], so that the G query heads of a group
share one matrix product with their KV head's keys (GQA). Positions are per row: t [B, 1, 1] for
a step, pos [B, T] for a prompt, -1 marks a pad (a token that is neither a state nor attended).
"""

import torch
import torch.nn.functional as F

from .state import LayerState


def visible(q_pos, k_pos, window: int | None = None):
    """Which keys each query may attend to: a filled slot (pos >= 0), not in the future, and,
    for checkpoints with a sliding window (Mistral), fewer than `window` positions back."""
    ok = (k_pos >= 0) & (k_pos <= q_pos)
    if window is not None:
        ok = ok & (q_pos - k_pos < window)
    return ok


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype attention computes in: at least float32. A bfloat16 model's scores and weighted
    values are computed from its bfloat16 q, K and V widened to float32: more exact, and faster
    too, since the library's bfloat16 products of these small shapes are slower on a CPU than
    its float32 ones (the compiled bfloat16 step: docs/performance.md, section 7)."""
    return torch.promote_types(dtype, torch.float32)


def probabilities(q, keys, mask, scale: float, softcap: float | None = None):
    """a = softmax(q · K * scale) over the visible keys (Eq. 4), [B, Hkv, G, T, S], in at least
    float32; Gemma2's soft-cap, cap * tanh(score / cap), where a model has one. q [B, Hkv, G, T,
    D], keys [B, Hkv, S, D], mask broadcastable to the result. A row that sees nothing (a pad's)
    is all zeros."""
    B, Hkv, G, T, D = q.shape
    q, keys = q.to(wide(q.dtype)), keys.to(wide(keys.dtype))
    scores = (q.reshape(B, Hkv, G * T, D) @ keys.transpose(-1, -2)).view(B, Hkv, G, T, -1)
    scores = scores * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, -torch.inf)
    return scores.softmax(-1).nan_to_num(0.0)


def weighted(probs, values):
    """o_h = sum_j a_h(j) V_j (Eq. 7 before W_o): probs [B, Hkv, G, T, S], values [B, Hkv, S, D] ->
    [B, Hkv, G, T, D] in the values' dtype, summed in at least float32."""
    B, Hkv, G, T, S = probs.shape
    w = wide(values.dtype)
    y = probs.to(w).view(B, Hkv, G * T, S) @ values.to(w)
    return y.view(B, Hkv, G, T, -1).to(values.dtype)


def step(state: LayerState, q, k, v, t, scale: float, softcap=None, window=None):
    """One token per row against layer l's multi-state, (x_t, H^l_{t-1}) -> (o_t, H^l_t):

        C = H^l_{t-1} ∪ {t}                       (Eq. 6)   state.insert
        a_h = softmax(q_h · K_C * scale)          (Eq. 4)   probabilities
        o = sum_j a_h(j) V_j                      (Eq. 7)   weighted
        H^l_t = C \\ {e}  if |C| > k               (Eq. 9)   state.evict (the policy scores)

    q [B, Hkv, G, 1, D] and k [B, Hkv, 1, D] rotated by RoPE at t; v [B, Hkv, 1, D] (k and v:
    the new token's key K_t and value V_t, not the size k); t [B, 1, 1], each row's position,
    0-based (the paper's step t - 1; -1: a pad, which never becomes a state). A renumbered
    multi-state (positions.py) stores k un-rotated and turns the candidates' keys and the query
    to the scheme's positions. Returns o [B, Hkv, G, 1, D] and the attention a over the candidates,
    [B, Hkv, G, 1, S] (what the policy saw; msrnn.trace prints it)."""
    rotation = state.rotation
    if rotation is not None:
        k = rotation.back(k, t)                                             # to position 0
    state.insert(k[:, :, 0], v[:, :, 0], t)
    keys = state.keys
    if rotation is not None:                  # keys and query at the scheme's positions
        at, query_at = rotation.positions(state.pos)                       # [B, Hkv, S], [B, Hkv]
        keys = rotation.to(keys, at)
        q = rotation.to(rotation.back(q, t[..., None]), query_at[:, :, None, None])
    mask = visible(t[..., None, None], state.pos[:, :, None, None], window)   # [B, Hkv, 1, 1, S]
    probs = probabilities(q, keys, mask, scale, softcap)                    # [B, Hkv, G, 1, S]
    out = weighted(probs, state.values)
    state.evict(probs[:, :, :, 0], t)
    return out, probs


def prompt(states: list, q, k, v, pos, start: int, scale: float, softcap=None, window=None,
           restrict: bool = False):
    """T tokens of a prompt in one parallel pass, at positions pos [B, T] (-1: padding), after
    `start` tokens already seen. q [B, Hkv, G, T, D]; k and v [B, Hkv, T, D]. Returns the
    attention output [B, Hkv, G, T, D].

    Full appends the tokens to its multi-state and attends over all of it. A bounded multi-state
    must be empty: the prompt attends to itself (causal), then the policy keeps the best k,
    ranked from what it reads (the last query's row, or the mean of the last
    `policy.observation` rows; the column sums; the keys). Neither builds
    the [T, T] attention matrix: the output comes from the fused kernel, and only what a ranking
    reads is computed, so memory grows as O(T). Within the pass every scheme numbers the tokens
    by their absolute positions (nothing has left yet); a renumbered multi-state keeps its
    states' keys un-rotated. `restrict`: a policy that decides by position
    (Window, Sinks) runs a `sequential` prompt as one pass, each query masked to the keys the
    policy would still hold. Several empty multi-states may share one pass (one per policy)."""
    T = q.shape[3]
    keys, values, k_pos = k, v, pos[:, None, None, None, :]                 # [B, 1, 1, 1, T]
    for state in states:
        if not state.bounded:                 # Full: slots start .. start+T-1 take the new tokens
            state.append(k, v, pos, start)
            keys, values = state.keys[:, :, :start + T], state.values[:, :, :start + T]
            k_pos = state.pos[:, :1, None, None, :start + T]                # [B, 1, 1, 1, S]
        elif start:
            raise ValueError(f"a bounded multi-state takes several tokens at once only into an "
                             f"empty cache or state (a oneshot prompt); it has seen {start} "
                             f"tokens, so feed the next ones one at a time, or start a new one")
    q_pos, S = pos[:, None, None, :, None], keys.shape[2]                   # [B, 1, 1, T, 1]

    def mask(i: int, j: int):
        """Which keys queries i..j-1 may see, [B, 1, 1, j - i, S], made a block of queries at a
        time: the [T, S] mask of a 32K-token prompt alone would take a gigabyte."""
        i, j = max(i, 0), min(j, T)
        at = q_pos[:, :, :, i:j]
        # A pad query sees only itself (its output is never used; this keeps the kernel finite).
        new = torch.arange(i, j, device=q.device)[:, None]                 # [j - i, 1]
        own = torch.arange(S, device=q.device) == S - T + new
        ok = visible(at, k_pos, window) | (own & (at < 0))
        return ok & states[0].policy.visible(at, k_pos) if restrict else ok

    rows, sums = {}, None                     # the ranking rows, by observation window ω
    for state in (s for s in states if s.bounded):           # empty: the pass's keys are k
        for _, policy in state.runs:          # each row's policy (rows may differ)
            n = policy.observation
            if "row" in policy.reads and n not in rows:
                rows[n] = last_rows(q, k, mask(T - n, T), q_pos >= 0, n, scale, softcap)
            if "sums" in policy.reads and sums is None:
                sums = column_sums(q, k, mask, q_pos >= 0, scale, softcap)
        kept = k if state.rotation is None else state.rotation.back(k, pos[:, None])
        state.keep_best(kept, v, pos[:, None], rows, sums)
    return fused(q, keys, values, mask, scale, softcap)


def last_rows(q, keys, mask, real, n: int, scale: float, softcap=None):
    """The attention row a oneshot prompt is ranked by, [B, Hkv, G, S]: the last query's (n = 1,
    the paper's rule), or the mean of the last n queries' rows over those that are real (not
    padding; SnapKV's observation window, ω = n). Only those n rows are computed (mask: the
    last n queries' [B, 1, 1, n, S])."""
    a = probabilities(q[:, :, :, -n:], keys, mask, scale, softcap)          # [B, Hkv, G, n, S]
    if n == 1:
        return a[:, :, :, 0]
    real = real[:, :, :, -n:].to(a.dtype)                                    # [B, 1, 1, n, 1]
    return (a * real).sum(3) / real.sum(3).clamp(min=1)


def column_sums(q, keys, mask, real, scale: float, softcap=None, block: int = 64):
    """sum_i a_i(j) over the real (not padding) queries i: [B, Hkv, G, S], a block of queries at
    a time, so that at most [block, S] attention weights exist at once (mask(i, j): queries
    i..j-1's [B, 1, 1, j - i, S])."""
    keys = keys.to(wide(keys.dtype))          # once, not once a block (a long prompt's keys)
    total = 0
    for i in range(0, q.shape[3], block):
        a = probabilities(q[:, :, :, i:i + block], keys, mask(i, i + block), scale, softcap)
        total = total + (a * real[:, :, :, i:i + block]).sum(3)
    return total


QUERY_BLOCK = 1024      # queries a prompt pass attends with at once (fused)


def fused(q, keys, values, mask, scale: float, softcap=None):
    """What weighted(probabilities(q, keys, mask), values) computes, by PyTorch's fused attention
    kernel, which never holds the [T, S] attention matrix (a soft-capped model, which the kernel
    cannot do, takes the plain route). mask(i, j): queries i..j-1's [B, 1, 1, j - i, S].
    Returns [B, Hkv, G, T, D].

    QUERY_BLOCK queries at a time, each against only the keys that some query of the block
    may see: a key no query sees adds exp(-inf) = 0 to every sum, so leaving it out changes
    nothing but the work. Causal attention then skips the future's keys, and a window's prompt
    (Window, Sinks, Mistral) reads about QUERY_BLOCK + k keys a query, not T: O(T k), not O(T^2)."""
    B, Hkv, G, T, D = q.shape
    out = []
    for i in range(0, T, QUERY_BLOCK):
        j = min(T, i + QUERY_BLOCK)
        m = mask(i, j)                                                      # [B, 1, 1, b, S]
        k, v, seen = keys, values, m.flatten(0, 3).any(0)                  # seen [S]
        if not seen.all():
            seen = seen.nonzero()[:, 0]                                     # [S'] key slots
            m, k, v = m[..., seen], keys[:, :, seen], values[:, :, seen]
        if softcap is not None:
            out.append(weighted(probabilities(q[:, :, :, i:j], k, m, scale, softcap), v))
            continue
        y = F.scaled_dot_product_attention(q[:, :, :, i:j].reshape(B, Hkv * G, j - i, D), k, v,
                                           attn_mask=m[:, 0], scale=scale, enable_gqa=True)
        out.append(y.view(B, Hkv, G, j - i, D))
    return torch.cat(out, 3)

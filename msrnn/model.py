"""A LLaMA-style decoder (LLaMA, Mistral, Qwen2, Qwen3), written as a multi-state RNN
(Oren et al., 2024).

A decoder-only transformer is an RNN whose hidden state is its key-value cache: one state (a
key and a value) per past token, per layer. The step function is

    (x_t, H_{t-1}) -> (y_t, H_t)

and every block is an MSRNN cell, block.step(x_t, H^l_{t-1}) -> (x'_t, H^l_t):

    1. q_t, k_t, v_t = x_t W_q, x_t W_k, x_t W_v;  rotate q_t and k_t by RoPE at position t
    2. candidates C = H^l_{t-1} ∪ {t};  a_h = softmax(q_h · K_C / sqrt(D)) for each query head h
    3. y = sum_j a_h(j) V_j  (GQA: a query head reads the states of its KV head)
    4. if |C| > k, the policy evicts one candidate:  H^l_t = C \\ {e}

With the Full policy nothing is evicted and this is exactly the ordinary transformer. The
multi-state lives in state.py, the policies in policies.py. Weights are stored as Hugging Face
stores them, [out, in]; `linear` computes x W^T (+ b).

Shapes: B batch, T tokens, E model width, Hq query heads, Hkv KV heads, G = Hq / Hkv query
heads per KV head, D head dim, S slots of the multi-state, V vocabulary. As in the paper, H is
the multi-state, C the candidate set and k the multi-state size (`policy.size`).
"""

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .config import Config, rope_frequencies
from .policies import Full, Policy
from .state import LayerState, MultiState, owner_of


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalized in (at least) float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RoPE(nn.Module):
    """Rotary position embedding, in Hugging Face's rotate-half layout (checkpoints load as they
    are): the pair (x_i, x_{i+D/2}) is rotated by the angle p * theta_i,

        rope(x, p) = x * cos(p theta) + rotate_half(x) * sin(p theta),
        rotate_half([x1, x2]) = [-x2, x1]."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)

    def forward(self, positions):
        """positions: LongTensor of any shape -> (cos, sin), each [*positions.shape, D]."""
        angles = positions[..., None].float() * self.inv_freq
        angles = torch.cat([angles, angles], -1)
        return angles.cos(), angles.sin()


def linear(x, w, b=None):
    """y = x W^T + b for x [..., in], W [out, in] and an optional bias b [out].

    Decoding one sequence multiplies one row by every matrix: a matrix-vector product, bound by
    how fast the weights stream from memory. Compiled on a CPU, we write it as a sum of
    products, which inductor turns into one vectorized loop that reads each weight once, about
    twice as fast here as the library's matrix multiply (docs/performance.md). Several rows (a
    prompt, a batch) reuse each weight, which the library's matrix multiply does best."""
    if torch.compiler.is_compiling() and x.device.type == "cpu" and x[..., 0].numel() == 1:
        wide = torch.promote_types(x.dtype, torch.float32)     # bfloat16 sums in float32
        y = (x[..., None, :].to(wide) * w.to(wide)).sum(-1).to(x.dtype)
        return y if b is None else y + b
    return F.linear(x, w, b)


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], -1) * sin.to(x.dtype)


def visible(q_pos, k_pos, window: int | None):
    """Which keys each query may attend to: a filled slot (pos >= 0), not in the future, and,
    for Mistral checkpoints with a sliding window, fewer than `window` positions back."""
    ok = (k_pos >= 0) & (k_pos <= q_pos)
    if window is not None:
        ok = ok & (q_pos - k_pos < window)
    return ok


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        Hq, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Parameter(torch.empty((Hq + 2 * Hkv) * D, cfg.dim))  # q, k, v stacked
        self.bqkv = nn.Parameter(torch.empty((Hq + 2 * Hkv) * D)) if cfg.qkv_bias else None
        self.q_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else None
        self.wo = nn.Parameter(torch.empty(cfg.dim, Hq * D))

    def qkv(self, x, cos, sin):
        """x [B, T, E] -> q [B, Hkv, G, T, D], k and v [B, Hkv, T, D]; q and k rotated by RoPE
        at their positions (cos, sin [B or 1, T, D]: rows may sit at different positions)."""
        c, (B, T, _) = self.cfg, x.shape
        q, k, v = linear(x, self.wqkv, self.bqkv).split(
            [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim], -1)
        q = q.view(B, T, c.n_kv_heads, c.group, c.head_dim)
        k = k.view(B, T, c.n_kv_heads, c.head_dim)
        if self.q_norm is not None:                  # Qwen3: each head's q and k normalized
            q, k = self.q_norm(q), self.k_norm(k)
        q = rotate(q, cos[:, :, None, None], sin[:, :, None, None])
        k = rotate(k, cos[:, :, None], sin[:, :, None])
        v = v.view(B, T, c.n_kv_heads, c.head_dim)
        return q.permute(0, 2, 3, 1, 4), k.transpose(1, 2), v.transpose(1, 2)

    @staticmethod
    def attend(q, keys, mask):
        """Attention probabilities [B, Hkv, G, T, S] = softmax(q · K / sqrt(D)) over the visible
        keys. q [B, Hkv, G, T, D], keys [B, Hkv, S, D], mask broadcastable to the result.
        The G query heads of a group share one matrix product with their KV head's keys."""
        B, Hkv, G, T, D = q.shape
        scores = (q.reshape(B, Hkv, G * T, D) @ keys.transpose(-1, -2)) * D ** -0.5
        scores = scores.view(B, Hkv, G, T, -1).masked_fill(~mask, -torch.inf)
        return scores.softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32))

    def output(self, probs, values):
        """y = sum_j a(j) V_j, heads concatenated and projected: [B, Hkv, G, T, S] -> [B, T, E]."""
        B, Hkv, G, T, S = probs.shape
        y = probs.to(values.dtype).view(B, Hkv, G * T, S) @ values          # [B, Hkv, G*T, D]
        y = y.view(B, Hkv, G, T, -1).permute(0, 3, 1, 2, 4).reshape(B, T, -1)
        return linear(y, self.wo)

    def step(self, x, state: LayerState, t, cos, sin):
        """One token x [B, E] per row, at the row's position t [B, 1, 1], against the layer's
        multi-state."""
        q, k, v = self.qkv(x[:, None], cos, sin)
        state.insert(k[:, :, 0], v[:, :, 0], t)                              # C = H ∪ {t}
        mask = visible(t, state.pos, self.cfg.sliding_window)[:, :, None, None]
        probs = self.attend(q, state.keys, mask)                              # [B, Hkv, G, 1, S]
        y = self.output(probs, state.values)[:, 0]
        state.evict(probs[:, :, :, 0], t)                                    # H_t = C \ {e}
        return y

    def prefill(self, x, states: list, start: int, mask, cos, sin):
        """T tokens x [B, T, E] at positions start .. start+T-1 in one parallel pass; mask [T, S]
        says which keys each query sees (Transformer.hidden makes it). `states`: the layer's
        multi-state, or several empty ones that share the pass (Transformer.prefill_shared).

        Full appends them to its multi-state and attends over all of it. A bounded multi-state
        must be empty: the prompt attends to itself, then the policy keeps the best k of it,
        ranked from the last query's attention row (and the column sums, for a policy with
        memory). Neither builds the [T, T] attention matrix: the output comes from the fused
        kernel, and only what the ranking reads is computed, so memory grows as O(T)."""
        T = x.shape[1]
        q, k, v = self.qkv(x, cos, sin)
        keys, values, last, total = k, v, None, None
        for state in states:
            if not state.policy.bounded:        # Full's slots 0 .. start+T-1 hold those positions
                state.append(k, v, start)
                keys, values = state.keys[:, :, :start + T], state.values[:, :, :start + T]
                continue
            if last is None:
                last = self.attend(q[:, :, :, -1:], k, mask[-1:])[:, :, :, 0]    # [B, Hkv, G, T]
            if state.policy.memory and total is None:
                total = self.column_sums(q, k, mask)
            state.keep_best(k, v, torch.arange(start, start + T, device=x.device), last, total)
        return self.fused(q, keys, values, mask)

    def column_sums(self, q, keys, mask, block: int = 64):
        """sum_i a_i(j) over all queries i: [B, Hkv, G, S], a block of queries at a time, so
        that at most [block, S] attention weights exist at once."""
        total = 0
        for i in range(0, q.shape[3], block):
            total = total + self.attend(q[:, :, :, i:i + block], keys, mask[i:i + block]).sum(3)
        return total

    def fused(self, q, keys, values, mask):
        """What `output(attend(q, keys, mask), values)` computes, by PyTorch's fused attention
        kernel, which never holds the [T, S] attention matrix."""
        B, Hkv, G, T, D = q.shape
        y = F.scaled_dot_product_attention(q.reshape(B, Hkv * G, T, D), keys, values,
                                           attn_mask=mask, enable_gqa=True)     # [B, Hq, T, D]
        return linear(y.transpose(1, 2).reshape(B, T, -1), self.wo)


class MLP(nn.Module):
    """SwiGLU: y = (silu(x W_gate) * (x W_up)) W_down."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(2 * cfg.hidden_dim, cfg.dim))  # gate and up, stacked
        self.w2 = nn.Parameter(torch.empty(cfg.dim, cfg.hidden_dim))

    def forward(self, x):
        gate, up = linear(x, self.w13).chunk(2, -1)
        return linear(F.silu(gate) * up, self.w2)


class Block(nn.Module):
    """One layer, an MSRNN cell: (x_t, H^l_{t-1}) -> (x'_t, H^l_t), pre-norm residual."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def step(self, x, state, t, cos, sin):
        x = x + self.attn.step(self.attn_norm(x), state, t, cos, sin)
        return x + self.mlp(self.mlp_norm(x))

    def prefill(self, x, states, start, mask, cos, sin):
        x = x + self.attn.prefill(self.attn_norm(x), states, start, mask, cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """The decoder. As an MSRNN: `init_state` gives H_0, `step` is (x_t, H_{t-1}) -> (y_t, H_t).
    `source` is the checkpoint directory it was loaded from (its tokenizer files are there)."""

    def __init__(self, cfg: Config, source: str | None = None):
        super().__init__()
        self.cfg, self.source = cfg, source
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RoPE(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied checkpoints share the embedding matrix ([V, E]) as the output projection.
        self.lm_head = None if cfg.tie_embeddings else nn.Parameter(torch.empty(cfg.vocab_size,
                                                                                cfg.dim))
        self.compiled_decode = None                                      # see compile_step

    def logits(self, x):
        """Final norm and the LM head: [..., E] -> [..., V]."""
        return linear(self.norm(x), self.embed.weight if self.lm_head is None else self.lm_head)

    def init_state(self, batch_size: int, policy: Policy, capacity: int | None = None):
        """H_0: an empty multi-state for `batch_size` sequences, bounded by `policy`."""
        p = self.embed.weight
        return MultiState(self.cfg, policy, batch_size, p.dtype, p.device, capacity)

    def step(self, token_ids, state: MultiState):
        """(x_t, H_{t-1}) -> (y_t, H_t): token_ids [B] at position t = state.length -> logits
        [B, V]. H_t overwrites H_{t-1} in place (its buffers are preallocated) and is returned."""
        self._check(token_ids, state, dims=1)
        state.reserve(1)
        logits = (self.compiled_decode or self.decode)(token_ids, state)
        state.advance(1)
        return logits, state

    def decode(self, token_ids, state: MultiState, head: bool = True):
        """The tensor work of a step, with no Python-side bookkeeping (what gets compiled):
        logits [B, V], or the final hidden state [B, E] with head=False."""
        t = state.t                                                      # [B]: each row's
        cos, sin = self.rope(t[:, None])                                 # [B, 1, D]
        x = self.embed(token_ids)                                        # [B, E]
        for block, layer_state in zip(self.blocks, state.layers):
            x = block.step(x, layer_state, t.view(-1, 1, 1), cos, sin)
        return self.logits(x) if head else x

    def compile_step(self, mode: str | None = None):
        """Route `step` through torch.compile: the whole decode step (every layer's attention,
        policy scoring and eviction) becomes one graph (fullgraph=True) with static shapes, so
        it compiles once per (policy, batch size, dtype) and never again as positions grow.
        mode: default "reduce-overhead" (CUDA graphs) on CUDA, inductor's default on the CPU."""
        if self.compiled_decode is None:
            if mode is None and self.embed.weight.is_cuda:
                mode = "reduce-overhead"
            self.compiled_decode = torch.compile(self.decode, fullgraph=True, dynamic=False,
                                                 mode=mode)
        return self

    def prefill(self, token_ids, state: MultiState, mode: str = "sequential",
                logits: bool = True):
        """Run a prompt token_ids [B, T] -> logits [B, T, V] (logits=False: the final hidden
        states [B, T, E], for prompts whose logits would not fit in memory).

        sequential: exactly T steps (the MSRNN definition); `parallel_prefix` says which of them
          run as one parallel pass, which computes the same.
        oneshot: the authors' released code: full causal attention over the whole prompt, then
          each layer keeps the k states ranked best by the policy (policies.py) from the last
          prompt token's attention row (H2O: column sums), and decoding continues step by step.
        Full computes the whole prompt in parallel in both modes."""
        if mode not in ("sequential", "oneshot"):
            raise ValueError(f"unknown prompt mode {mode!r}: use 'sequential' or 'oneshot'")
        self._check(token_ids, state, dims=2)
        T = token_ids.shape[1]
        n = self.parallel_prefix(T, state, mode)
        out = []
        if n:
            hidden = self.hidden(token_ids[:, :n], [state], mode)
            out.append(self.logits(hidden) if logits else hidden)
        for i in progress(range(n, T), "prompt steps", show=T - n >= 512):
            state.reserve(1)
            out.append(self.decode(token_ids[:, i], state, head=logits)[:, None])
            state.advance(1)
        return torch.cat(out, 1), state

    @staticmethod
    def parallel_prefix(T: int, state: MultiState, mode: str) -> int:
        """How many of a prompt's T tokens run as one parallel pass; the rest are steps.

        Full: all T (nothing is ever evicted, so a step is a row of causal attention).
        A bounded multi-state that is not empty: none (`sequential` only; oneshot is refused).
        An empty one, oneshot: all T, by definition. An empty one, sequential:
          - all T if the policy decides from positions alone (Window, Sinks): the pass masks
            each query to the keys the policy would still hold (`Policy.visible`);
          - else the first min(T, k+1): nothing is evicted before the multi-state holds k + 1
            candidates, and the (k+1)-th token's step sees exactly those, so ranking them by its
            attention row (`oneshot` of k + 1 tokens) makes the same one eviction."""
        policy = state.policy
        if not policy.bounded:
            return T
        if state.length > 0:
            if mode == "oneshot":
                raise ValueError("oneshot compresses a whole prompt into an empty multi-state; "
                                 "continue a non-empty one with mode='sequential'")
            return 0
        if mode == "oneshot" or policy.visible(0, 0) is not None:
            return T
        return min(T, policy.size + 1)

    def forward(self, token_ids):
        """The plain transformer on token_ids [B, T] -> logits [B, T, V]."""
        state = self.init_state(len(token_ids), Full(), capacity=token_ids.shape[-1])
        return self.prefill(token_ids, state)[0]

    def prefill_shared(self, token_ids, states: list, logits: bool = True):
        """The `oneshot` prompt token_ids [B, T] for several empty multi-states at once (one per
        policy, say) -> logits [B, T, V] (logits=False: hidden states [B, T, E]). Full causal
        attention over the prompt is the same whatever the policy, so the pass runs once; each
        multi-state then keeps what its own policy ranks best, exactly as
        prefill(..., mode="oneshot") would."""
        for state in states:
            self._check(token_ids, state, dims=2)
            if state.length:
                raise ValueError("prefill_shared compresses a prompt into empty multi-states")
        hidden = self.hidden(token_ids, states, "oneshot")
        return self.logits(hidden) if logits else hidden

    def hidden(self, token_ids, states: list, mode="sequential"):
        """The parallel pass behind prefill: token_ids [B, T] -> final hidden states [B, T, E]
        (before the norm and LM head), writing the tokens into the multi-states (a bounded one
        must be empty; it keeps the best k, see Attention.prefill). Several multi-states share
        the pass only if they are empty (prefill_shared)."""
        T, start = token_ids.shape[1], states[0].length
        for state in states:
            state.reserve(T)
        q_pos = torch.arange(start, start + T, device=token_ids.device)
        k_pos = torch.arange(start + T, device=token_ids.device)  # Full: all; bounded: start = 0
        # Which keys each query sees: the causal mask (and the checkpoint's own window) and,
        # for a sequential pass of Window or Sinks, what the policy would still hold.
        mask = visible(q_pos[:, None], k_pos, self.cfg.sliding_window)             # [T, S]
        reach = states[0].policy.visible(q_pos[:, None], k_pos) if mode == "sequential" else None
        if reach is not None:
            mask = mask & reach
        cos, sin = self.rope(q_pos[None])                               # [1, T, D]
        x = self.embed(token_ids)                                        # [B, T, E]
        layers = list(zip(self.blocks, *(state.layers for state in states)))
        for block, *layer_states in progress(layers, "prompt layers", show=T >= 2048):
            x = block.prefill(x, layer_states, start, mask, cos, sin)
        for state in states:
            state.advance(T)
        return x

    def _check(self, token_ids, state, dims: int):
        """Clear errors for token ids of the wrong shape, type or range (step: [B]; prompts:
        [B, T], T >= 1), and for a multi-state made by another model."""
        shape = "[B]" if dims == 1 else "[B, T]"
        if not torch.is_tensor(token_ids) or token_ids.dim() != dims:
            got = tuple(token_ids.shape) if torch.is_tensor(token_ids) else type(token_ids).__name__
            raise ValueError(f"token_ids must be a LongTensor of shape {shape}, got {got}")
        if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or \
                token_ids.dtype == torch.bool:
            raise ValueError(f"token_ids must hold integer token ids, got dtype {token_ids.dtype}")
        if dims == 2 and token_ids.shape[1] == 0:
            raise ValueError("empty prompt: give at least one token")
        if token_ids.numel() and not (0 <= int(token_ids.min()) and
                                      int(token_ids.max()) < self.cfg.vocab_size):
            raise ValueError(f"token ids must be in 0..{self.cfg.vocab_size - 1} (the model's "
                             f"vocabulary), got {int(token_ids.min())}..{int(token_ids.max())}")
        if not isinstance(state, MultiState):
            raise TypeError(f"state must be a MultiState from model.init_state, got "
                            f"{type(state).__name__}")
        p = self.embed.weight
        mine = owner_of(self.cfg, p.dtype, p.device)
        if state.owner != mine:
            diff = ", ".join(f"{k} {state.owner[k]} (this model: {mine[k]})" for k in mine
                             if state.owner[k] != mine[k])
            raise ValueError(f"this multi-state was made by another model: {diff}; make it "
                             f"with this model's init_state")
        if token_ids.shape[0] != state.batch_size:
            raise ValueError(f"token_ids has batch size {token_ids.shape[0]}, but the multi-state "
                             f"was made for {state.batch_size} (model.init_state(batch_size=...))")


def progress(items, desc: str, show: bool):
    """A progress bar on stderr for long prompts (tqdm), nothing for short ones."""
    return tqdm(items, desc=desc, leave=False, disable=not show)

"""A LLaMA/Mistral decoder, written as a multi-state RNN (Oren et al., 2024).

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
stores them, [out, in]; `linear` computes x W^T.

Shapes: B batch, T tokens, C model width, H query heads, H_kv KV heads, G = H / H_kv query heads
per KV head, D head dim, S slots of the multi-state, V vocabulary.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, rope_frequencies
from .policies import Full, Policy
from .state import LayerState, MultiState


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


def linear(x, w):
    """y = x W^T for x [..., in] and W [out, in].

    Decoding one sequence multiplies one row by every matrix: a matrix-vector product, bound by
    how fast the weights stream from memory. Compiled on a CPU, we write it as a sum of
    products, which inductor turns into one vectorized loop that reads each weight once, about
    twice as fast here as the library's matrix multiply (docs/performance.md). Several rows (a
    prompt, a batch) reuse each weight, which the library's matrix multiply does best."""
    if torch.compiler.is_compiling() and x.device.type == "cpu" and x[..., 0].numel() == 1:
        return (x[..., None, :].float() * w.float()).sum(-1).to(x.dtype)
    return F.linear(x, w)


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
        H, H_kv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Parameter(torch.empty((H + 2 * H_kv) * D, cfg.dim))  # q, k, v stacked
        self.wo = nn.Parameter(torch.empty(cfg.dim, H * D))

    def qkv(self, x, cos, sin):
        """x [B, T, C] -> q [B, H_kv, G, T, D], k and v [B, H_kv, T, D]; q and k rotated."""
        c, (B, T, _) = self.cfg, x.shape
        q, k, v = linear(x, self.wqkv).split(
            [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim], -1)
        q = q.view(B, T, c.n_kv_heads, c.group, c.head_dim).permute(0, 2, 3, 1, 4)
        k = k.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def attend(self, q, k, mask):
        """Attention probabilities [B, H_kv, G, T, S] = softmax(q · k / sqrt(D)) over the visible
        keys. q [B, H_kv, G, T, D], k [B, H_kv, S, D], mask broadcastable to the result.
        The G query heads of a group share one matrix product with their KV head's keys."""
        B, H_kv, G, T, D = q.shape
        scores = (q.reshape(B, H_kv, G * T, D) @ k.transpose(-1, -2)) * D ** -0.5
        scores = scores.view(B, H_kv, G, T, -1).masked_fill(~mask, -torch.inf)
        return scores.softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32))

    def output(self, probs, v):
        """y = sum_j a(j) V_j, heads concatenated and projected: [B, H_kv, G, T, S] -> [B, T, C]."""
        B, H_kv, G, T, S = probs.shape
        y = probs.to(v.dtype).view(B, H_kv, G * T, S) @ v                 # [B, H_kv, G*T, D]
        y = y.view(B, H_kv, G, T, -1).permute(0, 3, 1, 2, 4).reshape(B, T, -1)
        return linear(y, self.wo)

    def step(self, x, H: LayerState, t, cos, sin):
        """One token x [B, C] at position t (0-dim tensor) against the layer's multi-state H."""
        q, k, v = self.qkv(x[:, None], cos, sin)
        H.insert(k[:, :, 0], v[:, :, 0], t)                              # C = H ∪ {t}
        probs = self.attend(q, H.k, visible(t, H.pos, self.cfg.sliding_window)[:, :, None, None])
        y = self.output(probs, H.v)[:, 0]
        H.evict(probs[:, :, :, 0], t)                                    # H_t = C \ {e}
        return y

    def prefill(self, x, H: LayerState, start: int, cos, sin, restrict=None):
        """T tokens x [B, T, C] at positions start .. start+T-1, all at once (causal attention).

        Full appends them to its multi-state and attends over all of it. A bounded multi-state
        must be empty: the prompt attends to itself, then the policy keeps the best k of it.
        `restrict(q_pos, k_pos)` optionally hides more keys (a Window policy's reach)."""
        T = x.shape[1]
        q_pos = torch.arange(start, start + T, device=x.device)
        q, k, v = self.qkv(x, cos, sin)
        if H.policy.size is None:               # Full's slots 0 .. start+T-1 hold those positions
            H.append(k, v, start)
            keys, values = H.k[:, :, :start + T], H.v[:, :, :start + T]
            k_pos = torch.arange(start + T, device=x.device)
        else:
            keys, values, k_pos = k, v, q_pos
        mask = visible(q_pos[:, None], k_pos, self.cfg.sliding_window)           # [T, S]
        if restrict is not None:
            mask = mask & restrict(q_pos[:, None], k_pos)
        if H.policy.size is None:
            return self.fused(q, keys, values, mask)
        probs = self.attend(q, keys, mask)
        H.keep_best(k, v, q_pos, probs)
        return self.output(probs, values)

    def fused(self, q, k, v, mask):
        """What `output(attend(q, k, mask), v)` computes, by PyTorch's fused attention kernel,
        which never holds the [T, S] attention matrix: for Full, where no policy reads it."""
        B, H_kv, G, T, D = q.shape
        y = F.scaled_dot_product_attention(q.reshape(B, H_kv * G, T, D), k, v, attn_mask=mask,
                                           enable_gqa=True)                      # [B, H, T, D]
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

    def step(self, x, H, t, cos, sin):
        x = x + self.attn.step(self.attn_norm(x), H, t, cos, sin)
        return x + self.mlp(self.mlp_norm(x))

    def prefill(self, x, H, start, cos, sin, restrict=None):
        x = x + self.attn.prefill(self.attn_norm(x), H, start, cos, sin, restrict)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """The decoder. As an MSRNN: `init_state` gives H_0, `step` is (x_t, H_{t-1}) -> (y_t, H_t)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RoPE(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied checkpoints share the embedding matrix ([V, C]) as the output projection.
        self.lm_head = None if cfg.tie_embeddings else nn.Parameter(torch.empty(cfg.vocab_size,
                                                                                cfg.dim))
        self.compiled_decode = None                                      # see compile_step

    def logits(self, x):
        """Final norm and the LM head: [..., C] -> [..., V]."""
        return linear(self.norm(x), self.embed.weight if self.lm_head is None else self.lm_head)

    def init_state(self, batch_size: int, policy: Policy, capacity: int | None = None):
        """H_0: an empty multi-state for `batch_size` sequences, bounded by `policy`."""
        p = next(self.parameters())
        return MultiState(self.cfg, policy, batch_size, p.dtype, p.device, capacity)

    def step(self, token_ids, state: MultiState):
        """(x_t, H_{t-1}) -> (y_t, H_t): token_ids [B] at position t = state.length -> logits
        [B, V]. H_t overwrites H_{t-1} in place (its buffers are preallocated) and is returned."""
        _check(token_ids, state, dims=1)
        state.reserve(1)
        logits = (self.compiled_decode or self.decode)(token_ids, state)
        state.length += 1
        return logits, state

    def decode(self, token_ids, state: MultiState):
        """The tensor work of a step, with no Python-side bookkeeping (what gets compiled)."""
        t = state.t
        cos, sin = self.rope(t)
        x = self.embed(token_ids)                                        # [B, C]
        for block, H in zip(self.blocks, state.layers):
            x = block.step(x, H, t, cos, sin)
        t += 1
        return self.logits(x)

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

    def prefill(self, token_ids, state: MultiState, mode: str = "sequential"):
        """Run a prompt token_ids [B, T] -> logits [B, T, V].

        sequential: exactly T steps (the MSRNN definition). The first min(T, k+1) tokens of an
          empty state run as one parallel pass: no state is evicted before the multi-state holds
          k + 1 candidates, and the (k+1)-th token's step sees all of them, so the same one
          eviction follows. The rest are steps.
        oneshot: the authors' released code: full causal attention over the whole prompt, then
          each layer keeps the k states ranked best by the policy (policies.py) from the last
          prompt token's attention row (H2O: column sums), and decoding continues step by step.
        Full computes the whole prompt in parallel in both modes."""
        if mode not in ("sequential", "oneshot"):
            raise ValueError(f"unknown prompt mode {mode!r}: use 'sequential' or 'oneshot'")
        _check(token_ids, state, dims=2)
        T, k = token_ids.shape[1], state.policy.size
        if k is None:
            return self.logits(self.hidden(token_ids, state)), state
        if state.length > 0:
            if mode == "oneshot":
                raise ValueError("oneshot compresses a whole prompt into an empty multi-state; "
                                 "continue a non-empty one with mode='sequential'")
            return self._steps(token_ids, state), state
        n = T if mode == "oneshot" else min(T, k + 1)
        logits = self.logits(self.hidden(token_ids[:, :n], state))
        if n < T:
            logits = torch.cat([logits, self._steps(token_ids[:, n:], state)], 1)
        return logits, state

    def forward(self, token_ids, restrict=None):
        """The plain transformer on token_ids [B, T] -> logits [B, T, V], optionally with
        `restrict(q_pos, k_pos)` hiding more keys (policies.Window.visible)."""
        _check(token_ids, None, dims=2)
        state = self.init_state(token_ids.shape[0], Full(), capacity=token_ids.shape[1])
        return self.logits(self.hidden(token_ids, state, restrict))

    def hidden(self, token_ids, state, restrict=None):
        """The parallel pass behind prefill: token_ids [B, T] -> final hidden states [B, T, C]
        (before the norm and LM head), writing the tokens into the multi-state (for a bounded
        policy the state must be empty; it keeps the best k, see Attention.prefill)."""
        T, start = token_ids.shape[1], state.length
        state.reserve(T)
        cos, sin = self.rope(torch.arange(start, start + T, device=token_ids.device))
        x = self.embed(token_ids)                                        # [B, T, C]
        for block, H in zip(self.blocks, state.layers):
            x = block.prefill(x, H, start, cos, sin, restrict)
        state.length += T
        state.t.fill_(state.length)
        return x

    def _steps(self, token_ids, state):
        return torch.stack([self.step(token_ids[:, i], state)[0]
                            for i in range(token_ids.shape[1])], 1)


def _check(token_ids, state, dims: int):
    """A clear error for token ids of the wrong shape (step: [B]; prompts: [B, T], T >= 1)."""
    shape = "[B]" if dims == 1 else "[B, T]"
    if not torch.is_tensor(token_ids) or token_ids.dim() != dims:
        raise ValueError(f"token_ids must be a LongTensor of shape {shape}, got "
                         f"{tuple(token_ids.shape) if torch.is_tensor(token_ids) else type(token_ids)}")
    if dims == 2 and token_ids.shape[1] == 0:
        raise ValueError("empty prompt: give at least one token")
    if state is not None and token_ids.shape[0] != state.batch_size:
        raise ValueError(f"token_ids has batch size {token_ids.shape[0]}, but the multi-state was "
                         f"made for {state.batch_size} (model.init_state(batch_size=...))")

"""A LLaMA-style decoder (LLaMA, Mistral, Qwen2, Qwen3), written as a multi-state RNN
(Oren et al., 2024). Read tests/reference.py first: the same model in plain Python lists.

A decoder-only transformer is an RNN whose hidden state is its key-value cache: one state (a
key and a value) per past token, per layer. The step function is

    (x_t, H_{t-1}) -> (y_t, H_t)        token x_t in, logits y_t out; H_0 is empty

and every block is an MSRNN cell, block.step(x_t, H^l_{t-1}) -> (x'_t, H^l_t):

    1. q_t, K_t, V_t = u W_Q, u W_K, u W_V (u: the layer's normed input);  rotate q_t and K_t
       by RoPE at the token's position (steps t count from 1 as in the paper, positions from 0:
       x_t sits at position t - 1)
    2. candidates C = H^l_{t-1} ∪ {t};  a_h = softmax(q_h · K_C / sqrt(D)) for each query head h
    3. o_h = sum_j a_h(j) V_j  (GQA: a query head reads the states of its KV head)
    4. if |C| > k, the policy evicts one candidate:  H^l_t = C \\ {e}

With the Full policy nothing is evicted and this is exactly the ordinary transformer. This file
is the network; steps 2-4 are the multi-state's own (attention.py, written once for this decoder
and for transformers), the multi-state lives in state.py, the policies in policies.py, and the
schedule that feeds a prompt in (prompt.py) and decodes (generate.py) drives `Transformer`
through the few methods every backend has (backend.py: init_state, parallel, step, logits).

Shapes: B batch, T tokens, E model width, Hq query heads, Hkv KV heads, G = Hq / Hkv query
heads per KV head, D head dim, S slots of the multi-state, V vocabulary (a shape letter; V_j,
with an index, is a value). As in the paper, H is the multi-state, C the candidate set and k the
multi-state size (`policy.size`); docs/msrnn.md has the symbol table. In the code, `t` inside a
step is the new token's position (the paper's t - 1), and the tensors `k`, `v` are the new
token's key K_t and value V_t, not the size k.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import attention
from .backend import Backend, Compiled, compiled
from .config import Config, rope_frequencies
from .policies import Full
from .positions import rotate
from .state import LayerState, MultiState, Shape
from .statefile import fingerprint


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
    """y = x W^T + b for x [..., in], W [out, in] (Hugging Face's layout) and an optional b [out].

    Decoding one sequence multiplies one row by every matrix: a matrix-vector product, bound by
    how fast the weights stream from memory. Compiled on a CPU, we write it as a sum of
    products, which inductor turns into one vectorized loop that reads each weight once, about
    twice as fast here as the library's matrix multiply (docs/performance.md). Two rows or more
    (a prompt, a batch, a sweep's configurations) take the library's multiply, which serves
    every row from one read of a weight and, inside the compiled step, beat the same sum written
    for several rows (section 1). W may be int8 (msrnn.quantize): the loop widens each weight in
    registers, so it still reads 1 byte."""
    if torch.compiler.is_compiling() and x.device.type == "cpu" and x[..., 0].numel() == 1:
        # x is computed once, into memory, before the loop: left to itself, inductor inlines
        # x's producers (the norm, SiLU) into the loop and recomputes them for every output row
        x = torch.as_strided(x, x.shape, x.stride())
        wide = torch.promote_types(x.dtype, torch.float32)     # bfloat16 sums in float32
        y = (x[..., None, :].to(wide) * w.to(wide)).sum(-1).to(x.dtype)
        return y if b is None else y + b
    return F.linear(x, w, b)


class Linear(nn.Module):
    """A projection, y = linear(x, W, b): a module of its own, so that another way to store or
    split a projection (quantized, sharded) replaces the module, not the model."""

    def __init__(self, n_in: int, n_out: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.bias = nn.Parameter(torch.empty(n_out)) if bias else None

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class Attention(nn.Module):
    """The projections around the multi-state's attention (attention.py): q, k, v in, W_o out."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        Hq, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = Linear(cfg.dim, (Hq + 2 * Hkv) * D, bias=cfg.qkv_bias)    # q, k, v stacked
        self.q_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else None
        self.wo = Linear(Hq * D, cfg.dim)
        self.scale = D ** -0.5

    def qkv(self, x, cos, sin):
        """x [B, T, E] -> q [B, Hkv, G, T, D], k and v [B, Hkv, T, D]; q and k rotated by RoPE
        at their positions (cos, sin [B or 1, T, D]: rows may sit at different positions)."""
        c, (B, T, _) = self.cfg, x.shape
        q, k, v = self.wqkv(x).split(
            [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim], -1)
        q = q.view(B, T, c.n_kv_heads, c.group, c.head_dim)
        k = k.view(B, T, c.n_kv_heads, c.head_dim)
        if self.q_norm is not None:                  # Qwen3: each head's q and k normalized
            q, k = self.q_norm(q), self.k_norm(k)
        q = rotate(q, cos[:, :, None, None], sin[:, :, None, None])
        k = rotate(k, cos[:, :, None], sin[:, :, None])
        v = v.view(B, T, c.n_kv_heads, c.head_dim)
        return q.permute(0, 2, 3, 1, 4), k.transpose(1, 2), v.transpose(1, 2)

    def output(self, o):
        """The heads concatenated and projected by W_o: [B, Hkv, G, T, D] -> [B, T, E]."""
        B, Hkv, G, T, D = o.shape
        return self.wo(o.permute(0, 3, 1, 2, 4).reshape(B, T, Hkv * G * D))

    def step(self, x, state: LayerState, t, cos, sin):
        """One token x [B, E] per row, at the row's position t [B, 1, 1], against the layer's
        multi-state (attention.step: insert, attend, evict)."""
        q, k, v = self.qkv(x[:, None], cos, sin)
        o, _ = attention.step(state, q, k, v, t, self.scale, window=self.cfg.sliding_window)
        return self.output(o)[:, 0]

    def parallel(self, x, states: list, pos, start: int, cos, sin, restrict: bool):
        """T tokens x [B, T, E] at positions pos [1, T] in one parallel pass (attention.prompt)."""
        q, k, v = self.qkv(x, cos, sin)
        return self.output(attention.prompt(states, q, k, v, pos, start, self.scale,
                                            window=self.cfg.sliding_window, restrict=restrict))


class MLP(nn.Module):
    """SwiGLU: y = (silu(x W_gate) * (x W_up)) W_down."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.w13 = Linear(cfg.dim, 2 * cfg.hidden_dim)          # gate and up, stacked
        self.w2 = Linear(cfg.hidden_dim, cfg.dim)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, -1)
        return self.w2(F.silu(gate) * up)


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

    def parallel(self, x, states, pos, start, cos, sin, restrict):
        x = x + self.attn.parallel(self.attn_norm(x), states, pos, start, cos, sin, restrict)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(Backend, nn.Module):
    """The decoder, as an MSRNN: `init_state` gives H_0, `step` is (x_t, H_{t-1}) -> (y_t, H_t).

    This class is the network: the tensor work of a step (`compute_step`), of a prompt's
    parallel pass (`compute_parallel`) and of the LM head (`logits`). What surrounds it (checks,
    counting tokens, room for Full's states, the stop tokens, progress) is every backend's, and
    lives in backend.py."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RoPE(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied checkpoints share the embedding matrix ([V, E]) as the output projection.
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size)

    @property
    def shape(self) -> Shape:
        """What this model's multi-states are made for."""
        c, p = self.cfg, self.embed.weight
        return Shape(c.n_layers, c.n_kv_heads, c.head_dim, c.max_positions, p.dtype, p.device)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def rotary(self):
        return self.rope

    backend = "msrnn"

    @property
    def fingerprint(self) -> str:
        """Which checkpoint this is, the same on both backends (msrnn.statefile.fingerprint)."""
        return fingerprint(self.embed.weight, [self.blocks[-1].attn_norm.weight,
                                               self.norm.weight], self.shape)

    def logits(self, x):
        """Final norm and the LM head: [..., E] -> [..., V]."""
        x = self.norm(x)
        return self.lm_head(x) if self.lm_head is not None else linear(x, self.embed.weight)

    def compute_step(self, token_ids, state: MultiState, head: bool = True):
        """The tensor work of a step (what gets compiled): token_ids [B] at each row's position
        state.t (the paper's t - 1: positions count from 0) -> logits [B, V], or the final hidden
        state [B, E] with head=False. The multi-state is updated in place."""
        t = state.t                                                      # [B]: each row's
        cos, sin = self.rope(t[:, None])                                 # [B, 1, D]
        x = self.embed(token_ids)                                        # [B, E]
        for block, layer_state in zip(self.blocks, state.layers):
            x = block.step(x, layer_state, t.view(-1, 1, 1), cos, sin)
        return self.logits(x) if head else x

    def compute_parallel(self, token_ids, states: list, restrict: bool = False, tick=None):
        """T tokens token_ids [B, T] in one parallel pass -> final hidden states [B, T, E] (before
        the norm and LM head), written into the multi-states (attention.prompt: Full appends, an
        empty bounded one keeps its best k; several empty ones may share the pass; `restrict`:
        a positional policy's sequential prompt). `tick()` after each layer (progress)."""
        T, start = token_ids.shape[1], states[0].length
        pos = torch.arange(start, start + T, device=token_ids.device)[None]   # [1, T]
        cos, sin = self.rope(pos)                                        # [1, T, D]
        x = self.embed(token_ids)                                        # [B, T, E]
        for block, *layer_states in zip(self.blocks, *(state.layers for state in states)):
            x = block.parallel(x, layer_states, pos, start, cos, sin, restrict)
            if tick is not None:
                tick()
        return x

    def forward(self, token_ids):
        """The plain transformer on token_ids [B, T] -> logits [B, T, V]."""
        state = self.init_state(len(token_ids), Full(), capacity=token_ids.shape[-1])
        return self.logits(self.parallel(token_ids, [state]))

    def compile_step(self, mode: str | None = None, wrapper: str = "python") -> Compiled:
        """This model with its step compiled (backend.Compiled; made once per model and
        wrapper: "python", or "cpp" for inductor's C++ wrapper on the CPU)."""
        return compiled(self, mode, wrapper)

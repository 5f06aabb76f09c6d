"""The plain reference of tests/reference.py (read that first), extended to everything the tests
compare msrnn against: every policy of docs/design.md, the position schemes, the `oneshot` prompt,
and the families transformers has besides LLaMA (Mistral, Qwen2, Qwen3, Phi3, Gemma2), computed
from a Hugging Face model object's weights. Nothing here imports msrnn.

    ref = Reference(hf_model, Rule.tova(16))      # hf_model: LlamaForCausalLM, Qwen3ForCausalLM..
    logits = ref.step(token_id)                   # [V] float64
    ref.kept(layer)                               # [[positions of KV head 0], [.. head 1], ...]
    Reference(hf_model, Rule.h2o(16), positions="cache")    # a position scheme (below)

The cell and Eq. 9 are reference.py's; this file overrides its small methods: `qkv` (biases,
Qwen3's q/k norms), `scores` (sliding windows, Gemma2's soft-cap), `positions` (the schemes),
`attention_output` and `mlp` (Gemma2's extra norms and GELU), `evict` (H2O's accumulated scores)
and `victim` (every policy's rule). Each piece quotes the rule of docs/design.md it implements.

Keys stay unrotated in the States (reference.py says why): at every step each candidate's key is
rotated to the rotary position the scheme gives it, computed afresh from the positions the KV
head keeps (`rotary_positions`), and the query to its KV head's query position: `original`, the
absolute positions; `cache`, the ranks 0..|C|-1; `compressed`, the running sums of the gaps φ.
"""

import math
import random
from dataclasses import dataclass

import torch

import reference as core
from reference import State, rms_norm

__all__ = ["Reference", "Rule", "State", "oneshot_keep", "rotary_positions"]


@dataclass(frozen=True)
class Rule(core.Rule):
    """Which compression policy to apply (docs/design.md, "Policies").

    kind: "full" | "window" | "sinks" | "h2o" | "tova" | "keynorm" | "random"
    size: k, the multi-state size (None for full)
    sinks: i, positions < i are never evicted (sinks, TOVA+i)
    per_head: True: each KV head chooses on its own, scoring with the mean over its query group
              (H2O, TOVA-head); False: one choice per layer, mean over all query heads
              (H2O-layer, TOVA). Window/Sinks do not look at attention; their choice is shared.
    seed: for "random" only (the reference's own random numbers; they cannot match msrnn's).
    """

    seed: int = 0

    @staticmethod
    def full():
        return Rule("full")

    @staticmethod
    def window(k):
        return Rule("window", k)

    @staticmethod
    def sinks_(k, i):
        return Rule("sinks", k, sinks=i)

    @staticmethod
    def h2o(k):
        return Rule("h2o", k, per_head=True)

    @staticmethod
    def h2o_layer(k):
        return Rule("h2o", k, per_head=False)

    @staticmethod
    def tova(k, sinks=0):
        return Rule("tova", k, sinks=sinks)

    @staticmethod
    def tova_head(k):
        return Rule("tova", k, per_head=True)

    @staticmethod
    def keynorm(k, sinks=0):
        return Rule("keynorm", k, sinks=sinks, per_head=True)

    @staticmethod
    def random(k, seed=0):
        return Rule("random", k, seed=seed)


def phi(d):
    """The compressed gap: φ(d) = d for d <= 10, 10 + ln(ln(d - 10 + e)) above."""
    return d if d <= 10 else 10 + math.log(math.log(d - 10 + math.e))


def rotary_positions(states, scheme: str):
    """The rotary positions of one KV head's candidates C under a position scheme (docs/design.md,
    "Positions"): ({absolute position: rotary position}, the query's). With p_1 < p_2 < ... the
    absolute positions of C:
      original:   p_i.
      cache:      i - 1 (0, 1, ..., |C| - 1).
      compressed: the running sum of ceil(φ(d_j)), j <= i, over the gaps d_1 = p_1,
                  d_j = p_j - p_{j-1}.
    The query is the newest candidate's (the new token's)."""
    p = sorted(s.pos for s in states)
    if scheme == "original":
        r = list(p)
    elif scheme == "cache":
        r = list(range(len(p)))
    elif scheme == "compressed":
        r, total, previous = [], 0, 0
        for x in p:
            total += math.ceil(phi(x - previous))
            r.append(total)
            previous = x
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    return dict(zip(p, r)), r[-1]


def gelu_tanh(x):
    """GELU, tanh approximation (Gemma's gelu_pytorch_tanh):
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class Reference(core.Reference):
    """The model as an MSRNN, (x_t, H_{t-1}) -> (y_t, H_t), with one policy (a `Rule`), from a
    transformers model object of any family above, under a position scheme."""

    def __init__(self, hf, rule: Rule, positions: str = "original"):
        cfg = hf.config
        self.rule, self.scheme, self.t = rule, positions, 0
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads or self.n_heads
        self.group = self.n_heads // self.n_kv
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        # transformers 5 keeps theta and the RoPE type in rope_parameters (alias rope_scaling).
        rope_params = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
                       or {})
        if rope_params.get("rope_type", rope_params.get("type", "default")) != "default":
            raise NotImplementedError("the reference computes default RoPE only")
        self.theta = float(rope_params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        self.family = cfg.model_type
        gemma = self.family == "gemma2"
        # Sliding-window attention, per layer: a query at t sees positions p with t - p < w, w
        # the checkpoint's sliding_window (Mistral: every layer; Gemma2: the layers
        # config.layer_types marks "sliding_attention").
        w = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * self.n_layers
        if self.family == "mistral" and w is not None:
            raise NotImplementedError("the reference has no native sliding window for Mistral; "
                                      "build the Mistral model with sliding_window=None")
        self.windows = [w if kind == "sliding_attention" else None for kind in types]
        # Gemma2: scores scaled by query_pre_attn_scalar^-1/2 and soft-capped,
        # cap * tanh(s / cap); logits soft-capped the same way; embeddings times sqrt(width).
        self.scale = (cfg.query_pre_attn_scalar ** -0.5 if gemma
                      else 1.0 / math.sqrt(self.head_dim))
        self.softcap = getattr(cfg, "attn_logit_softcapping", None)
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        self.embed_scale = math.sqrt(cfg.hidden_size) if gemma else 1.0
        # The MLP's activation: SiLU, or Gemma's tanh-approximated GELU.
        self.act = gelu_tanh if gemma else torch.nn.functional.silu

        def f64(t):
            return t.detach().to(torch.float64).clone()

        def norm_weight(norm):
            """Gemma's RMSNorm multiplies by (1 + w); LLaMA's by w."""
            return 1.0 + f64(norm.weight) if gemma else f64(norm.weight)

        def bias(proj, n):
            """A projection's bias (Qwen2: q, k, v have one), zeros if it has none."""
            return f64(proj.bias) if proj.bias is not None else torch.zeros(n, dtype=torch.float64)

        def layer(L):
            A, M, D = L.self_attn, L.mlp, self.head_dim
            nq, nkv = self.n_heads * D, self.n_kv * D
            if hasattr(A, "qkv_proj"):        # Phi3: q, k, v stacked in one matrix, in that order
                qkv = f64(A.qkv_proj.weight)
                q, k, v = qkv[:nq], qkv[nq:nq + nkv], qkv[nq + nkv:]
                qkv_b = bias(A.qkv_proj, nq + 2 * nkv)
                bq, bk, bv = qkv_b[:nq], qkv_b[nq:nq + nkv], qkv_b[nq + nkv:]
            else:
                q, k, v = f64(A.q_proj.weight), f64(A.k_proj.weight), f64(A.v_proj.weight)
                bq, bk, bv = bias(A.q_proj, nq), bias(A.k_proj, nkv), bias(A.v_proj, nkv)
            if hasattr(M, "gate_up_proj"):    # Phi3: gate and up stacked, gate first
                gate_up = f64(M.gate_up_proj.weight)
                gate, up = gate_up[:gate_up.shape[0] // 2], gate_up[gate_up.shape[0] // 2:]
            else:
                gate, up = f64(M.gate_proj.weight), f64(M.up_proj.weight)
            assert A.o_proj.bias is None, "the reference has a bias-free output projection only"
            d = dict(attn_norm=norm_weight(L.input_layernorm), q=q, k=k, v=v, bq=bq, bk=bk, bv=bv,
                     o=f64(A.o_proj.weight), gate=gate, up=up, down=f64(M.down_proj.weight),
                     # Qwen3: each head's q and k are RMS-normalized (over D) before RoPE.
                     q_norm=f64(A.q_norm.weight) if hasattr(A, "q_norm") else None,
                     k_norm=f64(A.k_norm.weight) if hasattr(A, "k_norm") else None)
            if gemma:
                # Gemma2: the attention output and the MLP are normed before their residual add,
                # and the MLP's input norm is pre_feedforward_layernorm.
                d.update(post_attn_norm=norm_weight(L.post_attention_layernorm),
                         mlp_norm=norm_weight(L.pre_feedforward_layernorm),
                         post_mlp_norm=norm_weight(L.post_feedforward_layernorm))
            else:
                d.update(mlp_norm=norm_weight(L.post_attention_layernorm))
            return d

        m = hf.model
        self.embed = f64(m.embed_tokens.weight)
        self.final_norm = norm_weight(m.norm)
        self.lm_head = f64(hf.lm_head.weight)
        self.layers = [layer(L) for L in m.layers]
        self.rng = random.Random(rule.seed)
        # H[l][kv]: layer l's multi-state for KV head kv, a list of States (empty: H_0).
        self.H = [[[] for _ in range(self.n_kv)] for _ in range(self.n_layers)]

    # ------------------------------------------------------------------------------ one step

    def step(self, token: int, evict: bool = True):
        """One token at position t: every layer is an MSRNN cell, then final norm and LM head.
        Returns the logits [V] (float64). evict=False keeps every candidate (used by `oneshot`);
        `last_rows[l]` is layer l's attention row, a[h] = {position: weight}."""
        x = self.embed[token].clone() * self.embed_scale
        self.last_rows = []
        for l in range(self.n_layers):
            x = self.layer_step(l, x, self.t, evict)
        self.t += 1
        logits = self.lm_head @ rms_norm(x, self.final_norm, self.eps)
        if self.final_softcap is not None:
            logits = self.final_softcap * torch.tanh(logits / self.final_softcap)
        return logits

    def qkv(self, W, u):
        """q_{t,h}, K_t, V_t before RoPE, with the projections' biases (Qwen2) and, Qwen3, an
        RMSNorm over each head."""
        D = self.head_dim
        q_all, k_all, v_all = W["q"] @ u + W["bq"], W["k"] @ u + W["bk"], W["v"] @ u + W["bv"]
        q = [q_all[h * D:(h + 1) * D] for h in range(self.n_heads)]
        k = [k_all[kv * D:(kv + 1) * D] for kv in range(self.n_kv)]
        v = [v_all[kv * D:(kv + 1) * D] for kv in range(self.n_kv)]
        if W["q_norm"] is not None:
            q = [rms_norm(x, W["q_norm"], self.eps) for x in q]
            k = [rms_norm(x, W["k_norm"], self.eps) for x in k]
        return q, k, v

    def attend(self, l, q, C, t):
        a, o = super().attend(l, q, C, t)
        self.last_rows.append(a)
        return a, o

    def positions(self, cands):
        """RoPE at the scheme's positions, recomputed from the positions the KV head keeps."""
        return rotary_positions(cands, self.scheme)

    def scores(self, l, t, q_h, keys, cands):
        """A layer with a sliding window w attends only to candidates with t - p < w; the others
        get attention 0 (they stay candidates for the policy). Gemma2 soft-caps the scores."""
        w = self.windows[l]
        seen = [s for s in cands if w is None or t - s.pos < w]
        scores = [float(q_h @ keys[s.pos]) * self.scale for s in seen]
        if self.softcap is not None:
            scores = [self.softcap * math.tanh(x / self.softcap) for x in scores]
        return seen, scores

    def attention_output(self, W, o):
        out = W["o"] @ torch.cat(o)
        return rms_norm(out, W["post_attn_norm"], self.eps) if "post_attn_norm" in W else out

    def mlp(self, W, u):
        out = W["down"] @ (self.act(W["gate"] @ u) * (W["up"] @ u))
        return rms_norm(out, W["post_mlp_norm"], self.eps) if "post_mlp_norm" in W else out

    # ------------------------------------------------------------------------------ eviction

    def scoring_heads(self, kv):
        """The heads whose attention a KV head's choice averages: its own query group for
        head-wise policies (H2O, TOVA-head), all query heads for layer-wise ones."""
        if self.rule.per_head:
            return list(range(kv * self.group, (kv + 1) * self.group))
        return list(range(self.n_heads))

    def mean_attention(self, a, pos, heads):
        """mean over the query heads `heads` of a_h(pos)."""
        return sum(a[h][pos] for h in heads) / len(heads)

    def evict(self, C, a, t):
        if self.rule.kind == "h2o":
            # "acc_j = Σ_τ mean_{h∈group} a_{τ,h}(j), summed over every step τ since j
            # entered, this one included" (H2O-layer: mean over all heads). Accumulate at every step.
            for kv in range(self.n_kv):
                for s in C[kv]:
                    s.acc += self.mean_attention(a, s.pos, self.scoring_heads(kv))
        return super().evict(C, a, t)

    def victim(self, cands, a, kv):
        """The evicted position among `cands` (one KV head's candidates; a layer-wise policy
        passes any head's, they are identical). Ties break toward the oldest position: among
        the eligible candidates with the minimal score, the smallest position is evicted."""
        rule, k = self.rule, self.rule.size
        if rule.kind == "tova":
            # TOVA(k): "argmin_j mean over all query heads of a_h(j)"; TOVA-head: per KV head,
            # the mean over that head's query group. TOVA+i protects positions < i.
            return super().victim(cands, a, kv)
        if rule.kind == "window":
            # Window(k): "the oldest position".
            eligible, score = cands, (lambda s: s.pos)
        elif rule.kind == "sinks":
            # Sinks(k, i): "the oldest position >= i (the first i tokens are never evicted)".
            eligible, score = [s for s in cands if s.pos >= rule.sinks], (lambda s: s.pos)
        elif rule.kind == "h2o":
            # H2O(k): "among candidates other than the k//2 most recent (the new token counts as
            # one of them): lowest accumulated score acc_j".
            by_age = sorted(cands, key=lambda s: s.pos, reverse=True)   # newest first
            eligible, score = by_age[k // 2:], (lambda s: s.acc)
        elif rule.kind == "keynorm":
            # KeyNorm(k): per KV head, the candidate whose key has the largest L2 norm (lowest
            # score = minus the norm); positions < sinks protected.
            eligible = [s for s in cands if s.pos >= rule.sinks]
            score = (lambda s: -math.sqrt(sum(float(x) ** 2 for x in s.key)))
        elif rule.kind == "random":
            # Random(k): any candidate (the new token included) with equal probability.
            eligible = [s for s in cands if s.pos >= rule.sinks]
            return self.rng.choice(sorted(s.pos for s in eligible))
        else:
            raise ValueError(f"unknown rule {rule.kind!r}")
        return min(eligible, key=lambda s: (score(s), s.pos)).pos

    # ------------------------------------------------------------------------------ prompts

    def oneshot(self, tokens):
        """docs/design.md's `oneshot` prompt mode: "full causal attention over the whole prompt, then
        each layer keeps the k states ranked best by the policy from the last prompt token's
        attention row (Window: the last k; Sinks: first i + last k-i; H2O: column sums over all
        prompt queries)". The multi-state must be empty. Returns the prompt's logits [T, V].

        Stepping the prompt with nothing evicted *is* full causal attention: step t's attention
        row over candidates 0..t is row t of the causal attention matrix."""
        T = len(tokens)
        logits, layers = self.prompt_attention(tokens)
        for l, attention in enumerate(layers):
            norms = [{s.pos: math.sqrt(sum(float(x) ** 2 for x in s.key)) for s in states}
                     for states in self.H[l]]
            keep = oneshot_keep(attention, self.rule, self.n_kv, norms)
            new = []
            for kv in range(self.n_kv):
                states = [s for s in self.H[l][kv] if s.pos in keep[kv]]
                if self.rule.kind == "h2o":
                    # Decoding goes on accumulating from the prompt's column sums.
                    heads = self.scoring_heads(kv)
                    for s in states:
                        s.acc = sum(attention[h][i][s.pos] for h in heads
                                    for i in range(T)) / len(heads)
                new.append(states)
            self.H[l] = new
        return logits

    def prompt_attention(self, tokens):
        """Step a prompt into the empty multi-state with nothing evicted (full causal
        attention) -> (its logits [T, V], attention[l][h][i][j]: layer l, query head h, query
        i's weight on key j, 0 above the diagonal)."""
        assert self.t == 0, "oneshot compresses a prompt into an empty multi-state"
        T, rows, logits = len(tokens), [], []     # rows[t][l][h] = {pos: a_h(pos)} at query t
        for tok in tokens:
            logits.append(self.step(tok, evict=False))
            rows.append(self.last_rows)
        return torch.stack(logits), [[[[rows[i][l][h].get(j, 0.0) for j in range(T)]
                                       for i in range(T)] for h in range(self.n_heads)]
                                     for l in range(self.n_layers)]


def oneshot_keep(attention, rule: Rule, n_kv: int, key_norms=None):
    """Which prompt positions a layer keeps under `oneshot`, per KV head: a list of n_kv sorted
    lists. attention: [H][T][T] nested lists or a tensor, attention[h][i][j] = query i's causal
    attention weight on key j (e.g. Hugging Face's output_attentions for one layer and row).

    Ranked best first by the policy's score, ties keeping the newer position:
      Full: everything. Window: the last k. Sinks: the first i + the last k - i.
      TOVA: positions < sinks, then the best by the last row averaged over all heads
            (TOVA-head: over the KV head's query group).
      H2O:  the k//2 most recent, then the best of the rest by column sums over all prompt
            queries, averaged over the KV head's query group (H2O-layer: over all heads).
      KeyNorm: positions < sinks, then the smallest key norms (key_norms[kv][j], per KV head)."""
    H, T = len(attention), len(attention[0])
    group = H // n_kv
    k = rule.size
    if k is None or T <= k:
        return [list(range(T)) for _ in range(n_kv)]

    def a(h, i, j):
        return float(attention[h][i][j])

    result = []
    for kv in range(n_kv):
        heads = [h for h in range(H) if h // group == kv] if rule.per_head else list(range(H))
        if rule.kind == "window":
            keep = list(range(T - k, T))
        elif rule.kind == "sinks":
            keep = list(range(rule.sinks)) + list(range(T - (k - rule.sinks), T))
        elif rule.kind == "tova":
            protected = list(range(rule.sinks))
            score = {j: sum(a(h, T - 1, j) for h in heads) / len(heads) for j in range(T)}
            rest = sorted(range(rule.sinks, T), key=lambda j: (-score[j], -j))
            keep = protected + rest[:k - len(protected)]
        elif rule.kind == "h2o":
            recent = list(range(T - k // 2, T))
            score = {j: sum(a(h, i, j) for h in heads for i in range(T)) / len(heads)
                     for j in range(T)}
            rest = sorted(range(T - k // 2), key=lambda j: (-score[j], -j))
            keep = recent + rest[:k - len(recent)]
        elif rule.kind == "keynorm":
            protected = list(range(rule.sinks))
            rest = sorted(range(rule.sinks, T), key=lambda j: (key_norms[kv][j], -j))
            keep = protected + rest[:k - len(protected)]
        else:
            raise ValueError(f"oneshot has no rule for {rule.kind!r}")
        result.append(sorted(keep))
    return result

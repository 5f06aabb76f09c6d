"""Read this first: the paper's multi-state RNN for a LLaMA checkpoint, in Python lists and loops.

(x_t, H_{t-1}) -> (y_t, H_t): a token in, its logits out; H_t holds one list of `State`s per layer
and KV head (H_0: empty lists). `Reference.layer_step` is an MSRNN cell (Eq. 5-8), `evict` Eq. 9.

    weights = safetensors.torch.load_file("model.safetensors")    # or hf_model.state_dict()
    ref = Reference(weights, json.load(open("config.json")), Rule("tova", 16))
    logits = ref.step(token_id)              # [V], float64
    ref.kept(layer)                          # [[positions KV head 0 keeps], [.. head 1], ...]

Keys are stored unrotated (K_j before RoPE) and turned where they are used, since the rotary
position of a kept key is a choice (docs/msrnn.md, "Positions are a choice"); here it is p_j at
every step, the same as rotating once. Other schemes, policies, families: reference_families.py.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class State:
    """One KV head's state of token j: position p_j, K_j (before RoPE), V_j; H2O's score acc_j."""
    pos: int
    key: torch.Tensor
    value: torch.Tensor
    acc: float = 0.0


@dataclass(frozen=True)
class Rule:
    """kind "full" or "tova" (reference_families.py: the others), size k, sinks i (positions
    < i never leave), per_head (each KV head chooses by its own query group's attention)."""
    kind: str
    size: int | None = None
    sinks: int = 0
    per_head: bool = False


class Reference:
    """weights: tensors under Hugging Face's names; config: config.json as a dict."""
    def __init__(self, weights, cfg, rule: Rule):
        self.rule, self.t = rule, 0
        self.n_layers, self.n_heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads") or self.n_heads
        self.group = self.n_heads // self.n_kv                  # G query heads per KV head
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // self.n_heads
        self.eps, self.scale = cfg["rms_norm_eps"], 1.0 / math.sqrt(self.head_dim)
        self.theta = cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 1e4)
        w = {name: x.detach().to(torch.float64) for name, x in weights.items()}
        self.embed, self.final_norm = w["model.embed_tokens.weight"], w["model.norm.weight"]
        self.lm_head = w.get("lm_head.weight", self.embed)      # tied: the embedding matrix
        names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
                 **{x: f"self_attn.{x}_proj" for x in "qkvo"},
                 **{x: f"mlp.{x}_proj" for x in ("gate", "up", "down")}}
        self.layers = [{key: w[f"model.layers.{l}.{name}.weight"] for key, name in names.items()}
                       for l in range(self.n_layers)]
        self.H = [[[] for _ in range(self.n_kv)] for _ in range(self.n_layers)]   # H_0

    def kept(self, layer):                                   # [[p, ...] per KV head]
        return [sorted(s.pos for s in states) for states in self.H[layer]]

    def step(self, token: int, evict: bool = True):
        """(x_t, H_{t-1}) -> (y_t, H_t), the token at position t: its logits y_t [V]."""
        x = self.embed[token].clone()
        for l in range(self.n_layers):
            x = self.layer_step(l, x, self.t, evict)
        self.t += 1
        return self.lm_head @ rms_norm(x, self.final_norm, self.eps)

    def layer_step(self, l, x, t, evict=True):
        """One MSRNN cell, (x^l_t, H^l_{t-1}) -> (x^{l+1}_t, H^l_t): Eq. 5-8, then Eq. 9."""
        W = self.layers[l]
        q, k, v = self.qkv(W, rms_norm(x, W["attn_norm"], self.eps))
        # The candidates C = H^l_{t-1} ∪ {t} per KV head (Eq. 6), the new key unrotated.
        C = [self.H[l][kv] + [State(t, k[kv], v[kv])] for kv in range(self.n_kv)]
        a, o = self.attend(l, q, C, t)
        x = x + self.attention_output(W, o)                      # + o_t (Eq. 7)
        self.H[l] = self.evict(C, a, t) if evict else C          # Eq. 9: H^l_t = C \ {e}
        return x + self.mlp(W, rms_norm(x, W["mlp_norm"], self.eps))

    def qkv(self, W, u):                         # q_{t,h} per query head, K_t and V_t per KV head
        D, q, k, v = self.head_dim, W["q"] @ u, W["k"] @ u, W["v"] @ u
        return ([q[h * D:(h + 1) * D] for h in range(self.n_heads)],
                [k[kv * D:(kv + 1) * D] for kv in range(self.n_kv)],
                [v[kv * D:(kv + 1) * D] for kv in range(self.n_kv)])

    def attend(self, l, q, C, t):
        """Query head h reads KV head h // G: a_{t,h}(j) = softmax_{j∈C}(q_{t,h} · K_j / sqrt(D)),
        q, K rotated by RoPE; o_h = Σ_j a_{t,h}(j) V_j. Returns a[h] = {p_j: a_{t,h}(j)}, [o_h]."""
        a, o = [], []
        for kv in range(self.n_kv):
            at, query = self.positions(C[kv])
            keys = {s.pos: rope(s.key, at[s.pos], self.theta) for s in C[kv]}
            for h in range(kv * self.group, (kv + 1) * self.group):
                seen, scores = self.scores(l, t, rope(q[h], query, self.theta), keys, C[kv])
                probs = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0).tolist()
                a.append({s.pos: 0.0 for s in C[kv]} | {s.pos: p for s, p in zip(seen, probs)})
                o.append(sum((p * s.value for s, p in zip(seen, probs)),
                             torch.zeros(self.head_dim, dtype=torch.float64)))
        return a, o

    def positions(self, cands):                  # {p_j: rotary position}, the query's: p_j, t
        return {s.pos: s.pos for s in cands}, cands[-1].pos

    def scores(self, l, t, q_h, keys, cands):    # the candidates it sees, q · K_j / sqrt(D)
        return cands, [float(q_h @ keys[s.pos]) * self.scale for s in cands]

    def attention_output(self, W, o):            # o_t = concat_h(o_h) W_O
        return W["o"] @ torch.cat(o)

    def mlp(self, W, u):                         # SwiGLU
        return W["down"] @ (F.silu(W["gate"] @ u) * (W["up"] @ u))

    def evict(self, C, a, t):
        """Eq. 9: once |C| = k + 1, one candidate leaves every KV head (per_head: each its own)."""
        k = self.rule.size
        if k is None or len(C[0]) <= k:      # Full, or |C| <= k: nothing leaves
            return C
        if self.rule.per_head:
            victims = [self.victim(C[kv], a, kv) for kv in range(self.n_kv)]
        else:                                # every KV head holds the same positions
            assert all([s.pos for s in C[kv]] == [s.pos for s in C[0]] for kv in range(self.n_kv))
            victims = [self.victim(C[0], a, 0)] * self.n_kv
        return [[s for s in C[kv] if s.pos != victims[kv]] for kv in range(self.n_kv)]

    def victim(self, cands, a, kv):
        """TOVA: e = argmin_j ā_t(j), a_{t,h}(j) averaged over all query heads (per_head: KV head
        kv's group); positions < sinks never leave; ties go to the oldest position."""
        heads = (range(kv * self.group, (kv + 1) * self.group) if self.rule.per_head
                 else range(self.n_heads))
        eligible = [s for s in cands if s.pos >= self.rule.sinks]
        return min(eligible, key=lambda s: (sum(a[h][s.pos] for h in heads) / len(heads),
                                            s.pos)).pos


def rms_norm(x, weight, eps):                    # y = w * x / sqrt(mean(x^2) + eps)
    return weight * (x / math.sqrt(float((x * x).mean()) + eps))


def rope(x, p, theta):
    """RoPE at position p, rotate-half layout: (x_i, x_{i+D/2}) turns by p theta^(-2i/D)."""
    D = x.shape[0]
    angle = p * theta ** (-2.0 * torch.arange(D // 2, dtype=torch.float64) / D)
    x1, x2, c, s = x[:D // 2], x[D // 2:], angle.cos(), angle.sin()
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s])


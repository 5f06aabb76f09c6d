"""msrnn's policies inside Hugging Face transformers 5: a bounded multi-state as a `Cache`.

    from transformers import AutoModelForCausalLM
    import msrnn, msrnn.hf
    model = AutoModelForCausalLM.from_pretrained(path)
    cache = msrnn.hf.MultiStateCache(model, msrnn.policies.TOVA(64))   # prepares the model
    out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=200)
    cache.positions(layer)                     # LongTensor [B, H_kv, n]: kept positions, ascending

The semantics are docs/design.md's, computed by msrnn's own multi-state (state.LayerState): at
a step the new token joins the candidates, the query attends over all of them, then the policy
evicts one. A multi-token forward into an empty cache is the `oneshot` prompt mode (full causal
attention over the prompt, then each layer keeps the best k); feed the first min(T, k + 1)
tokens at once and the rest one at a time for `sequential`.

How it gets into the model (docs/transformers.md): the constructor registers an attention
function named "msrnn" with transformers' AttentionInterface, and a mask function of the same
name with AttentionMaskInterface, and sets the model's attention implementation to it. The mask
function only hands the 2-D padding mask through; the attention function computes the step's
attention over the multi-state (it needs the probabilities, which no fused kernel returns) and
lets the policy evict. Models that are not given to a MultiStateCache are left alone.
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .model import visible
from .policies import Policy
from .state import LayerState

NAME = "msrnn"
_pending = []      # (cache, layer_idx, kwargs) between a Cache.update and its attention call


# ------------------------------------------------------------------------------ the mask

class PaddingMask:
    """What the "msrnn" mask function gives the attention function: the forward's 2-D padding
    mask (or None) and, for a forward without a MultiStateCache, how to build the ordinary
    causal mask."""

    def __init__(self, mask2d, kwargs):
        self.mask2d, self.kwargs = mask2d, kwargs

    def causal(self):
        """The ordinary 4-D boolean mask [B, 1, q, kv] (transformers' own sdpa_mask)."""
        return sdpa_mask(**self.kwargs, allow_is_causal_skip=False)


def mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):
    kw = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
              kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
              device=kwargs.get("device"))
    return PaddingMask(attention_mask, kw)


# ------------------------------------------------------------------------------ attention

def softcapped(scores, softcap):
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def probabilities(q, keys, mask, scaling, softcap):
    """softmax(q K^T * scaling) over visible keys: q [B, Hkv, G, T, D], keys [B, Hkv, S, D],
    mask broadcastable to [B, Hkv, G, T, S]. Rows with nothing visible (padding) are all 0."""
    B, Hkv, G, T, D = q.shape
    scores = (q.reshape(B, Hkv, G * T, D) @ keys.transpose(-1, -2)).view(B, Hkv, G, T, -1)
    scores = softcapped(scores * scaling, softcap).masked_fill(~mask, -torch.inf)
    probs = scores.softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32))
    return probs.nan_to_num(0.0)


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
              softcap=None, sliding_window=None, **kwargs):
    """The "msrnn" attention function: query [B, Hq, T, D], key and value [B, Hkv, T, D] (this
    forward's tokens; RoPE applied) -> output [B, T, Hq, D], attention weights (None)."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if _pending:
        cache, layer_idx, update_kwargs = _pending.pop()
        if module.layer_idx != layer_idx or id(module) not in cache._modules:
            raise ValueError("this MultiStateCache was made for another model; make one "
                             "MultiStateCache(model, policy) per model")
        mask2d = attention_mask.mask2d if isinstance(attention_mask, PaddingMask) else None
        positions = kwargs.get("position_ids", update_kwargs.get("position_ids"))
        return cache.layers[layer_idx].attend(query, key, value, mask2d, positions, scaling,
                                              softcap, sliding_window), None
    # No MultiStateCache in this forward: ordinary attention (causal, padding, window).
    mask = attention_mask.causal() if isinstance(attention_mask, PaddingMask) else attention_mask
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    if mask is None:
        mask = torch.ones(T, key.shape[2], dtype=torch.bool, device=query.device).tril(
            key.shape[2] - T)
    mask = mask[:, :, :, : key.shape[2]] if mask.dim() == 4 else mask
    if mask.dtype != torch.bool:
        mask = mask == 0
    mask = mask.view(mask.shape[0], 1, 1, *mask.shape[-2:]) if mask.dim() == 4 else mask
    probs = probabilities(query.view(B, Hkv, Hq // Hkv, T, D), key, mask, scaling, softcap)
    out = probs.to(value.dtype).view(B, Hkv, -1, key.shape[2]) @ value
    return out.view(B, Hq, T, D).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, mask_function)


# ------------------------------------------------------------------------------ the cache

class MultiStateLayer(CacheLayerMixin):
    """One layer's multi-state (msrnn.state.LayerState) as a transformers cache layer."""

    is_sliding = False

    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = policy
        self.state = None       # LayerState, made at the first forward (batch, dtype, device)
        self.seen = 0           # tokens seen (kept or not): the position of the next

    def lazy_initialization(self, key_states, value_states):
        B, Hkv, T, D = key_states.shape
        slots = self.policy.size + 1 if self.policy.bounded else max(256, T)
        self.state = LayerState(self.policy, B, Hkv, slots, D, key_states.dtype,
                                key_states.device)
        self.keys, self.values = self.state.keys, self.state.values
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states     # the work is in `attend`, which needs the query

    def get_mask_sizes(self, query_length):
        return self.seen + query_length, 0

    def get_seq_length(self):
        return self.seen

    def get_max_length(self):
        return -1

    def reset(self):
        self.state, self.seen, self.is_initialized = None, 0, False
        self.keys = self.values = None

    def attend(self, q, k, v, mask2d, positions, scaling, softcap, window):
        """This forward's tokens (q [B, Hq, T, D], k and v [B, Hkv, T, D]) against the
        multi-state: write them in, attend, evict. Returns [B, T, Hq, D]."""
        B, Hq, T, D = q.shape
        Hkv = k.shape[1]
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        st, start = self.state, self.seen
        if st.pos.shape[0] != B or st.pos.shape[1] != Hkv or st.keys.shape[-1] != D:
            raise ValueError(f"this MultiStateCache holds batch {st.pos.shape[0]} with "
                             f"{st.pos.shape[1]} KV heads of dim {st.keys.shape[-1]}, but got "
                             f"batch {B}, {Hkv} KV heads of dim {D}; make a new "
                             f"MultiStateCache for each batch (or call cache.reset())")
        # Each row's positions: what the model was given (generate derives them from the
        # attention mask), else start .. start+T-1; a pad is -1, never a state, never attended.
        if positions is None or positions.dim() != 2:
            pos = torch.arange(start, start + T, device=q.device).expand(B, T)
        else:
            pos = positions.to(q.device).expand(B, T)
        if mask2d is not None:
            pos = pos.masked_fill(~mask2d[:, -T:].to(device=q.device, dtype=torch.bool), -1)
        q = q.reshape(B, Hkv, Hq // Hkv, T, D)
        q_pos = pos.view(B, 1, 1, T, 1)
        if not self.policy.bounded:
            out = self.full(q, k, v, pos, q_pos, start, scaling, softcap, window)
        elif T == 1:
            t = pos.view(B, 1, 1)
            st.insert(k[:, :, 0], v[:, :, 0], t)                                # C = H ∪ {t}
            mask = visible(q_pos, st.pos[:, :, None, None], window)
            probs = probabilities(q, st.keys, mask, scaling, softcap)           # [B,Hkv,G,1,S]
            out = probs.to(v.dtype) @ st.values[:, :, None]
            st.evict(probs[:, :, :, 0], t)                                      # H_t = C \ {e}
        else:
            if start > 0:
                raise ValueError(
                    f"a bounded MultiStateCache takes several tokens at once only into an empty "
                    f"cache (the oneshot prompt); it has seen {start} tokens, so feed the next "
                    f"ones one at a time (model(ids[:, i:i+1], cache=cache)), or start a new "
                    f"cache")
            out = self.oneshot(q, k, v, pos, q_pos, scaling, softcap, window)
        self.seen += T
        return out.reshape(B, Hq, T, D).transpose(1, 2).contiguous()

    def full(self, q, k, v, pos, q_pos, start, scaling, softcap, window):
        """Full: the multi-state grows; nothing leaves."""
        st, (B, Hkv, G, T, D) = self.state, q.shape
        if start + T > st.pos.shape[-1]:
            st.grow(max(2 * st.pos.shape[-1], start + T))
            self.keys, self.values = st.keys, st.values
        st.append(k, v, start)
        st.pos[:, :, start:start + T] = pos[:, None]
        n = start + T
        k_pos = st.pos[:, :, None, None, :n]
        # A pad query sees only itself (its output is never used; this keeps it finite).
        own = torch.arange(n, device=q.device) == start + torch.arange(T, device=q.device)[:, None]
        mask = visible(q_pos, k_pos, window) | (own & (q_pos < 0))
        if softcap is None:
            out = F.scaled_dot_product_attention(
                q.reshape(B, Hkv * G, T, D), st.keys[:, :, :n], st.values[:, :, :n],
                attn_mask=mask[:, 0, 0][:, None], scale=scaling, enable_gqa=True)
            return out
        probs = probabilities(q, st.keys[:, :, :n], mask, scaling, softcap)
        return probs.to(v.dtype) @ st.values[:, :, None, :n]

    def oneshot(self, q, k, v, pos, q_pos, scaling, softcap, window, block=256):
        """An empty bounded multi-state takes a whole prompt: full causal attention over it,
        then LayerState.keep_best keeps the best k from the last query's attention row (and the
        column sums over the real queries, for a policy with memory, H2O)."""
        B, Hkv, G, T, D = q.shape
        k_pos = pos.view(B, 1, 1, 1, T)
        own = torch.eye(T, dtype=torch.bool, device=q.device)
        mask = visible(q_pos, k_pos, window) | (own & (q_pos < 0))      # [B, 1, 1, T, T]
        last = probabilities(q[:, :, :, -1:], k, mask[:, :, :, -1:], scaling, softcap)[:, :, :, 0]
        total = None
        if self.policy.memory:
            real = (q_pos >= 0)
            total = 0
            for i in range(0, T, block):
                p = probabilities(q[:, :, :, i:i + block], k, mask[:, :, :, i:i + block],
                                  scaling, softcap)
                total = total + (p * real[:, :, :, i:i + block]).sum(3)
        if softcap is None:
            out = F.scaled_dot_product_attention(q.reshape(B, Hkv * G, T, D), k, v,
                                                 attn_mask=mask[:, 0], scale=scaling,
                                                 enable_gqa=True)
        else:
            out = probabilities(q, k, mask, scaling, softcap).to(v.dtype) @ v[:, :, None]
        self.state.keep_best(k, v, pos.view(B, 1, T), last, total)
        return out


class MultiStateCache(Cache):
    """A transformers Cache whose every layer is an msrnn multi-state bounded by `policy`.

    The constructor prepares `model` (sets its attention implementation to "msrnn"); pass the
    cache to `model.generate(..., cache=cache)` or `model(ids, cache=cache)`. One cache serves
    one model and one batch; make a new one (or `reset()`) for the next sequence."""

    def __init__(self, model, policy: Policy):
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be an msrnn.policies.Policy (e.g. "
                            f"msrnn.policies.TOVA(64)), got {policy!r}")
        modules = attention_modules(model)
        n = len(modules)
        cfg = model.config.get_text_config()
        limit = getattr(cfg, "max_position_embeddings", None)
        if policy.bounded and limit is not None and policy.size >= limit:
            raise ValueError(f"multi-state size {policy.size} is not smaller than the model's "
                             f"range of {limit} positions: it would never evict; use a smaller "
                             f"size or msrnn.policies.Full()")
        super().__init__(layers=[MultiStateLayer(policy) for _ in range(n)])
        self.policy = policy
        self._modules = {id(m) for m in modules}
        self._model_name = type(model).__name__
        prepare(model)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if _pending:
            _pending.clear()
            raise ValueError("this MultiStateCache was made for another model (the model it was "
                             "passed to does not run the msrnn attention); make one "
                             "MultiStateCache(model, policy) per model")
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"layer {layer_idx} does not exist in this MultiStateCache "
                             f"({len(self.layers)} layers): it was made for another model")
        _pending.append((self, layer_idx, kwargs.get("kwargs") or {}))
        return key_states, value_states

    def positions(self, layer: int) -> torch.Tensor:
        """The absolute positions layer `layer` keeps: LongTensor [B, H_kv, n], ascending (pads and
        empty slots excluded; n = the most any row keeps, rows with fewer start with -1)."""
        st = self.layers[layer].state
        if st is None:
            raise ValueError("nothing has been fed to this MultiStateCache yet")
        pos = st.pos.sort(-1).values
        n = int((pos >= 0).sum(-1).max())
        return pos[..., pos.shape[-1] - n:]

    @property
    def is_compileable(self):
        return False

    def __repr__(self):
        return (f"MultiStateCache({self.policy}, layers={len(self.layers)}, "
                f"seen={self.get_seq_length()})")


def attention_modules(model):
    """The model's self-attention modules, one per layer, or a clear error for a model that
    cannot run this way."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel (e.g. from "
                        f"AutoModelForCausalLM.from_pretrained), got {type(model).__name__}")
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; MultiStateCache needs a "
                         f"decoder-only causal LM (e.g. AutoModelForCausalLM)")
    if not getattr(type(model), "_supports_attention_backend", False):
        raise ValueError(f"{name} does not compute attention through transformers' "
                         f"AttentionInterface, so MultiStateCache cannot hook into it; use a "
                         f"decoder-only causal LM such as Llama, Mistral, Qwen2/3, Phi3, Gemma2/3")
    modules = [m for m in model.modules()
               if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "scaling")]
    causal = [m for m in modules if getattr(m, "is_causal", False)]
    if not modules or len(causal) != len(modules):
        raise ValueError(f"{name} has no causal self-attention modules with a `layer_idx` (an "
                         f"encoder such as BERT, or an unsupported architecture); "
                         f"MultiStateCache needs a decoder-only causal LM")
    cfg = model.config.get_text_config()
    if len(modules) != cfg.num_hidden_layers or \
            sorted(m.layer_idx for m in modules) != list(range(cfg.num_hidden_layers)):
        raise ValueError(f"{name} has {len(modules)} attention modules for "
                         f"{cfg.num_hidden_layers} layers; MultiStateCache needs one "
                         f"self-attention per layer (shared-KV or hybrid models are not supported)")
    return modules


def prepare(model):
    """Route the model's attention through the "msrnn" attention function (idempotent). A
    forward without a MultiStateCache still computes ordinary attention."""
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)
    return model


# ------------------------------------------------------------------------------ for the CLI

def load(path, dtype=torch.float32, device="cpu"):
    """A transformers causal LM from a local directory or Hub id, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


@torch.inference_mode()
def chunk_nll(model, ids, policy: Policy):
    """ids [B, T] -> negative log-likelihoods [B, T-1] of tokens 2..T, decoded from an empty
    MultiStateCache with the `sequential` semantics: the first min(T, k + 1) tokens at once,
    then one at a time (Full: one forward)."""
    B, T = ids.shape
    cache = MultiStateCache(model, policy)
    n = T if not policy.bounded else min(T, policy.size + 1)
    logits = [model(ids[:, :n], cache=cache, use_cache=True).logits]
    for i in range(n, T):
        logits.append(model(ids[:, i:i + 1], cache=cache, use_cache=True).logits)
    logits = torch.cat(logits, 1)[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="none").view(B, T - 1)


@torch.inference_mode()
def generate(model, prompt_ids, policy: Policy, max_new_tokens=256, prompt_mode="oneshot",
             attention_mask=None, temperature=0.0, top_k=None, top_p=None, seed=None,
             eos_ids=None):
    """prompt_ids [B, T] -> new ids [B, N]. oneshot: model.generate (the whole prompt in one
    forward); sequential: the first min(T, k + 1) prompt tokens at once, the rest one at a time,
    then greedy/sampled steps. eos_ids: stop tokens (default: the model's generation config)."""
    if prompt_mode not in ("oneshot", "sequential"):
        raise ValueError(f"unknown prompt mode {prompt_mode!r}: use 'sequential' or 'oneshot'")
    from .generate import check_sampling, sample

    check_sampling(temperature, top_k, top_p)
    prompt_ids = torch.as_tensor(prompt_ids)
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    B, T = prompt_ids.shape
    cache = MultiStateCache(model, policy)
    if eos_ids is None:
        eos = model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    eos_ids = sorted(eos_ids)
    if prompt_mode == "oneshot":
        if seed is not None:
            torch.manual_seed(seed)
        kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens,
                  eos_token_id=eos_ids or None, pad_token_id=(eos_ids or [0])[0])
        if temperature > 0:
            kw.update(temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
        mask = attention_mask if attention_mask is not None else torch.ones_like(prompt_ids)
        out = model.generate(prompt_ids, attention_mask=mask, cache=cache, **kw)
        return out[:, T:]
    if attention_mask is not None:
        raise ValueError("prompt_mode='sequential' takes unpadded prompts; run rows one by one")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    n = T if not policy.bounded else min(T, policy.size + 1)
    logits = model(prompt_ids[:, :n], cache=cache, use_cache=True).logits[:, -1]
    for i in range(n, T):
        logits = model(prompt_ids[:, i:i + 1], cache=cache, use_cache=True).logits[:, -1]
    eos = torch.tensor(eos_ids, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    out = []
    for i in range(max_new_tokens):
        ids = sample(logits, temperature, top_k, top_p, generator)
        if len(eos):
            ids = torch.where(done, eos[0], ids)
            done |= torch.isin(ids, eos)
        out.append(ids)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = model(ids[:, None], cache=cache, use_cache=True).logits[:, -1]
    return torch.stack(out, 1) if out else torch.zeros(B, 0, dtype=torch.long)


__all__ = ["MultiStateCache", "chunk_nll", "generate", "load"]

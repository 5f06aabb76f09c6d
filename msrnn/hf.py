"""msrnn's policies inside Hugging Face transformers 5: a bounded multi-state as a `Cache`.

    from transformers import AutoModelForCausalLM
    import msrnn, msrnn.hf
    model = AutoModelForCausalLM.from_pretrained(path)
    with msrnn.hf.MultiStateCache(model, msrnn.policies.TOVA(64)) as cache:
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=200)
    cache.positions(layer)                     # LongTensor [B, H_kv, n]: kept positions, ascending

    msrnn.generate(msrnn.hf.Backend(model), ids, policy)   # every msrnn loop, on transformers

The semantics are docs/design.md's, computed by the one multi-state step (msrnn.attention) on
msrnn's own multi-state (msrnn.state.MultiState): at a step the new token joins the candidates,
the query attends over all of them, then the policy evicts one. A multi-token forward into an
empty cache is the `oneshot` prompt (full causal attention over the prompt, then each layer
keeps the best k); `Backend` runs the `sequential` schedule of msrnn.prompt as well.

How it gets into the model, and out again (docs/transformers.md). The model's attention
implementation `base` (sdpa, eager, ...) is replaced by "msrnn_<base>", which transformers'
AttentionInterface knows: its mask function is the base's own, and its attention function runs
the base's own attention unless this forward's cache handed it a layer. The hand-over is scoped
to the forward: `MultiStateCache.update` puts the layer into the keyword arguments that
transformers passes from the attention module to its attention function, so two caches, two
models or two threads never meet. A forward without a MultiStateCache computes exactly what
transformers computes; leaving the `with` block (or `release()`) restores the base
implementation. Beam search reorders the multi-state's rows with the beams.
"""

import functools
import sys

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import attention
from .policies import Policy, check_fits
from .positions import Scheme
from .state import MultiState, Shape, check

PREFIX = "msrnn_"
LAYER = "msrnn_layer"     # the keyword that carries (cache, layer index) to the attention function


# ------------------------------------------------------------------------------ attention

def implementation(base: str) -> str:
    """The name of msrnn's attention for a model whose own is `base`, registered with
    transformers once per base (the registries are transformers'; the name says everything)."""
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, functools.partial(attend, base=base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def attend(module, query, key, value, attention_mask, base: str, **kwargs):
    """The "msrnn_<base>" attention function: query [B, Hq, T, D], key and value [B, Hkv, T, D]
    (RoPE applied) -> ([B, T, Hq, D], None). With a layer from a MultiStateCache: the step over
    the multi-state; without one: the base implementation, untouched."""
    handed = kwargs.pop(LAYER, None)
    if handed is None:
        own = ALL_ATTENTION_FUNCTIONS[base] if base in ALL_ATTENTION_FUNCTIONS.valid_keys() else \
            sys.modules[type(module).__module__].eager_attention_forward
        return own(module, query, key, value, attention_mask, **kwargs)
    cache, layer = handed
    return cache.attend(module, layer, query, key, value, attention_mask, kwargs), None


def padding(mask, T: int):
    """Which of this forward's T tokens are real [B, T], read from the diagonal of the base's
    4-D mask (a token sees itself unless it is a pad); None: no padding."""
    if mask is None or not torch.is_tensor(mask) or mask.dim() != 4:
        return None
    seen = mask if mask.dtype == torch.bool else mask == 0          # eager: an additive mask
    i = torch.arange(T, device=mask.device)
    return seen[:, 0, i, seen.shape[-1] - T + i]


# ------------------------------------------------------------------------------ the cache

class MultiStateLayer(CacheLayerMixin):
    """One layer of a MultiStateCache, as transformers sees it: sizes only (the states are the
    cache's MultiState, and the work happens in `MultiStateCache.attend`)."""

    is_sliding = False

    def __init__(self, cache: "MultiStateCache"):
        super().__init__()
        self.cache, self.is_initialized = cache, True

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def get_mask_sizes(self, query_length):
        return self.cache.seen + query_length, 0

    def get_seq_length(self):
        return self.cache.seen

    def get_max_length(self):
        return -1


class MultiStateCache(Cache):
    """A transformers Cache whose layers are an msrnn multi-state bounded by `policy`.

    The constructor prepares `model`; pass the cache to `model.generate(..., cache=cache)` or
    `model(ids, cache=cache)`, best inside `with cache:`, which restores the model's own
    attention on the way out. One cache serves one model and one batch (beam search included);
    make a new one for the next sequence. `positions`: how the kept states are numbered for
    RoPE ("original", "cache", "compressed": msrnn.positions), `allow_past_range`: run absolute
    positions past the model's range anyway. `state`: a MultiState to continue, and `modules`:
    the model's attention modules, already checked (msrnn.hf.Backend, which makes a cache per
    forward and so checks the model once, not at every step)."""

    def __init__(self, model, policy: Policy, state: MultiState | None = None, *,
                 modules: list | None = None, positions="original",
                 allow_past_range: bool = False):
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be an msrnn.policies.Policy (e.g. "
                            f"msrnn.policies.TOVA(64)), got {policy!r}")
        modules = attention_modules(model) if modules is None else modules
        self.model, self.policy, self.state = model, policy, state
        self.shape = shape_of(model)
        check_fits(policy, self.shape.positions,
                   f"the model's range of {self.shape.positions} positions",
                   layers=self.shape.layers,
                   kv_heads=self.shape.kv_heads if self.shape.group is None else None)
        self.scheme, self.allow_past_range = Scheme.of(positions), allow_past_range
        self.rope = rope_of(model) if self.scheme is not Scheme.ORIGINAL and state is None \
            else None
        self.modules = {id(m) for m in modules}
        self.restrict, self.waiting = False, None    # see Backend.parallel; update -> attend
        super().__init__(layers=[MultiStateLayer(self) for _ in modules])
        self.base = prepare(model)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def release(self):
        """Give the model back its own attention implementation."""
        if self.model.config._attn_implementation.startswith(PREFIX):
            self.model.set_attn_implementation(self.base)

    @property
    def seen(self) -> int:
        return 0 if self.state is None else self.state.length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Hand this layer to the attention function through the forward's own keyword
        arguments (the same dict transformers passes on to it), and make room at layer 0."""
        if self.waiting is not None:
            self.waiting = None
            raise ValueError("this MultiStateCache was made for another model (the model it "
                             "was passed to does not run msrnn's attention); make one "
                             "MultiStateCache(model, policy) per model")
        forward_kwargs = kwargs.get("kwargs")
        if not isinstance(forward_kwargs, dict) or not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"{type(self.model).__name__} does not pass its attention's "
                             f"arguments to the cache, or has another number of layers; "
                             f"MultiStateCache cannot run it")
        B, Hkv, T, D = key_states.shape
        if self.state is None:
            self.state = MultiState(self.shape, self.policy, B, None, self.scheme,
                                    self.allow_past_range, self.rope)
        if (B, Hkv, D) != (self.state.batch_size, self.shape.kv_heads, self.shape.head_dim):
            raise ValueError(f"this MultiStateCache holds batch {self.state.batch_size} with "
                             f"{self.shape.kv_heads} KV heads of dim {self.shape.head_dim}, but "
                             f"got batch {B}, {Hkv} KV heads of dim {D}; make a new "
                             f"MultiStateCache for each batch")
        if layer_idx == 0:
            self.state.reserve(T, parallel=T > 1)
        forward_kwargs[LAYER] = (self, layer_idx)
        self.waiting = layer_idx
        return key_states, value_states

    def attend(self, module, layer: int, q, k, v, mask, kwargs):
        """This forward's tokens (q [B, Hq, T, D], k and v [B, Hkv, T, D]) against layer `layer`
        of the multi-state, by msrnn.attention. Returns [B, T, Hq, D]."""
        if id(module) not in self.modules:
            raise ValueError("this MultiStateCache was made for another model; make one "
                             "MultiStateCache(model, policy) per model")
        self.waiting = None
        B, Hq, T, D = q.shape
        Hkv, start, state = k.shape[1], self.seen, self.state
        # Each row's positions: what the model was given (generate derives them from the
        # attention mask), else start .. start+T-1; a pad is -1, never a state, never attended.
        pos = kwargs.get("position_ids")
        if pos is None or pos.dim() != 2:
            pos = torch.arange(start, start + T, device=q.device)[None]
        pos = pos.to(q.device).expand(B, T)
        real = padding(mask, T)
        if real is not None:
            pos = pos.masked_fill(~real.to(q.device), -1)
        q = q.reshape(B, Hkv, Hq // Hkv, T, D)
        scale = kwargs.get("scaling") or D ** -0.5
        softcap, window = kwargs.get("softcap"), kwargs.get("sliding_window")
        if T == 1:
            o, _ = attention.step(state.layers[layer], q, k, v, pos.view(B, 1, 1), scale, softcap,
                               window)
        else:
            o = attention.prompt([state.layers[layer]], q, k, v, pos, start, scale, softcap,
                                 window, self.restrict)
        if layer == len(self.layers) - 1:
            state.advance(T)
        return o.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, D)

    def positions(self, layer: int) -> torch.Tensor:
        """The absolute positions layer `layer` keeps: LongTensor [B, H_kv, n], ascending (pads and
        empty slots excluded; n = the most any row keeps, rows with fewer start with -1)."""
        if self.state is None:
            raise ValueError("nothing has been fed to this MultiStateCache yet")
        return self.state.positions(layer)

    def reorder_cache(self, beam_idx):
        """Beam search: each beam's multi-state follows the beam it continues."""
        self.state.select(beam_idx.to(self.state.t.device))

    def batch_select_indices(self, indices):
        self.state.select(indices.to(self.state.t.device))

    def batch_repeat_interleave(self, repeats: int):
        rows = torch.arange(self.state.batch_size, device=self.state.t.device)
        self.state.select(rows.repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int):
        raise ValueError("a multi-state cannot be cropped (evicted states are gone); start a new "
                         "MultiStateCache")

    def reset(self):
        self.state = None

    @property
    def is_compileable(self):
        return False

    def __repr__(self):
        return f"MultiStateCache({self.policy}, layers={len(self.layers)}, seen={self.seen})"


def prepare(model) -> str:
    """Route the model's attention through "msrnn_<base>" (idempotent); returns the base."""
    name = model.config._attn_implementation
    if name.startswith(PREFIX):
        return name[len(PREFIX):]
    model.set_attn_implementation(implementation(name))
    return name


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


def rope_of(model):
    """The model's own RoPE as positions -> (cos, sin) [*positions.shape, D], what the position
    schemes rotate by (msrnn.positions), or a clear error for a rotary rule that a rotation by
    a difference of positions cannot reproduce (an attention factor, a length-dependent rule)."""
    rotary = getattr(model.get_decoder(), "rotary_emb", None)
    kind = getattr(rotary, "rope_type", None)
    if rotary is None or kind not in ("default", "linear", "llama3") or \
            getattr(rotary, "attention_scaling", 1.0) != 1.0:
        raise ValueError(f"{type(model).__name__}'s rotary embedding ({kind or 'not found'}) "
                         f"does not compose exactly (R(a) R(b) = R(a + b) holds for the default, "
                         f"linear and llama3 rules without an attention factor), so its states "
                         f"cannot be renumbered; use positions 'original'")
    like = torch.empty(0, dtype=next(model.parameters()).dtype,
                       device=next(model.parameters()).device)

    def rope(positions):
        return rotary(like, positions)

    return rope


def shape_of(model) -> Shape:
    """What a transformers model's multi-states are made for (state.Shape). Under transformers'
    tensor parallelism (`tp_size` > 1) a rank's attention sees its share of the KV heads, and
    the multi-state reduces layer-wise scores over the model's tensor-parallel group."""
    cfg, p = model.config.get_text_config(), next(model.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    group = None
    if (getattr(model, "tp_size", None) or 1) > 1:
        from transformers.distributed.tensor_parallel import get_kv_heads_per_rank
        kv_heads = get_kv_heads_per_rank(model.tp_plan, kv_heads, model.tp_size)
        group = model._device_mesh["tp"].get_group()
    return Shape(cfg.num_hidden_layers, kv_heads, head_dim, cfg.max_position_embeddings,
                 p.dtype, p.device, group)


# ------------------------------------------------------------------------------ the backend

class Backend:
    """A transformers causal LM as an msrnn backend (msrnn.prompt.Backend): msrnn.generate,
    perplexity, retention and needle run on it as on msrnn's decoder. Its multi-states are
    msrnn MultiStates; each forward wraps one in a MultiStateCache."""

    def __init__(self, model):
        self.modules = attention_modules(model)
        self.rope = None                                 # rope_of(model), when a scheme needs it
        prepare(model)
        self.model = model.eval()
        self.body = model.get_decoder()                 # hidden states after the final norm
        self.head = model.get_output_embeddings()
        cfg = model.config.get_text_config()
        self.softcap = getattr(cfg, "final_logit_softcapping", None)   # Gemma2
        self.shape, self.vocab_size = shape_of(model), cfg.vocab_size
        eos = model.generation_config.eos_token_id
        self.eos_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]

    def init_state(self, batch_size: int, policy: Policy, capacity: int | None = None,
                   positions="original", allow_past_range: bool = False):
        if Scheme.of(positions) is not Scheme.ORIGINAL and self.rope is None:
            self.rope = rope_of(self.model)
        return MultiState(self.shape, policy, batch_size, capacity, positions, allow_past_range,
                          self.rope)

    def forward(self, token_ids, state: MultiState, restrict: bool = False):
        """token_ids [B, T] at each row's next positions through the model -> hidden [B, T, E]."""
        T = token_ids.shape[1]
        positions = state.t[:, None] + torch.arange(T, device=state.t.device)
        cache = MultiStateCache(self.model, state.policy, state, modules=self.modules)
        cache.restrict = restrict
        return self.body(input_ids=token_ids, cache=cache, position_ids=positions,
                         use_cache=True).last_hidden_state

    def parallel(self, token_ids, states: list, restrict: bool = False):
        for state in states:
            check(state, token_ids, 2, self.shape, self.vocab_size)
            hidden = self.forward(token_ids, state, restrict)
        return hidden

    def step(self, token_ids, state: MultiState, head: bool = True):
        check(state, token_ids, 1, self.shape, self.vocab_size)
        hidden = self.forward(token_ids[:, None], state)[:, 0]
        return (self.logits(hidden) if head else hidden), state

    def logits(self, hidden):
        logits = self.head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def load(path, dtype=torch.float32, device="cpu", tp: int | None = None):
    """A transformers causal LM from a local directory or Hub id, in eval mode; tp=N: this
    rank's part under transformers' own tensor parallelism (DistributedConfig(tp_size=N)), one
    of N processes (torchrun), the backend (gloo, nccl) following `device`."""
    from transformers import AutoModelForCausalLM

    if tp in (None, 1):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    from transformers.distributed import DistributedConfig

    from . import group
    group.setup(tp, device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                 distributed_config=DistributedConfig(tp_size=tp))
    return model.eval()


__all__ = ["Backend", "MultiStateCache", "load"]

"""The model's shape, read from a Hugging Face `config.json`.

Four decoder families share one architecture here (a pre-norm LLaMA block: RMSNorm, RoPE,
grouped-query attention, SwiGLU MLP). What sets them apart is all in FAMILIES: a switch each,
which model.py and loading.py read."""

import json
import math
import os
from dataclasses import dataclass


class ConfigError(ValueError):
    """A config.json this code cannot run: it names the key or value at fault."""


# model_type -> what differs from LLaMA.
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": True},   # keys further back than sliding_window are invisible
    "qwen2": {"qkv_bias": True},           # q, k and v projections have a bias
    "qwen3": {"qk_norm": True},            # q and k are RMS-normalized per head before RoPE
}


@dataclass
class Config:
    model_type: str
    vocab_size: int
    dim: int                      # hidden size C
    n_layers: int
    n_heads: int                  # query heads H
    n_kv_heads: int               # key/value heads H_kv (GQA: H_kv divides H; MQA: H_kv = 1)
    head_dim: int                 # D (may differ from C / H when the config says so)
    hidden_dim: int               # the MLP's intermediate size
    norm_eps: float
    max_positions: int            # positions 0 .. max_positions-1 are valid
    tie_embeddings: bool
    rope_theta: float
    rope_scaling: dict | None     # None, or {"rope_type": "linear"|"llama3", ...}
    sliding_window: int | None    # Mistral: a key at p is visible from t only if t - p < window
    qkv_bias: bool = False        # Qwen2
    qk_norm: bool = False         # Qwen3
    bos_id: int | None = None

    @property
    def group(self) -> int:
        """Query heads per KV head (1 = multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        if not isinstance(hf, dict):
            raise ConfigError(f"config.json must hold a JSON object, got a {type(hf).__name__}; "
                              f"restore the checkpoint's config.json")
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            raise ConfigError(f"unsupported model_type {model_type!r}: msrnn runs "
                              f"{', '.join(map(repr, FAMILIES))} checkpoints (for any other "
                              f"decoder, use msrnn.hf inside transformers)")
        family = FAMILIES[model_type]

        def need(key, kind=int):
            if key not in hf:
                raise ConfigError(f"config.json has no {key!r}, which a {model_type} model needs")
            value = hf[key]
            if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
                raise ConfigError(f"config.json has {key}={value!r}; it must be a positive "
                                  f"{'integer' if kind is int else 'number'}")
            return value

        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise ConfigError(f"config.json sets {key}=true; msrnn runs {model_type} layers "
                                  f"without that bias only")
        if model_type != "mistral" and hf.get("use_sliding_window"):
            raise ConfigError(f"config.json turns on sliding-window layers (use_sliding_window); "
                              f"msrnn runs {model_type} with full attention only")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"unsupported hidden_act {act!r}: the SwiGLU MLP here uses 'silu'")

        dim, n_heads = need("hidden_size"), need("num_attention_heads")
        n_kv_heads = hf.get("num_key_value_heads") or n_heads
        if not isinstance(n_kv_heads, int) or n_heads % n_kv_heads:
            raise ConfigError(f"num_attention_heads={n_heads} is not a multiple of "
                              f"num_key_value_heads={n_kv_heads!r}")
        theta, scaling = _rope(hf)
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            dim=dim,
            n_layers=need("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=need("head_dim") if hf.get("head_dim") else dim // n_heads,
            hidden_dim=need("intermediate_size"),
            norm_eps=need("rms_norm_eps", (int, float)),
            max_positions=need("max_position_embeddings"),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_theta=theta,
            rope_scaling=scaling,
            sliding_window=hf.get("sliding_window") if family.get("sliding_window") else None,
            qkv_bias=family.get("qkv_bias", False),
            qk_norm=family.get("qk_norm", False),
            bos_id=hf.get("bos_token_id"),
        )


def _rope(hf: dict) -> tuple[float, dict | None]:
    """RoPE base and scaling, from transformers >= 5 (`rope_parameters`) or older configs
    (top-level `rope_theta`, `rope_scaling`)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), {"rope_type": "linear", "factor": float(params["factor"])}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in params]
        if missing:
            raise ConfigError(f"llama3 rope scaling needs {', '.join(missing)} in config.json")
        return float(theta), {"rope_type": "llama3", **{k: float(params[k]) for k in keys}}
    raise ConfigError(f"unsupported RoPE scaling type {kind!r}: msrnn implements default, "
                      f"linear and llama3")


def rope_frequencies(cfg: Config):
    """The inverse frequencies theta^(-2i/D), i < D/2, after the config's scaling.

    linear: every frequency divided by `factor` (positions stretched).
    llama3: long wavelengths (> original_context / low_freq_factor) divided by `factor`,
    short ones (< original_context / high_freq_factor) kept, and a smooth blend in between.
    """
    import torch

    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # llama3
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / lo, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / hi) & (wavelen <= context / lo)
    return torch.where(medium, blended, scaled)


def read_config(directory: str) -> Config:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"no config.json in {directory}: a checkpoint directory needs "
                          f"config.json and its *.safetensors files")
    return Config.from_hf(read_json(directory, "config.json"))


def stop_tokens(*found) -> list:
    """The token ids that end generation, from the values of `eos_token_id` a checkpoint gives
    (config.json's, generation_config.json's: an id, a list of ids or None), as one sorted list
    without repeats. The one rule, for both backends and the tokenizer."""
    ids = set()
    for value in found:
        ids |= set(value if isinstance(value, (list, tuple)) else [value]) - {None}
    return sorted(int(i) for i in ids)


def read_json(directory: str, name: str) -> dict:
    """A checkpoint's JSON file `name` as a dict ({} if the checkpoint has none), with errors
    that name the file and the fix."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); restore the checkpoint's "
                          f"{name}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name} must hold a JSON object, got a {type(data).__name__}; "
                          f"restore the checkpoint's {name}")
    return data


def read_stop_tokens(directory: str) -> list:
    """stop_tokens of a checkpoint directory: config.json's eos_token_id with
    generation_config.json's (chat models often list several there)."""
    return stop_tokens(*(read_json(directory, name).get("eos_token_id")
                         for name in ("config.json", "generation_config.json")))

"""The model's shape, read from a Hugging Face `config.json` (model_type llama or mistral)."""

import json
import math
import os
from dataclasses import dataclass


class ConfigError(ValueError):
    """A config.json this code cannot run: it names the key or value at fault."""


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
    bos_id: int | None = None
    eos_id: int | list | None = None

    @property
    def group(self) -> int:
        """Query heads per KV head (1 = multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        model_type = hf.get("model_type")
        if model_type not in ("llama", "mistral"):
            raise ConfigError(f"unsupported model_type {model_type!r}: msrnn runs 'llama' and "
                              f"'mistral' checkpoints (LLaMA/Mistral decoders)")

        def need(key):
            if key not in hf:
                raise ConfigError(f"config.json has no {key!r}, which a {model_type} model needs")
            return hf[key]

        for key, unsupported in (("attention_bias", True), ("mlp_bias", True)):
            if hf.get(key) == unsupported:
                raise ConfigError(f"config.json sets {key}=true; msrnn supports bias-free "
                                  f"LLaMA/Mistral layers only")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"unsupported hidden_act {act!r}: the SwiGLU MLP here uses 'silu'")

        dim, n_heads = need("hidden_size"), need("num_attention_heads")
        n_kv_heads = hf.get("num_key_value_heads") or n_heads
        if n_heads % n_kv_heads:
            raise ConfigError(f"num_attention_heads={n_heads} is not a multiple of "
                              f"num_key_value_heads={n_kv_heads}")
        theta, scaling = _rope(hf)
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            dim=dim,
            n_layers=need("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=hf.get("head_dim") or dim // n_heads,
            hidden_dim=need("intermediate_size"),
            norm_eps=need("rms_norm_eps"),
            max_positions=need("max_position_embeddings"),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_theta=theta,
            rope_scaling=scaling,
            sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
            bos_id=hf.get("bos_token_id"),
            eos_id=hf.get("eos_token_id"),
        )

    @classmethod
    def from_file(cls, path: str) -> "Config":
        try:
            with open(path) as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); restore the checkpoint's "
                              f"config.json") from None
        return cls.from_hf(hf)


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
    return Config.from_file(path)

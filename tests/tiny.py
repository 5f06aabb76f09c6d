"""Tiny random Hugging Face models, saved as real checkpoints, for comparing msrnn to transformers."""

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

KINDS = {"llama": (LlamaForCausalLM, LlamaConfig), "mistral": (MistralForCausalLM, MistralConfig),
         "qwen2": (Qwen2ForCausalLM, Qwen2Config), "qwen3": (Qwen3ForCausalLM, Qwen3Config)}

DEFAULTS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, vocab_size=128, max_position_embeddings=4096,
                rms_norm_eps=1e-5)


def tiny_hf(kind: str = "llama", seed: int = 0, **overrides):
    """A random LLaMA / Mistral / Qwen2 / Qwen3 causal LM in float32, eval mode.

    Random init gives weights of std 0.02: nearly uniform attention. Scaling q and k up makes
    attention peaked, so that the tests exercise softmax, RoPE and eviction for real. The
    family's own parts are made random too (Qwen2's q/k/v biases, Qwen3's q/k norms), so that
    a test would see them ignored."""
    torch.manual_seed(seed)
    cls, cfg_cls = KINDS[kind]
    extra = {"head_dim": 16} if kind == "qwen3" else {}
    cfg = cfg_cls(**{**DEFAULTS, **extra, **overrides})
    model = cls(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.mul_(8)
            attn.k_proj.weight.mul_(8)
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.5)
            for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
                if norm is not None:
                    norm.weight.uniform_(0.5, 1.5)
    return model


def save(model, directory, **kwargs):
    model.save_pretrained(directory, **kwargs)
    return str(directory)


def save_char_tokenizer(directory, vocab_size: int = 128):
    """A tokenizer.json that reads text one ASCII character at a time (id = code point), so that
    text files can go through a tiny model's command line (`msrnn ppl`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {chr(i): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=chr(0)))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.save(f"{directory}/tokenizer.json")
    return str(directory)


def slow_compilation(monkeypatch, seconds: float):
    """Make torch.compile slow on purpose, for tests of what a speed line counts: a dynamo
    backend that sleeps `seconds` and then runs the captured graph as it is (no inductor), so
    each new graph still counts as a compilation (msrnn.backend.Compiled.compile_seconds)."""
    import time

    real = torch.compile

    def sleepy(graph, example_inputs):
        time.sleep(seconds)
        return graph.forward

    torch._dynamo.reset()                  # graphs compiled before are not reused
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=sleepy,
                                                                fullgraph=True, dynamic=False))


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\x03\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def save_chat_tokenizer(directory, vocab_size: int = 128):
    """save_char_tokenizer's tokenizer with a chat template (`<role>content`, each turn ended by
    the end-of-turn character \\x03, the EOS), so that `msrnn chat` runs on a tiny model."""
    import json

    save_char_tokenizer(directory, vocab_size)
    with open(f"{directory}/tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "\x03", "chat_template": CHAT_TEMPLATE}, f)
    return str(directory)

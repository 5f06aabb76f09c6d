"""The `msrnn` command line (also `python -m msrnn`): generate, chat, download, fetch-default,
ppl, retention, needle, tasks, drift, bench, lm-eval.

The top layer: argument parsing, checks of every argument before any expensive work, printing,
files and plots. The library below (msrnn.generate, .evaluate, .bench, ...) takes models,
policies, token ids and plain values, and returns numbers; it never imports from here.

    common.py    shared arguments and checks     generate.py  generate, download, fetch-default
    evaluate.py  ppl, retention                  bench.py     bench
    needle.py    needle; the grid and heat maps   tasks.py     tasks (RULER's synthetic tasks)
                 that tasks shares                drift.py     drift
    chat.py      chat (a session saved after each turn)
    output.py    atomic files, resumable results, plots
    harness.py   lm-eval (lm-evaluation-harness's own command line, --model msrnn registered)
"""

import argparse
import os
import sys

from .. import __version__
from ..experiments.cluster import Lost
from . import bench, chat, common, drift, evaluate, generate, lmeval, needle, tasks


def main(argv=None):
    """The `msrnn` command (and `python -m msrnn`): argv, or the process's arguments."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:              # every argument after it is lm-eval's, unparsed
        return lmeval.run(argv[1:])
    try:
        common.load_policies(argv)           # users' policies first: the help lists them
    except ValueError as e:
        command = next((a for a in argv if not a.startswith("-")), None)
        print(f"msrnn{' ' + command if command else ''}: error: {e}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="msrnn", description="Transformers as multi-state RNNs "
                                     "(Oren et al., 2024): TOVA and other compression policies.")
    parser.add_argument("--version", action="version", version=f"msrnn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (generate, chat, evaluate, bench, needle, tasks, drift, lmeval):
        module.add_commands(commands)
    args = parser.parse_args(argv)
    try:
        code = run(args)
    except BaseException:                    # Ctrl-C, or a failure that is not a clear error
        common.end_group(args, ok=False)
        raise
    common.end_group(args, ok=code == 0)
    return code


def run(args) -> int:
    """args.run(args) -> the exit status: 0, or a clear error's one line and 2 (1: the
    tensor-parallel group broke, or Ray workers died for good)."""
    try:
        common.ranks(args)                   # --tp: rank 0 alone prints
        return args.run(args) or 0
    except (ValueError, TypeError, OSError) as e:
        print(f"msrnn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Lost as e:                        # --ray: workers died for good; the rest is saved
        print(f"msrnn {args.command}: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:                # torch.distributed: a rank failed or ended
        if getattr(args, "tp", 1) == 1:
            raise
        first = (str(e).splitlines() or [""])[0]
        print(f"msrnn {args.command} (rank {os.environ.get('RANK', '?')}): error: the "
              f"tensor-parallel group broke: another rank failed or ended ({first})",
              file=sys.__stderr__)
        return 1

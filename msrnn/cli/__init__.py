"""The `msrnn` command line (also `python -m msrnn`): generate, download, fetch-default, ppl,
retention, needle, tasks, drift, bench.

The top layer: argument parsing, checks of every argument before any expensive work, printing,
files and plots. The library below (msrnn.generate, .evaluate, .bench, ...) takes models,
policies, token ids and plain values, and returns numbers; it never imports from here.

    common.py    shared arguments and checks     generate.py  generate, download, fetch-default
    evaluate.py  ppl, retention                  bench.py     bench
    needle.py    needle; the grid and heat maps   tasks.py     tasks (RULER's synthetic tasks)
                 that tasks shares                drift.py     drift
    output.py    atomic files, resumable results, plots
"""

import argparse
import os
import sys

from .. import __version__
from . import bench, common, drift, evaluate, generate, needle, tasks


def main(argv=None):
    """The `msrnn` command (and `python -m msrnn`): argv, or the process's arguments."""
    argv = sys.argv[1:] if argv is None else list(argv)
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
    for module in (generate, evaluate, bench, needle, tasks, drift):
        module.add_commands(commands)
    args = parser.parse_args(argv)
    try:
        common.ranks(args)                   # --tp: rank 0 alone prints
        return args.run(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"msrnn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:                # torch.distributed: a rank failed or ended
        if getattr(args, "tp", 1) == 1:
            raise
        first = (str(e).splitlines() or [""])[0]
        print(f"msrnn {args.command} (rank {os.environ.get('RANK', '?')}): error: the "
              f"tensor-parallel group broke: another rank failed or ended ({first})",
              file=sys.__stderr__)
        return 1

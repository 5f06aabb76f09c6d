"""One perplexity-against-position figure from several `msrnn ppl --out` directories (runs of
different contexts, e.g. Full to the model's range beside bounded policies far past it).

    python scripts/ppl_position_figure.py results/past-range results/past-range-full \
        --range 8192 --title "SmolLM2-135M" --out docs/img/past-range.png
"""

import argparse
import json
import os

from msrnn.cli.evaluate import plot_buckets


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="--out directories of msrnn ppl (results.json)")
    ap.add_argument("--range", type=int, required=True, help="the model's range, marked")
    ap.add_argument("--title", default="")
    ap.add_argument("--out", required=True, help="the PNG to write")
    args = ap.parse_args(argv)
    rows = []
    for directory in args.dirs:
        with open(os.path.join(directory, "results.json")) as f:
            rows += json.load(f)["results"]
    plot_buckets(rows, args.out, args.title, args.range)


if __name__ == "__main__":
    main()

"""The texts msrnn ships: two public-domain novels from Project Gutenberg (README.md here gives
their sources and licence). `msrnn needle` hides its facts in them when given no --haystack; the
tests and the commands of docs/results.md read them too."""

import os

FOLDER = os.path.dirname(os.path.abspath(__file__))
BOOKS = [os.path.join(FOLDER, name) for name in ("news-from-nowhere.txt",
                                                  "little-colonels-hero.txt")]

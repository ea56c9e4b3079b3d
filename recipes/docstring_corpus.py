"""Write the `pydocs` training corpus (the shipped default balconies' data) to a file.

No data set hub is reachable here, and sampling the model's own text runs at ~100 tokens/s on
2 cores (slower than training), so the shipped balconies were trained on prose that every
machine with the project's set-up has: the docstrings of the standard library and installed
packages plus the Python reference topics (`balcony.data.python_docs_corpus`), ~10M tokens,
far more than a balcony layer can memorise. `balcony train --data pydocs` builds the same file
in the cache by itself; this script only puts it where you want it.

    python recipes/docstring_corpus.py --out runs/corpus/docstrings.jsonl
"""

import argparse
from pathlib import Path

from balcony.data import python_docs_corpus

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(python_docs_corpus(args.out, seed=args.seed))

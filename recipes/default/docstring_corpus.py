"""Write the `pydocs` training corpus (the shipped default balconies' data) to a file.

No data set hub is reachable here, and sampling the model's own text runs at ~100 tokens/s on
2 cores (slower than training), so the shipped balconies were trained on prose that every
machine with the project's set-up has: the docstrings of the standard library and installed
packages plus the Python reference topics
(`balcony.training.corpus.sources.pydocs.python_docs_corpus`), ~10M tokens,
far more than a balcony layer can memorise. `balcony train --data pydocs` builds the same file
in the cache by itself; this script only puts it where you want it.

    python recipes/default/docstring_corpus.py --out OUT/data/docstrings.jsonl
    python recipes/default/docstring_corpus.py --out OUT/data/docstrings-train.jsonl \
        --heldout-out src/balcony/resources/corpus/heldout-docstrings.jsonl

With --heldout-out, the packages that came with the serving extras (FastAPI, Starlette,
uvicorn, openai, prometheus_client), which the shipped balconies never read, are kept out of
the training file and written there instead, as held-out docstring text.
"""

import argparse
import json
import sysconfig
from pathlib import Path

from balcony.training.corpus.sources.pydocs import python_docs_corpus

HELDOUT_PACKAGES = ["fastapi", "starlette", "uvicorn", "openai", "prometheus_client"]

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-out", type=Path, help="write the held-out packages' docstrings here")
    p.add_argument("--heldout-chars", type=int, default=400_000, help="keep about this much held-out text")
    args = p.parse_args()
    if args.heldout_out is None:
        print(python_docs_corpus(args.out, seed=args.seed))
    else:
        site = Path(sysconfig.get_paths()["purelib"])
        packages = [site / name for name in HELDOUT_PACKAGES if (site / name).is_dir()]
        print(python_docs_corpus(args.out, seed=args.seed, exclude=packages))
        full = python_docs_corpus(args.heldout_out.with_suffix(".all.jsonl"), roots=packages, seed=args.seed)
        kept, size = [], 0
        for line in full.read_text().splitlines():
            if size >= args.heldout_chars:
                break
            kept.append(line)
            size += len(json.loads(line)["text"])
        args.heldout_out.parent.mkdir(parents=True, exist_ok=True)
        args.heldout_out.write_text("\n".join(kept) + "\n")
        full.unlink()
        print(f"{args.heldout_out}: {len(kept)} documents, {size} characters from {HELDOUT_PACKAGES}")

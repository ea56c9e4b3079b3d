"""Write the held-out evaluation text shipped with the default balconies.

It is the default model's own answers (sampled at temperature 1, top-p 0.95, seed 1234) to
chat prompts drawn from `balcony.training.data`'s topic list: the kind of text that generation at an
exit produces, and nothing like the docstrings the shipped balconies were trained on
(recipes/docstring_corpus.py), so it played no part in training.

    python recipes/make_heldout.py --tokens 20000 --out src/balcony/resources/heldout-smollm2.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        from balcony.training.data import self_generated_corpus
        from balcony.core.model import BalconyModel

        model = BalconyModel.from_base(None)
        # A private cache: the user's own `self` corpus cache stays untouched.
        documents = self_generated_corpus(model, model.tokenizer, target_tokens=args.tokens,
                                          batch_size=args.batch_size, path=Path(cache) / "heldout.jsonl")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}) + "\n")
    print(f"{len(documents)} documents -> {args.out}")


if __name__ == "__main__":
    main()

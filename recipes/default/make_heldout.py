"""Write the held-out evaluation text shipped with the default balconies.

It is the default model's own answers (sampled at temperature 1, top-p 0.95, top-k 50, seed
1234) to chat prompts built from the package's held-out topics and templates
(`balcony.training.corpus.held_out_prompts`, `resources/corpus/prompts.json`): the kind of
text that generation at an exit produces, and nothing like the docstrings the shipped balconies
were trained on (recipes/default/docstring_corpus.py), so it played no part in training. Every
non-empty answer is kept, as in the shipped file; that file was sampled before sampling was
seeded batch by batch, so a rerun writes text of the same kind, not the same bytes.

    python recipes/default/make_heldout.py --tokens 20000 --out src/balcony/resources/heldout-smollm2.jsonl
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
        from balcony.core.model import BalconyModel
        from balcony.training.data import self_generated_corpus

        model = BalconyModel.from_base(None)
        # A private corpus folder: the user's own `self` corpus stays untouched. Nothing is held
        # out: this text is what later corpora are checked against.
        documents = self_generated_corpus(model, model.tokenizer, target_tokens=args.tokens,
                                          batch_size=args.batch_size, path=Path(cache) / "heldout",
                                          min_words=1, held_out=[])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}) + "\n")
    print(f"{len(documents)} documents -> {args.out}")


if __name__ == "__main__":
    main()

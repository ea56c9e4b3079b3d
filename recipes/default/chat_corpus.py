"""Sample the default model's own chat answers as training text, on topics the held-out text never uses.

The shipped held-out text (`src/balcony/resources/heldout-smollm2.jsonl`, recipes/default/make_heldout.py)
is the model's answers to prompts built from the package's 60 held-out topics. This recipe asks
the `chat` source's prompts instead (`balcony corpus --source chat`: a disjoint topic list,
checked below, in the held-out templates and ten more), so balconies trained on its output are
still measured on text whose prompts they never saw.

    python recipes/default/chat_corpus.py --tokens 300000 --out OUT/data/chat.jsonl

Sampling: temperature 1, top-p 0.95, top-k 50, up to 256 new tokens, batch 32, fp32 (as the
held-out text), through the same machinery as `balcony train --data self`: the samples grow the
corpus folder OUT.corpus (interrupted runs resume there), then all of them are written to OUT.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def prompts() -> list[str]:
    """The `chat` source's prompts, after checking that none asks about a held-out topic."""
    from balcony.training.corpus import SOURCES, prompt_lists

    lists = prompt_lists()
    overlap = {t.lower() for t in lists["chat_topics"]} & {t.lower() for t in lists["held_out_topics"]}
    assert not overlap, f"topics shared with the held-out prompts: {sorted(overlap)}"
    return SOURCES["chat"].items([])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=300_000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=4321)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    from balcony.core.model import BalconyModel
    from balcony.training.data import self_generated_corpus

    model = BalconyModel.from_base(None)
    documents = self_generated_corpus(model, model.tokenizer, target_tokens=args.tokens, batch_size=args.batch_size,
                                      seed=args.seed, path=args.out.with_suffix(".corpus"), prompts=prompts())
    with args.out.open("w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}) + "\n")
    print(f"{len(documents)} documents -> {args.out}")


if __name__ == "__main__":
    main()

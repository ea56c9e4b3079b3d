"""Sample the default model's own chat answers as training text, on topics the held-out text never uses.

The shipped held-out text (`src/balcony/resources/heldout-smollm2.jsonl`, recipes/make_heldout.py)
is the model's answers to prompts built from `balcony.training.data`'s 60 topics. This recipe builds its
prompts from a disjoint topic list (checked below) and more templates, so balconies trained on its
output are still measured on text whose prompts they never saw.

    python recipes/chat_corpus.py --tokens 300000 --out runs/corpus/chat.jsonl

Sampling: temperature 1, top-p 0.95, up to 256 new tokens, batch 32, fp32 (as the held-out text).
Interrupted runs resume: the output file only grows (the same cache logic as `--data self`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from balcony.training.corpus import CHAT_TEMPLATES as MORE_TEMPLATES  # noqa: E402
from balcony.training.corpus import CHAT_TOPICS as TOPICS  # noqa: E402


def prompts() -> list[str]:
    """The held-out text's templates plus ten more, over topics the held-out text never uses."""
    from balcony.training.corpus import SELF_TEMPLATES as _TEMPLATES
    from balcony.training.corpus import SELF_TOPICS as _TOPICS

    overlap = {t.lower() for t in TOPICS} & {t.lower() for t in _TOPICS}
    assert not overlap, f"topics shared with the held-out prompts: {sorted(overlap)}"
    return [tpl.format(t=topic) for tpl in _TEMPLATES + MORE_TEMPLATES for topic in TOPICS]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=300_000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=4321)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    from balcony.training.data import self_generated_corpus
    from balcony.core.model import BalconyModel

    model = BalconyModel.from_base(None)
    documents = self_generated_corpus(model, model.tokenizer, target_tokens=args.tokens, batch_size=args.batch_size,
                                      seed=args.seed, path=args.out, prompts=prompts())
    print(f"{len(documents)} documents -> {args.out}")


if __name__ == "__main__":
    main()

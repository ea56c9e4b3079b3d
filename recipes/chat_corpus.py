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

TOPICS = [
    "tornadoes", "the Industrial Revolution", "cell division", "neutron stars", "pizza", "inflation", "butterflies",
    "neural networks", "the Ottoman Empire", "air pollution", "card games", "the human brain", "trains", "blues music",
    "the nitrogen cycle", "the Aztecs", "antibiotics", "deserts", "email", "Jane Austen", "rivers", "chocolate",
    "the International Space Station", "composting", "the speed of light", "dreams", "the World Cup", "savannas",
    "elections", "skateboards", "the telephone", "owls", "wind power", "allergies", "knitting", "scuba diving",
    "the Vikings", "tsunamis", "beekeeping", "dolphins", "statistics", "chemical bonds", "fossils", "museums",
    "street food", "droughts", "the piano", "caves", "passwords", "city parks", "bread yeast", "the Middle Ages",
    "calculus", "the seasons", "kindness", "habits", "the pyramids of Giza", "solar panels", "spiders", "songwriting",
    "the Amazon river", "vitamins", "lighthouses", "submarines", "robots", "board games", "the moon's phases",
    "meteors", "farming", "bridges", "the Cold War", "wolves", "smartphones", "the alphabet", "rainbows",
    "volunteering", "public speaking", "camping", "sharks", "the stock exchange floor", "the metric system",
    "sorting algorithms", "databases", "the Linux operating system", "unit testing", "web browsers", "spreadsheets",
    "3D printing", "electric guitars", "marathons", "yoga", "the Arctic", "rice", "coins", "maps", "clocks",
    "the Greek myths", "comets", "hydropower", "vaccination campaigns", "first aid", "budgeting", "job interviews",
    "learning a language", "photography", "painting with watercolors", "architecture", "the Eiffel Tower",
    "salt", "sugar", "glass", "paper", "steel", "cotton", "wine making", "cheese", "olive oil", "spices",
]
MORE_TEMPLATES = [
    "Write a haiku and then a short essay about {t}.",
    "How would you teach a ten-year-old about {t}?",
    "Write a product description for something related to {t}.",
    "What questions do scientists still ask about {t}?",
    "Write a news report about a recent discovery involving {t}.",
    "Compare {t} with something similar and explain the differences.",
    "Write step-by-step instructions for a beginner interested in {t}.",
    "Write a persuasive letter about why {t} matters.",
    "Create a quiz with three questions and answers about {t}.",
    "Explain {t} using a simple analogy.",
]


def prompts() -> list[str]:
    """The held-out text's templates plus ten more, over topics the held-out text never uses."""
    from balcony.training.data import _TEMPLATES, _TOPICS

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

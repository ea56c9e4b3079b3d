"""LAMBADA last-word accuracy per exit on documents the downstream table never samples.

    python experiments/recall-weight/lambada_dev.py ARTIFACT [--docs 500] [--json experiments/recall-weight/NAME.lambada-dev.json]

`balcony eval ARTIFACT --tasks table1 --limit 200` scores 200 LAMBADA documents drawn with seed
1234; this draws `--docs` others (seed "dev"), so a recipe aimed at LAMBADA can be judged here
and then on the table without having been tuned on the table's own documents. Nothing here is
ever trained on. Accuracy is lm-eval's: every token of the last word is the greedy choice. Beside
it, the median rank of the word's first token in each exit's distribution after the context (0: the
greedy choice): how far an exit is from naming the word, where accuracy only says it did not.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch

from balcony import BalconyModel
from balcony.evaluation.documents import subsample
from balcony.evaluation.tasks import TASKS, data_root, load_split

TASK = "lambada_openai"
TABLE_DOCS = 200  # `--limit 200`, the table's sample in the closing notes


def documents() -> list[tuple[str, str]]:
    """(context, last word) of every LAMBADA test document, as the table reads them (`load_split`),
    split where lm-eval's task splits them: at the last space."""
    passages = load_split(str(data_root() / TASKS[TASK].source), TASKS[TASK].split, convert="lambada")
    return [tuple(text.rsplit(" ", 1)) for text in passages[TASKS[TASK].split]["text"]]


def dev_indices(count: int, total: int) -> list[int]:
    """`count` document indices drawn from those the table's own sample (`subsample`) leaves out."""
    drawn = subsample({TASK: total}, [TASK], {TASK: TABLE_DOCS})
    table = set(drawn[TASK])
    rest = [i for i in range(total) if i not in table]
    return sorted(random.Random("dev").sample(rest, count))


@torch.no_grad()
def score(model: BalconyModel, context: str, word: str) -> dict[str, tuple[bool, int]]:
    """For each exit (and the full model): whether it greedily produces every token of `word` after
    `context`, and the rank of the word's first token in its distribution there (0: the greedy one)."""
    tok = model.tokenizer
    prefix = tok(context, add_special_tokens=False)["input_ids"]
    ids = tok(f"{context} {word}", add_special_tokens=False)["input_ids"]
    if ids[: len(prefix)] != prefix:  # the space merged into the context's last token: score the whole join
        prefix = prefix[:-1]
    out = model.forward_exits(torch.tensor([ids]), return_logits=True)
    target = torch.tensor(ids[len(prefix):])
    span = slice(len(prefix) - 1, len(ids) - 1)  # logits at position t predict token t + 1
    every = {str(e): logits[0, span] for e, logits in out.logits.items()} | {"full": out.teacher_logits[0, span]}
    return {name: (bool((logits.argmax(-1) == target).all()), int((logits[0] > logits[0, target[0]]).sum()))
            for name, logits in every.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--docs", type=int, default=500)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = BalconyModel.from_pretrained(args.artifact).eval()
    docs = documents()
    hits: dict[str, int] = {}
    ranks: dict[str, list[int]] = {}
    indices = dev_indices(args.docs, len(docs))
    for i in indices:
        for name, (ok, rank) in score(model, *docs[i]).items():
            hits[name] = hits.get(name, 0) + ok
            ranks.setdefault(name, []).append(rank)
    accuracy = {name: hits[name] / len(indices) for name in hits}
    kept = {name: accuracy[name] / max(accuracy["full"], 1e-9) for name in accuracy if name != "full"}
    report = {"artifact": args.artifact, "docs": len(indices), "accuracy": accuracy, "kept_of_full": kept,
              "median_first_token_rank": {name: statistics.median(r) for name, r in ranks.items()}}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

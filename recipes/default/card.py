"""Write the model card (README.md) of a remade `default` from the recipe's own results.

    python recipes/default/card.py ARTIFACT [--results recipes/default/results] [--version default-v9]

The training section records the GPU stage's two runs (their tokens, loss, options and last
validation) and names the CPU stages before them; the evaluation section holds the held-out
figures (chat, docstrings, GPL-3), the downstream table (the whole sets where measured, else the
`--limit 200` sample) and the speed per exit. The shipped card was written by this script with
ARTIFACT = src/balcony/resources/smollm2-135m-instruct.
"""

import argparse
import json
from pathlib import Path

from balcony import BalconyModel
from balcony.core.card import CARD_NAME, Training, evaluation_parts, model_card, speed_part

CPU_STAGES = (
    "eight CPU stages of `balcony train` on 2 cores (recipes/default/make.sh, v1 to v8): 1.3M + 430K tokens of "
    "`pydocs` docstrings, the model's own chat answers on topics the held-out text never uses (286K tokens), 1.4M and "
    "then 1.6M tokens of a corpus of man pages, info manuals and the model's chats (sparse KL, the remainder sampled; "
    "exit 15 grown to two layers on 600K more tokens), 2.5M tokens of Debian's books, the World English Bible and "
    "passage-reading tasks (averaged weight by weight with the version before), then 1.0M, 450K and 663K tokens of "
    "newly sampled chats; then the GPU stage on one H200: 2.5M tokens of the model's own chats sampled there plus the "
    "whole committed corpus (11.2M tokens), read in two runs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact")
    p.add_argument("--results", default=str(Path(__file__).parent / "results"))
    p.add_argument("--version", default="default-v9")
    args = p.parse_args()
    results, v = Path(args.results), args.version

    def load(name: str) -> dict:
        return json.loads((results / name).read_text())

    runs = [load(f"{v}-run1.recipe.json"), load(f"{v}-run2.recipe.json")]
    metrics = (results / f"{v}-run2.metrics.jsonl").read_text().splitlines()
    val = [json.loads(line) for line in metrics if '"val"' in line][-1]
    settings = runs[0]["settings"]
    training = Training(
        data=f"{CPU_STAGES} ({runs[0]['training']['tokens_trained']:,} and {runs[1]['training']['tokens_trained']:,} "
             "tokens). The tokens, loss, options and validation below are those two runs'.",
        tokens=sum(r["training"]["tokens_trained"] for r in runs), steps=sum(r["training"]["steps"] for r in runs),
        method="balcony", continued_from=None,
        loss={"kl_topk": settings["kl_topk"], "top1_weight": settings["top1_weight"]},
        options={"batch_size": settings["batch_size"], "seq_len": settings["seq_len"],
                 "lr": f"{runs[0]['settings']['lr']}, then {runs[1]['settings']['lr']}", "warmup": settings["warmup"],
                 "precision": runs[0]["training"]["precision"], "seed": settings["seed"], "init": "copy",
                 "balcony_layers": {"15": 2}},
        validation={k: val[k] for k in val if k.startswith(("kl/", "agreement/"))})
    evaluation = {}
    for name, data in (("eval-chat", "heldout-smollm2.jsonl"), ("eval-heldout-docstrings", "heldout-docstrings.jsonl"),
                       ("eval-gpl3", "GPL-3")):
        evaluation.update(evaluation_parts(load(f"{v}.{name}.json"), data))
    for table in (f"{v}.table1.json", f"{v}.table1-limit200.json"):  # the whole sets where measured
        if (results / table).exists():
            evaluation.update(evaluation_parts(load(table)))
            break
    if (results / f"{v}.bench.json").exists():
        evaluation["speed"] = speed_part(load(f"{v}.bench.json"))
    text = model_card(BalconyModel.from_pretrained(args.artifact), training=training, evaluation=evaluation)
    (Path(args.artifact) / CARD_NAME).write_text(text)
    print(f"wrote {Path(args.artifact) / CARD_NAME}")


if __name__ == "__main__":
    main()

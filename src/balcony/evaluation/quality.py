"""Quality per exit on held-out text, next to the two untrained alternatives at the same depth.

For every exit e and the same tokens:
* balcony: layers[:e] + balcony(e) + head;
* early exit: the base's own final norm and head on the hidden state after layer e-1, no
  training (what a LayerSkip-style exit gives an untrained model);
* truncation: layers[:e+n] + final norm + head, n the layers per balcony (usually 1): depth
  pruning at equal cost.
Each gets KL(full || exit), top-1 agreement with the full model, and perplexity on the text;
the full model gets its perplexity. All come from one trunk pass per batch.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..training.data import build_dataset
from ..training.config import LossOptions
from ..training.distill import DistillStats, distill, next_token_labels
from ..core.model import BalconyModel, ExitOutputs

FAMILIES = ("balcony", "early_exit", "truncation")


@torch.no_grad()
def evaluate(
    model: BalconyModel,
    data: str | torch.Tensor,
    *,
    seq_len: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
    chunk_tokens: int = 512,
    progress: bool = True,
) -> dict:
    """Per-exit KL, agreement and perplexity for the balconies and both baselines.

    `data` is a text file / folder / JSONL (packed into `seq_len` rows, all of them used) or a
    ready [rows, seq_len] tensor of token ids.
    """
    rows = data if torch.is_tensor(data) else build_dataset(
        data, model.tokenizer, seq_len, max_tokens=max_tokens, val_fraction=0.0).train
    model.eval()
    exits = model.exits
    totals = {family: DistillStats() for family in FAMILIES}
    loss = LossOptions(chunk_tokens=chunk_tokens)
    for start in tqdm(range(0, rows.shape[0], batch_size), desc="evaluating", unit="batch", disable=not progress):
        ids = rows[start : start + batch_size].to(model.device)
        labels = next_token_labels(ids)
        out = model.forward_exits(ids, baselines=True)
        for family in FAMILIES:
            view = ExitOutputs(hidden=out.hidden if family == "balcony" else getattr(out, family),
                               teacher_hidden=out.teacher_hidden)
            totals[family].add(distill(model, view, None, loss, normalizer=1.0, labels=labels, backward=False))

    def metrics(stats: DistillStats, e: int) -> dict:
        return {
            "kl": stats.kl[e] / stats.tokens,
            "agreement": stats.agree[e] / stats.tokens,
            "perplexity": math.exp(stats.ce[e] / stats.label_tokens),
        }

    teacher = totals["balcony"]
    return {
        "tokens": int(teacher.tokens),
        "sequences": int(rows.shape[0]),
        "seq_len": int(rows.shape[1]),
        "full": {"perplexity": math.exp(teacher.teacher_ce / teacher.label_tokens)},
        "exits": [
            {"exit": e, "relative_cost": model.costs.relative(e), **{f: metrics(totals[f], e) for f in FAMILIES}}
            for e in exits
        ],
    }


def format_table(report: dict) -> str:
    """The evaluation as a plain-text table."""
    lines = [
        f"{report['tokens']:,} held-out tokens ({report['sequences']} x {report['seq_len']}); "
        f"full model perplexity {report['full']['perplexity']:.2f}",
        f"{'':11} |" + "".join(f" {name:^26} |" for name in ("balcony", "early exit", "truncation")),
        f"{'exit':>5} {'cost':>5} |" + f" {'KL':>7} {'agree':>7} {'ppl':>10} |" * 3,
    ]
    for row in report["exits"]:
        cells = [f" {row[f]['kl']:7.3f} {row[f]['agreement']:7.3f} {row[f]['perplexity']:10.4g} |" for f in FAMILIES]
        lines.append(f"{row['exit']:>5} {row['relative_cost']:5.2f} |" + "".join(cells))
    return "\n".join(lines)

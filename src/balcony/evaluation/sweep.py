"""Every variant of a model scored from one trunk pass: the engine behind the downstream table.

A variant is the full model, or one method at one exit:

* balcony: layers[:e] + balcony(e) + head (the trained sub-model);
* early exit: the base's final norm and head on the hidden state after layer e-1 (untrained);
* truncation: layers[:e+n] + final norm + head, n the layers per balcony (depth pruning at equal cost).

`ExitSweep.score` takes (context ids, continuation ids) pairs and, with one `forward_exits` pass
per batch, keeps each pair's log-likelihood and greedy flag under every variant; the head runs
only where a continuation token is scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..core.errors import BalconyError
from ..core.model import BalconyModel
from ..core.policy import FULL
from .packing import Row, batches, can_pack, pack_rows, packed_mask

METHODS = ("balcony", "early_exit", "truncation")


@dataclass(frozen=True)
class Variant:
    """One row of the table: a method at an exit (the full model has no exit)."""

    method: str
    exit: int | None


def variants(model: BalconyModel) -> list[Variant]:
    return [Variant(FULL, None)] + [Variant(m, e) for e in model.exits for m in METHODS]


class ExitSweep:
    """Log-likelihoods of token pairs under every variant of `model`, each pair scored once.

    `packing` (default: where the base allows it) puts sequences that share a prefix into one row.
    """

    def __init__(self, model: BalconyModel, *, batch_tokens: int = 4096, max_batch: int = 64, row_tokens: int = 2048,
                 packing: bool | None = None, progress: bool = True):
        if model.tokenizer is None:
            raise BalconyError("downstream tasks are text: this base has no tokenizer files; save one beside the model")
        self.model = model
        self.variants = variants(model)
        self.batch_tokens, self.max_batch, self.row_tokens = batch_tokens, max_batch, row_tokens
        self.packing = can_pack(model) if packing is None else packing
        self.progress = progress
        self.scores: dict[tuple, torch.Tensor] = {}  # (context ids, continuation ids) -> [variants, 2]
        config = model.base.config
        self.max_length = (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
                           or 2048)
        tokenizer = model.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.scoring_seconds = 0.0
        self.scored_tokens = 0

    def result(self, key: tuple, variant: int) -> tuple[float, bool]:
        """(log-likelihood, greedy) of a scored pair under the variant at index `variant`."""
        return float(self.scores[key][variant, 0]), bool(self.scores[key][variant, 1])

    def input(self, key: tuple) -> tuple[int, ...]:
        # as lm-eval's HF backend: the model reads context + continuation minus its last token,
        # left-truncated to the model's length
        context, continuation = key
        return (context + continuation)[-(self.max_length + 1):][:-1]

    def score(self, keys: list[tuple]) -> None:
        """Log-likelihood and greedy flag under every variant, into `self.scores`, of the keys not scored yet."""
        todo = list(dict.fromkeys(k for k in keys if k not in self.scores))
        if not todo:
            return
        # requests that feed the model the same tokens share an input (e.g. MMLU's four one-letter answers)
        inputs: dict[tuple, list[tuple]] = {}
        for key in todo:
            inputs.setdefault(self.input(key), []).append(key)
        rows = pack_rows(list(inputs), packing=self.packing, row_tokens=self.row_tokens)
        batched = batches(rows, batch_tokens=self.batch_tokens, max_batch=self.max_batch)
        total = sum(len(b[0].tokens) * len(b) for b in batched)
        began = time.perf_counter()
        with tqdm(total=total, desc=f"scoring {len(todo)} requests x {len(self.variants)} variants", unit="tok",
                  unit_scale=True, disable=not self.progress) as bar:
            for batch in batched:
                self._score_batch(batch, inputs)
                bar.update(len(batch[0].tokens) * len(batch))
        self.scoring_seconds += time.perf_counter() - began
        self.scored_tokens += sum(len(row.tokens) for row in rows)

    def _hidden(self, batch: list[Row]) -> dict[Variant, torch.Tensor]:
        """Every variant's last hidden state over the batch, from one trunk pass."""
        model = self.model
        width = len(batch[0].tokens)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        for r, row in enumerate(batch):
            ids[r, : len(row.tokens)] = torch.tensor(row.tokens)
        if self.packing:
            positions = torch.zeros((len(batch), width), dtype=torch.long)
            for r, row in enumerate(batch):
                positions[r, : len(row.tokens)] = torch.tensor(row.positions)
            mask = packed_mask(batch, width, model.base.config, model.dtype)
            out = model.forward_exits(ids.to(model.device), mask.to(model.device), baselines=True,
                                      position_ids=positions.to(model.device))
        else:
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, row in enumerate(batch):
                mask[r, : len(row.tokens)] = 1
            out = model.forward_exits(ids.to(model.device), mask.to(model.device), baselines=True)
        hidden = {Variant(FULL, None): out.teacher_hidden}
        for e in model.exits:
            hidden[Variant("balcony", e)] = out.hidden[e]
            hidden[Variant("early_exit", e)] = out.early_exit[e]
            hidden[Variant("truncation", e)] = out.truncation[e]
        return hidden

    @torch.no_grad()
    def _score_batch(self, batch: list[Row], inputs: dict[tuple, list[tuple]]) -> None:
        model = self.model
        hidden = self._hidden(batch)
        # every scored token: its row, the row position that predicts it, its id; the head runs only there
        where, targets, spans = [], [], []
        for r, row in enumerate(batch):
            for tokens, index in zip(row.members, row.index):
                for key in inputs[tokens]:
                    k = len(key[1])
                    spans.append((key, len(targets), len(targets) + k))
                    where.extend((r, index[t]) for t in range(len(tokens) - k, len(tokens)))
                    targets.extend(key[1])
        rows_at = torch.tensor([w[0] for w in where], device=model.device)
        cols_at = torch.tensor([w[1] for w in where], device=model.device)
        targets = torch.tensor(targets)
        scores = torch.zeros(len(spans), len(self.variants), 2)
        for v, variant in enumerate(self.variants):
            logprobs = torch.log_softmax(model.logits(hidden[variant][rows_at, cols_at]).float(), dim=-1).cpu()
            picked = logprobs.gather(-1, targets[:, None])[:, 0]
            hit = (logprobs.argmax(-1) == targets).float()
            for i, (_, a, b) in enumerate(spans):
                scores[i, v, 0] = picked[a:b].sum()
                scores[i, v, 1] = hit[a:b].min()
        for i, (key, _, _) in enumerate(spans):
            self.scores[key] = scores[i]

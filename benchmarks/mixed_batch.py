"""What a batch of rows at mixed exits saves, at the model runner, without a server around it.

For each context length: the prefill of 32 prompts and the median decode step, with every row at
full depth against rows spread evenly over every exit and the full model (`serving/runner.py`,
the engine's runner), side by side. Then the decode-step cost model behind the ratios: a full
step at 8 rows against 32 rows splits the step into a part every step pays whatever the rows
(reading each layer's weights) and a part per row (its compute, its KV cache); a mixed batch
saves only the per-row part of the layers its shallow rows skip.

    python benchmarks/mixed_batch.py                       # default model, contexts 64, 256, 512
    python benchmarks/mixed_batch.py --contexts 64 --rows 32 --steps 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from balcony import BalconyModel
from balcony.serving.runner import MixedRunner


def measure(runner: MixedRunner, prompts: list[list[int]], exits: list, steps: int) -> tuple[float, float]:
    """(prefill seconds, median decode-step milliseconds)."""
    start = time.perf_counter()
    rows, logits = runner.prefill(prompts, exits, 0)
    prefill = time.perf_counter() - start
    tokens, times = logits.argmax(-1), []
    for _ in range(steps):
        start = time.perf_counter()
        logits = runner.step(rows, tokens)
        tokens = logits.argmax(-1)
        times.append((time.perf_counter() - start) * 1000)
    return prefill, sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="default")
    p.add_argument("--contexts", default="64,256,512", help="prompt lengths in tokens, comma-separated")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--json")
    args = p.parse_args()
    model = BalconyModel.from_pretrained(args.artifact)
    runner = MixedRunner(model)
    depths = [*model.exits, None]
    g = torch.Generator().manual_seed(0)
    vocab = model.base.config.vocab_size
    out = {"rows": args.rows, "contexts": []}
    print(f"{args.rows} rows; mixed: spread evenly over exits {model.exits} and full")
    for length in [int(c) for c in args.contexts.split(",")]:
        prompts = [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(args.rows)]
        full = measure(runner, prompts, [None] * args.rows, args.steps)
        mixed = measure(runner, prompts, [depths[i % len(depths)] for i in range(args.rows)], args.steps)
        out["contexts"].append({"context": length, "prefill_s": {"full": full[0], "mixed": mixed[0]},
                                "step_ms": {"full": full[1], "mixed": mixed[1]}})
        print(f"context {length:>5}: prefill full {full[0]:6.2f} s, mixed {mixed[0]:6.2f} s ({full[0] / mixed[0]:.2f}x); "
              f"decode step full {full[1]:6.1f} ms, mixed {mixed[1]:6.1f} ms ({full[1] / mixed[1]:.2f}x)", flush=True)
    length = int(args.contexts.split(",")[0])
    few = max(1, args.rows // 4)
    small = measure(runner, [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(few)],
                    [None] * few, args.steps)[1]
    large = out["contexts"][0]["step_ms"]["full"]
    per_row = (large - small) / (args.rows - few)
    fixed = large - per_row * args.rows
    ideal = len(depths) / sum(model.costs.relative(e) for e in depths)
    out.update(fixed_ms=fixed, per_row_ms=per_row, flop_ideal=ideal)
    print(f"\nfull decode step at context {length}: {small:.1f} ms at {few} rows, {large:.1f} ms at {args.rows}: "
          f"{fixed:.1f} ms every step pays + {per_row:.2f} ms per row ({per_row * args.rows / large:.0%} of a "
          f"{args.rows}-row step is per row); FLOP-weighted ideal of the mixed batch {ideal:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

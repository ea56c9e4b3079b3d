"""How much of a token's cost is the LM head, per base: counted FLOPs and measured time, side by side.

    python benchmarks/head_share.py                              # the default model
    python benchmarks/head_share.py --models default,gemma3-270m # beside Gemma 3 270M (optional package)

For each base: the head's share of a token's matmul FLOPs (`CostTable`), and of measured time
(batch 1): one cached decode step of the full model against the head alone on one hidden
state, and a 512-token prefill against the head over 512 positions. Then, per exit, the cost
relative to the full model: an early exit can never cost less than the head, so where the
head is most of a step, exits buy little speed. Medians of alternating repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@torch.no_grad()
def measure(name: str, repeats: int, prefill_len: int) -> dict:
    from balcony import BalconyModel

    model = BalconyModel.from_base(name)
    base, head = model.base, model.parts.head
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, base.config.vocab_size, (1, prefill_len), generator=g)
    cache = base(ids[:, :64], use_cache=True).cache
    token = ids[:, 64:65]
    hidden = torch.randn(1, 1, base.config.hidden_size, generator=g)
    hidden_long = torch.randn(1, prefill_len, base.config.hidden_size, generator=g)

    def step():
        base(token, cache=cache, use_cache=True)
        cache.crop(-1)

    timings = {k: [] for k in ("step", "head", "prefill", "head_prefill")}
    for _ in range(repeats):  # alternate, so machine noise hits all alike
        timings["step"].append(_median_ms(step, 3))
        timings["head"].append(_median_ms(lambda: head(hidden), 3))
        timings["prefill"].append(_median_ms(lambda: base(ids), 1))
        timings["head_prefill"].append(_median_ms(lambda: head(hidden_long), 1))
    ms = {k: statistics.median(v) for k, v in timings.items()}
    costs = model.costs
    return {
        "model": name, "layers": model.num_layers, "vocab": base.config.vocab_size,
        "hidden": base.config.hidden_size, "head_params": head.weight.numel(),
        "layer_params": costs.layer_flops // 2,
        "head_flop_share": costs.head_flops / costs.flops(None),
        "decode_step_ms": ms["step"], "head_ms": ms["head"], "head_time_share_decode": ms["head"] / ms["step"],
        "prefill_ms": ms["prefill"], "head_prefill_ms": ms["head_prefill"],
        "head_time_share_prefill": ms["head_prefill"] / ms["prefill"],
        "exits": {str(e): costs.relative(e) for e in model.exits},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="default", help="comma-separated bases (names, paths or hub ids)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    rows = [measure(name, args.repeats, args.prefill_len) for name in args.models.split(",") if name]
    print(f"{'model':>12} {'layers':>6} {'vocab':>7} {'head params':>12} {'head FLOPs':>10} "
          f"{'head time, decode':>17} {'head time, prefill':>18}  exit cost vs full (FLOPs)")
    for r in rows:
        exits = ", ".join(f"{e}: {c:.2f}" for e, c in r["exits"].items())
        print(f"{r['model']:>12} {r['layers']:>6} {r['vocab']:>7} {r['head_params'] / 1e6:>11.1f}M "
              f"{100 * r['head_flop_share']:>9.0f}% {100 * r['head_time_share_decode']:>16.0f}% "
              f"{100 * r['head_time_share_prefill']:>17.0f}%  {exits}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

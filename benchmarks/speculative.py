"""Exact output, faster? Self-speculative decoding and dynamic exits against plain decoding.

One run, same prompts, same machine, side by side (greedy, chat prompts from the shipped
held-out set):
  batch 1   plain transformers `generate` on the unwrapped base; transformers' assisted
            decoding with `assistant_early_exit=e` (LayerSkip-style: the base's own head on
            layer e drafts); balcony speculative decoding drafted by balcony e
  batch 4   plain batched `generate` (left padding) against balcony speculative, batch 4
  dynamic   token-level exits at several thresholds: tokens/s, the share of tokens agreeing
            with the full model's choice on the same prefix, sequential compute saved
Prints tokens/s, speedup over plain, acceptance rate, mean accepted length, and whether every
speculative output equalled plain greedy output token for token. `--identity N` checks N
prompts at batch 1 and batch 4 (exactness only, no timing).

    python benchmarks/speculative.py                          # default model, shipped balconies
    python benchmarks/speculative.py --prompts 8 --max-new-tokens 64 --json out.json
    python benchmarks/speculative.py --identity 52 --max-new-tokens 32
    python benchmarks/speculative.py --dtype bf16                 # every method on bf16 weights
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from balcony import BalconyModel
from balcony.default import heldout_prompts
from balcony.decoding.dynamic import dynamic_generate
from balcony.core.exits import positions_from_mask
from balcony.decoding.speculative import draft_vocabulary, speculative_generate


def encode(model: BalconyModel, prompts: list[str]) -> dict:
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


class Timer:
    def __init__(self):
        self.seconds, self.tokens, self.same, self.total, self.stats = 0.0, 0, 0, 0, []

    def run(self, fn, new_tokens_of, reference=None):
        start = time.perf_counter()
        out = fn()
        self.seconds += time.perf_counter() - start
        sequences, stats = out if isinstance(out, tuple) else (out, None)
        self.tokens += new_tokens_of(sequences)
        if stats is not None:
            self.stats.append(stats)
        if reference is not None:
            self.total += 1
            self.same += int(torch.equal(sequences, reference))
        return sequences

    def row(self, name: str, plain_rate: float | None) -> dict:
        rate = self.tokens / self.seconds
        row = {"method": name, "tokens_per_s": round(rate, 2),
               "speedup": None if plain_rate is None else round(rate / plain_rate, 3)}
        if self.stats:
            drafted = sum(s["drafted"] for s in self.stats)
            row["acceptance_rate"] = round(sum(s["accepted"] for s in self.stats) / max(drafted, 1), 3)
            rounds = sum(s["row_rounds"] for s in self.stats)
            row["mean_accepted"] = round(sum(s["accepted"] for s in self.stats) / max(rounds, 1), 3)
            row["tokens_per_round"] = round(sum(s["generated"] for s in self.stats) / max(rounds, 1), 3)
        if self.total:
            row["identical"] = f"{self.same}/{self.total}"
        return row


def _median_ms(fn, reps: int = 15) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 2] * 1000


def step_costs(model: BalconyModel, inputs: dict, exits: list[int], vocab) -> list[dict]:
    """Milliseconds of one plain decode step, one draft step and one verification of k tokens,
    and from them the per-token acceptance a round of k drafts needs just to break even."""
    from transformers.cache_utils import DynamicCache

    from balcony.decoding.speculative import Passes

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    n = ids.shape[1]
    rows = []
    with torch.no_grad():
        cache = DynamicCache(config=model.base.config)
        model.base(input_ids=ids, cache=cache, use_cache=True)
        token = ids[:, -1:]

        def plain_step():
            model.base(input_ids=token, cache=cache, use_cache=True)
            cache.crop(-1)

        plain = _median_ms(plain_step)
        for e in exits:
            passes = Passes(model, e, vocab)
            positions = positions_from_mask(mask)
            _, states = passes.draft(ids, mask, positions)
            passes.verify(states, mask, positions, last_only=True)

            def draft():
                passes.draft(token, torch.ones(1, n + 1, dtype=torch.long), torch.tensor([[n]]))
                passes.draft_cache.crop(-1)

            def verify(k):
                hidden = states[:, -1:].repeat(1, k, 1)

                def run():
                    passes.verify(hidden, torch.ones(1, n + k, dtype=torch.long),
                                  torch.arange(n, n + k)[None])
                    passes.deep_cache.crop(-k)
                return run

            row = {"exit": e, "plain_step_ms": round(plain, 1), "draft_step_ms": round(_median_ms(draft), 1)}
            for k in (1, 2, 4, 8):
                row[f"verify_{k}_ms"] = round(_median_ms(verify(k)), 1)

            def needed(k):  # smallest a with (1 + a + ... + a^(k-1)) * plain >= k * draft + verify(k)
                cost = k * row["draft_step_ms"] + row[f"verify_{k}_ms"]
                if k * plain < cost:
                    return None
                lo, hi = 0.0, 1.0
                for _ in range(40):
                    mid = (lo + hi) / 2
                    lo, hi = (mid, hi) if sum(mid**t for t in range(k)) * plain < cost else (lo, mid)
                return round(hi, 3)

            row["break_even_acceptance"] = {k: needed(k) for k in (2, 4, 8)}
            rows.append(row)
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join("" if r.get(k) is None else str(r[k]) for k in keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default="default")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--exits", default=None, help="draft exits, comma separated (default: every balcony)")
    parser.add_argument("--num-draft", type=int, default=6, help="the most tokens a round may draft")
    parser.add_argument("--draft-vocab", type=int, default=8192, help="tokens the draft head scores (0: all)")
    parser.add_argument("--thresholds", default="1.0,0.9,0.8,0.6,0.4")
    parser.add_argument("--identity", type=int, default=0, help="only check exactness on this many prompts")
    parser.add_argument("--skip", default="", help="sections to skip: b1,b4,costs,dynamic,assisted")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="weights of base and balconies for every method (bf16: the CPU's bf16 matmuls)")
    parser.add_argument("--json", help="write the tables here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = BalconyModel.from_pretrained(args.artifact)
    if args.dtype == "bf16":
        model.to(torch.bfloat16)
    tokenizer = model.tokenizer
    exits = model.exits if args.exits is None else [int(e) for e in args.exits.split(",")]
    vocab = draft_vocabulary(model, args.draft_vocab) if args.draft_vocab else None
    n = args.max_new_tokens
    common = dict(max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    spec = dict(max_new_tokens=n, num_draft=args.num_draft, draft_vocab=vocab, pad_token_id=tokenizer.pad_token_id)
    skip = set(args.skip.split(","))
    result: dict = {"model": args.artifact, "dtype": args.dtype, "max_new_tokens": n, "draft_vocab": args.draft_vocab,
                    "num_draft": args.num_draft, "threads": torch.get_num_threads()}

    if args.identity:
        prompts = heldout_prompts(args.identity)
        for batch in (1, 4):
            same = total = 0
            for i in tqdm(range(0, len(prompts), batch), desc=f"identity, batch {batch}"):
                inputs = encode(model, prompts[i:i + batch])
                reference = model.base.generate(**inputs, **common)
                for e in exits:
                    out, _ = speculative_generate(model, inputs["input_ids"], inputs["attention_mask"], draft_exit=e,
                                                  **spec)
                    same += int(torch.equal(out, reference))
                    total += 1
            print(f"batch {batch}: {same}/{total} speculative outputs (exits {exits}) identical to plain greedy")
            result[f"identity_batch{batch}"] = f"{same}/{total}"
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return

    prompts = heldout_prompts(args.prompts)
    new_of = lambda length: (lambda seq: int(seq[:, length:].numel()))  # noqa: E731
    model.base.generate(**encode(model, prompts[:1]), **{**common, "max_new_tokens": 4})  # warm-up

    for batch in (1, 4):
        if f"b{batch}" in skip:
            continue
        suffix = "" if batch == 1 else f", batch {batch}"
        assisted = [] if batch > 1 or "assisted" in skip else exits  # transformers drafts at batch 1 only
        timers = {f"plain generate{suffix}": Timer(), **{f"assisted early exit {e}": Timer() for e in assisted},
                  **{f"balcony speculative {e}{suffix}": Timer() for e in exits}}
        plain_timer = timers[f"plain generate{suffix}"]
        for i in tqdm(range(0, len(prompts), batch), desc=f"batch {batch}"):
            inputs = encode(model, prompts[i:i + batch])
            length = inputs["input_ids"].shape[1]
            reference = plain_timer.run(lambda: model.base.generate(**inputs, **common), new_of(length))
            for e in assisted:
                timers[f"assisted early exit {e}"].run(
                    lambda: model.base.generate(**inputs, **common, assistant_early_exit=e), new_of(length), reference)
            for e in exits:
                timers[f"balcony speculative {e}{suffix}"].run(
                    lambda: speculative_generate(model, inputs["input_ids"], inputs["attention_mask"], draft_exit=e,
                                                 **spec), new_of(length), reference)
        plain = plain_timer.tokens / plain_timer.seconds
        result[f"batch{batch}"] = [t.row(name, plain) for name, t in timers.items()]
        print_table(f"batch {batch}: {len(prompts)} prompts x {n} new tokens, greedy"
                    + (", left padding" if batch > 1 else ""), result[f"batch{batch}"])

    if "costs" not in skip:
        result["costs"] = step_costs(model, encode(model, prompts[:1]), exits, vocab)
        print_table("step costs (batch 1, medians) and the acceptance a round of k drafts needs to break even",
                    result["costs"])

    if "dynamic" not in skip:
        rows = []
        plain_timer = Timer()
        for prompt in prompts:
            inputs = encode(model, [prompt])
            plain_timer.run(lambda: model.base.generate(**inputs, **common), new_of(inputs["input_ids"].shape[1]))
        plain = plain_timer.tokens / plain_timer.seconds
        for threshold in tqdm([float(t) for t in args.thresholds.split(",")], desc="dynamic"):
            timer, agree, count, saved, shares = Timer(), 0, 0, [], {}
            for prompt in prompts:
                inputs = encode(model, [prompt])
                length = inputs["input_ids"].shape[1]
                out = timer.run(lambda: dynamic_generate(model, inputs["input_ids"], threshold=threshold, draft_vocab=vocab,
                                                         max_new_tokens=n), new_of(length))
                stats = timer.stats.pop()
                with torch.no_grad():  # the full model's choice on the same prefix, for every emitted token
                    full = model.base(out[:, :-1]).logits[0, length - 1:].argmax(-1)
                agree += int((full == out[0, length:]).sum())
                count += out.shape[1] - length
                saved.append(stats["compute_saved"])
                for depth, share in stats["exit_share"].items():
                    shares[depth] = shares.get(depth, 0) + share / len(prompts)
            row = timer.row(f"dynamic, threshold {threshold}", plain)
            row.update(agreement=round(agree / count, 3), compute_saved=round(sum(saved) / len(saved), 3),
                       exit_share={k: round(v, 3) for k, v in sorted(shares.items(), key=lambda kv: int(kv[0]))})
            rows.append(row)
        result["dynamic"] = rows
        print_table(f"dynamic exits: {len(prompts)} prompts x {n} new tokens (plain {plain:.2f} tokens/s)", rows)

    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

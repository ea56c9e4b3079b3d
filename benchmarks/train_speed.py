"""Training-step cost against the base's own no-grad forward, and the sparse KL against the exact one,
measured side by side.

    python benchmarks/train_speed.py                    # default model, exits 15,20,25, batch 4 x 512
    python benchmarks/train_speed.py --precision bf16 --repeats 5
    python benchmarks/train_speed.py --compare          # exact vs sparse KL, fp32 and bf16, one run

Prints, for the same batch: the base model's no-grad forward (with its logits) time, one full
training step's time (trunk pass, three balconies, chunked head + KL, backward, AdamW), their
ratio, training tokens/s, and peak memory (RSS) of a process that only runs forwards against
one that trains. Times alternate forward / step so machine noise hits both alike.
Targets: step <= 3.0x forward, peak memory < 2x the forward's.

`--compare` times six trainers round-robin: the exact KL, the sparse KL (`--kl-topk`,
`--kl-samples`), and the sparse KL with the teacher's top k cached (`--teacher-cache`: a
later epoch, every row already seen once, so the trunk stops at the deepest exit and the
teacher's head is skipped), each in fp32 and bf16; it prints tokens/s and the ratio to the exact
KL per precision (target: at least 2x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from balcony.evaluation.bench import peak_rss_mb, reset_peak_rss


def build(args, precision=None, kl_topk=0, model=None, teacher_cache=None):
    from balcony import BalconyModel
    from balcony.training.data import PackedData
    from balcony.training.config import DataOptions, LogOptions, LossOptions, OptimOptions, TrainConfig
    from balcony.training.trainer import Trainer

    model = model or BalconyModel.from_base(args.model, exits=[int(e) for e in args.exits.split(",")])
    g = torch.Generator().manual_seed(0)
    vocab = model.base.config.vocab_size
    rows = torch.randint(0, vocab, (args.batch_size * 4, args.seq_len), generator=g)
    data = PackedData(train=rows, val=rows[: args.batch_size], source="random tokens")
    loss = LossOptions(chunk_tokens=args.chunk_tokens, kl_topk=kl_topk, kl_samples=args.kl_samples,
                       kl_tail_samples=args.kl_tail_samples if kl_topk else 0, teacher_cache=teacher_cache)
    config = TrainConfig(out="/tmp/balcony-bench-train", precision=precision or args.precision,
                         data=DataOptions(seq_len=args.seq_len), optim=OptimOptions(batch_size=args.batch_size, max_steps=1000),
                         loss=loss, logging=LogOptions(progress=False))
    trainer = Trainer(config, model=model, data=data)
    return model, trainer, rows[: args.batch_size]


def forward(model, batch, precision):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        return model.base(batch).logits


def child(args) -> None:
    """Run one phase alone and report this process's peak RSS while it ran (model weights included)."""
    model, trainer, batch = build(args)
    import gc

    gc.collect()
    reset_peak_rss()
    for _ in range(2):
        if args.phase == "forward":
            forward(model, batch, args.precision)
        else:
            trainer.train_step()
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--exits", default="15,20,25")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compare", action="store_true", help="exact vs sparse KL, fp32 and bf16, side by side")
    p.add_argument("--kl-topk", type=int, default=64)
    p.add_argument("--kl-samples", type=int, default=2048)
    p.add_argument("--kl-tail-samples", type=int, default=16)
    p.add_argument("--phase", choices=("forward", "train"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        child(args)
        return
    if args.compare:
        compare(args)
        return

    model, trainer, batch = build(args)
    forward(model, batch, args.precision)  # warm-up both paths
    trainer.train_step()
    fwd, step = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        forward(model, batch, args.precision)
        fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        trainer.train_step()
        step.append(time.perf_counter() - t)
    del model, trainer

    peaks = {}
    for phase in ("forward", "train"):
        cmd = [sys.executable, __file__, "--phase", phase, "--exits", args.exits, "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--precision", args.precision, "--chunk-tokens", str(args.chunk_tokens)]
        if args.model:
            cmd += ["--model", args.model]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        peaks[phase] = json.loads(out)["peak_rss_mb"]

    f, s = statistics.median(fwd), statistics.median(step)
    tokens = args.batch_size * args.seq_len
    print(f"model {args.model or 'default'} · exits {args.exits} · batch {args.batch_size} x {args.seq_len} · "
          f"{args.precision} · {torch.get_num_threads()} threads · median of {args.repeats}")
    print(f"{'base no-grad forward':<28} {f:8.2f} s/batch")
    print(f"{'training step':<28} {s:8.2f} s/batch")
    print(f"{'step / forward':<28} {s / f:8.2f} x   (target <= 3.0, ideal about 2.5)")
    print(f"{'training throughput':<28} {tokens / s:8.0f} tokens/s")
    print(f"{'peak RSS, forward only':<28} {peaks['forward']:8.0f} MB")
    print(f"{'peak RSS, training':<28} {peaks['train']:8.0f} MB")
    print(f"{'peak train / forward':<28} {peaks['train'] / peaks['forward']:8.2f} x   (target < 2.0)")


def compare(args) -> None:
    """Exact, sparse and cached-sparse KL in fp32 and bf16: six trainers on one shared model, timed round-robin."""
    import tempfile

    model, first, batch = build(args, precision="fp32")
    trainers = {("exact", "fp32"): first}
    cache = tempfile.TemporaryDirectory(prefix="balcony-teacher-cache-")
    for precision in ("fp32", "bf16"):
        for kind in ("exact", "sparse", "cached"):
            if (kind, precision) not in trainers:
                trainers[kind, precision] = build(args, precision=precision, model=model,
                                                  kl_topk=args.kl_topk if kind != "exact" else 0,
                                                  teacher_cache=cache.name if kind == "cached" else None)[1]
    for (kind, _), trainer in trainers.items():
        # warm-up; the cached trainers run a whole epoch first, so every row's teacher is on disk
        for _ in range(trainer.steps_per_epoch if kind == "cached" else 1):
            trainer.train_step()
    times = {key: [] for key in trainers}
    for _ in range(args.repeats):
        for key, trainer in trainers.items():
            t = time.perf_counter()
            trainer.train_step()
            times[key].append(time.perf_counter() - t)
    tokens = args.batch_size * args.seq_len
    print(f"model {args.model or 'default'} · exits {args.exits} · batch {args.batch_size} x {args.seq_len} · "
          f"{torch.get_num_threads()} threads · median of {args.repeats}, round-robin · "
          f"sparse = top {args.kl_topk} + {args.kl_tail_samples} drawn from the rest + {args.kl_samples} sampled rows; "
          "cached = sparse, teacher's part from disk")
    print(f"{'KL':<8} {'precision':<10} {'s/step':>8} {'tokens/s':>10} {'vs exact':>9}")
    for (kind, precision), values in times.items():
        step = statistics.median(values)
        exact = statistics.median(times["exact", precision])
        print(f"{kind:<8} {precision:<10} {step:8.2f} {tokens / step:10.0f} {exact / step:8.2f}x")
    cache.cleanup()


if __name__ == "__main__":
    main()

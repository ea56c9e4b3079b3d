"""Speed per exit against the full model and against the FLOP-ideal, measured side by side.

For each exit, for the full model through BalconyModel, and for plain transformers
`generate` on the unwrapped base: prefill tokens/s, decode tokens/s and milliseconds per
output token at each batch size, peak memory, the measured decode speedup over the full model
and the ideal one from counted per-token FLOPs. Targets run round-robin (every round visits
every target once) and medians are reported, so a noisy machine slows all of them alike.
The batch-1 milliseconds per token are the profile that `max_ms_per_token` budgets read.
"""

from __future__ import annotations

import platform
import statistics
import time

import torch
from tqdm.auto import tqdm

from ..core.model import BalconyModel
from ..core.policy import FULL

PLAIN = "plain"  # transformers generate on the unwrapped base: the reference for the overhead
NOISY_SPREAD = 1.3  # slowest / fastest round of one measurement above which the report warns


def reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM, so each target's peak is its own.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@torch.no_grad()
def bench(
    model: BalconyModel,
    *,
    batch_sizes: tuple[int, ...] = (1, 8),
    prompt_len: int = 64,
    new_tokens: int = 32,
    prefill_len: int = 512,
    repeats: int = 3,
    progress: bool = True,
) -> dict:
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2 (decode time is the time past the first token)")
    model.eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.base.config.vocab_size
    prompts = {b: torch.randint(3, vocab, (b, prompt_len), generator=g).to(model.device) for b in batch_sizes}
    prefill = torch.randint(3, vocab, (1, prefill_len), generator=g).to(model.device)
    targets: list = [PLAIN, FULL, *model.exits]
    samples, peaks = _measure(_Runner(model), targets, prompts, prefill, new_tokens, repeats, progress)
    rows = _rows(model, targets, samples, peaks, batch_sizes, prefill_len)
    by_exit = {r["exit"]: r for r in rows}
    # Spread between rounds: a busy machine shows up here, and its figures are not to be trusted.
    spreads = [max(v) / min(v) for t in targets for v in samples[t].values() if len(v) > 1 and min(v) > 0]
    return {
        "max_spread": max(spreads) if spreads else None,
        "settings": {"batch_sizes": list(batch_sizes), "prompt_len": prompt_len, "new_tokens": new_tokens,
                     "prefill_len": prefill_len, "repeats": repeats, "dtype": str(model.dtype).replace("torch.", ""),
                     "device": str(model.device), "threads": torch.get_num_threads(),
                     "machine": platform.machine(), "processor": platform.processor()},
        "rows": rows,
        "full_vs_plain": by_exit[FULL]["decode_tokens_per_second"][str(batch_sizes[0])]
        / by_exit[PLAIN]["decode_tokens_per_second"][str(batch_sizes[0])],
    }


class _Runner:
    """Generation and a forward pass at a target: PLAIN (the unwrapped base), FULL or an exit."""

    def __init__(self, model: BalconyModel):
        self.model = model
        pad = model.base.generation_config.pad_token_id
        if pad is None:
            pad = model.base.generation_config.eos_token_id
        self.pad = pad[0] if isinstance(pad, list) else pad

    def generate(self, target, ids: torch.Tensor, n: int):
        options = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=self.pad)
        mask = torch.ones_like(ids)
        if target == PLAIN:
            return self.model.base.generate(ids, attention_mask=mask, **options)
        return self.model.generate(ids, attention_mask=mask, exit_layer=None if target == FULL else target, **options)

    def forward(self, target, ids: torch.Tensor):
        if target == PLAIN:
            return self.model.base(ids)
        return self.model(ids, exit_layer=None if target == FULL else target)


def _measure(runner: _Runner, targets: list, prompts: dict, prefill: torch.Tensor, new_tokens: int, repeats: int,
             progress: bool) -> tuple[dict, dict]:
    """Seconds per prefill and per decode step (each batch size), every round visiting every target."""
    batch_sizes = list(prompts)
    samples = {t: {"prefill": [], **{f"decode/{b}": [] for b in batch_sizes}} for t in targets}
    peaks: dict = {t: None for t in targets}
    for t in targets:  # warm-up: first calls pay for allocation and kernel selection
        runner.generate(t, prompts[batch_sizes[0]], 2)
    bar = tqdm(total=repeats * len(targets), desc="benchmarking", unit="target", disable=not progress)
    for _ in range(repeats):
        for t in targets:
            reset_peak_rss()
            start = time.perf_counter()
            runner.forward(t, prefill)
            samples[t]["prefill"].append(time.perf_counter() - start)
            for b in batch_sizes:
                start = time.perf_counter()
                runner.generate(t, prompts[b], 1)
                first = time.perf_counter() - start
                start = time.perf_counter()
                runner.generate(t, prompts[b], new_tokens)
                total = time.perf_counter() - start
                # seconds per decode step, the prompt's prefill and first token taken out
                samples[t][f"decode/{b}"].append(max(total - first, 1e-9) / (new_tokens - 1))
            peak = peak_rss_mb()
            if peak is not None:
                peaks[t] = max(peaks[t] or 0.0, peak)
            bar.update(1)
    bar.close()
    return samples, peaks


def _rows(model: BalconyModel, targets: list, samples: dict, peaks: dict, batch_sizes, prefill_len: int) -> list[dict]:
    """Medians per target, speedups over the full model and the fraction of the FLOP-ideal reached."""
    rows = []
    for t in targets:
        step = {b: statistics.median(samples[t][f"decode/{b}"]) for b in batch_sizes}
        rows.append({
            "exit": t,
            "prefill_tokens_per_second": prefill_len / statistics.median(samples[t]["prefill"]),
            "decode_tokens_per_second": {str(b): b / step[b] for b in batch_sizes},
            "ms_per_token": {str(b): 1000 * step[b] for b in batch_sizes},
            "peak_rss_mb": peaks[t],
            "ideal_speedup": 1 / model.costs.relative(None if t in (PLAIN, FULL) else t),
        })
    by_exit = {r["exit"]: r for r in rows}
    for r in rows:
        for b in batch_sizes:
            r.setdefault("speedup", {})[str(b)] = (
                r["decode_tokens_per_second"][str(b)] / by_exit[FULL]["decode_tokens_per_second"][str(b)])
        r["fraction_of_ideal"] = r["speedup"][str(batch_sizes[0])] / r["ideal_speedup"]
    return rows


def profile_from(report: dict, balconies: dict[str, int]) -> dict:
    """The part of a bench report that budgets need: batch-1 ms per token per exit, and the shape
    of the balconies measured ({exit: layers}: a profile only serves balconies of that shape)."""
    first = str(report["settings"]["batch_sizes"][0])
    return {
        "balconies": balconies,
        "batch_size": int(first),
        "ms_per_token": {str(r["exit"]): r["ms_per_token"][first]
                         for r in report["rows"] if r["exit"] != PLAIN},
        "settings": report["settings"],
    }


def format_table(report: dict) -> str:
    sizes = [str(b) for b in report["settings"]["batch_sizes"]]
    head = f"{'exit':>6} {'prefill tok/s':>13}" + "".join(f" {'decode tok/s b' + b:>16} {'ms/tok b' + b:>10}" for b in sizes)
    head += f" {'speedup':>8} {'ideal':>6} {'of ideal':>8} {'peak MB':>8}"
    lines = [head]
    for r in report["rows"]:
        cells = "".join(f" {r['decode_tokens_per_second'][b]:16.1f} {r['ms_per_token'][b]:10.1f}" for b in sizes)
        peak = f"{r['peak_rss_mb']:8.0f}" if r["peak_rss_mb"] is not None else f"{'-':>8}"
        lines.append(f"{r['exit']!s:>6} {r['prefill_tokens_per_second']:13.0f}{cells} {r['speedup'][sizes[0]]:7.2f}x"
                     f" {r['ideal_speedup']:5.2f}x {100 * r['fraction_of_ideal']:7.0f}% {peak}")
    lines.append(f"full depth through BalconyModel vs plain transformers generate (batch {sizes[0]}): "
                 f"{100 * report['full_vs_plain']:.1f}% of its speed")
    spread = report.get("max_spread")
    if spread is not None and spread > NOISY_SPREAD:
        lines.append(f"WARNING: the same measurement varied up to {spread:.1f}x between rounds: the machine is busy, "
                     "these figures are not reliable; rerun on a quiet machine or with more --repeats")
    return "\n".join(lines)


def plot(bench_report: dict, eval_report: dict | None, path: str, metric: str = "agreement") -> None:
    """Quality (from an eval report) against measured decode speedup, Balcony vs both baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = str(bench_report["settings"]["batch_sizes"][0])
    speed = {r["exit"]: r["speedup"][first] for r in bench_report["rows"]}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if eval_report is None:
        rows = sorted((r for r in bench_report["rows"] if r["exit"] != PLAIN), key=lambda r: r["ideal_speedup"])
        ax.plot([r["ideal_speedup"] for r in rows], [r["speedup"][first] for r in rows], "o-", label="measured")
        ax.plot([1, max(r["ideal_speedup"] for r in rows)], [1, max(r["ideal_speedup"] for r in rows)], "k--",
                label="ideal (FLOPs)")
        ax.set_xlabel("ideal speedup (counted FLOPs)")
        ax.set_ylabel(f"measured decode speedup (batch {first})")
    else:
        exits = [r["exit"] for r in eval_report["exits"]]
        xs = [speed[e] for e in exits]
        full_y = 1.0 if metric == "agreement" else 0.0
        styles = {"balcony": ("o-", "Balcony"), "early_exit": ("s--", "early exit (untrained)"),
                  "truncation": ("^:", "truncation (same depth)")}
        for family, (style, label) in styles.items():
            ax.plot(xs, [r[family][metric] for r in eval_report["exits"]], style, label=label)
        ax.plot([1.0], [full_y], "k*", markersize=12, label="full model")
        for e, x, y in zip(exits, xs, [r["balcony"][metric] for r in eval_report["exits"]]):
            ax.annotate(f"exit {e}", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
        ax.set_xlabel(f"measured decode speedup over the full model (batch {first})")
        ax.set_ylabel("top-1 agreement with the full model" if metric == "agreement" else "KL(full || exit)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("balcony: quality against speed per exit" if eval_report else "balcony: measured against ideal speedup")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

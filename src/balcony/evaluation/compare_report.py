"""The comparison's report: one row per method and exit (and each method's full model), the
table as text, the notes on where balcony is beaten, and the plot.

A row holds the held-out KL to the original model, top-1 agreement with it and perplexity, and
the downstream accuracy per task, its average with the average's binomial standard error, the
share of the original full model's average it keeps and the share above chance. Balcony and
pruned leave the full model untouched, so their full rows are the original's (KL 0, agreement 1).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..core.policy import FULL
from .downstream import average_columns
from .downstream_report import kept, short_name

_STYLES = {"balcony": ("tab:blue", "o"), "layerskip": ("tab:green", "s"), "pruned": ("tab:orange", "^")}


def build_report(methods: list[str], training: dict, results: dict, columns: list[str], *, teacher: dict | None,
                 settings: dict) -> dict:
    """The comparison as JSON: `methods` (training figures), `rows` (method x exit), `notes`."""
    core = average_columns(columns) if columns else []
    reference = _reference(methods, results, columns)
    full_average = _average(reference, core)
    chance = sum(_first(results, c)["chance"] for c in core) / len(core) if core else None
    rows = []
    for method in methods:
        held = results[method]["heldout"]
        for where in [*sorted(training[method]["costs"], key=int), FULL]:
            quality = held["exits"].get(where) or {"kl": 0.0, "agreement": 1.0, "perplexity": held["original_perplexity"]}
            accuracy = {c: results[method]["downstream"][c]["accuracy"][where] for c in columns}
            row = {"method": method, "exit": where, "cost": training[method]["costs"].get(where, 1.0), **quality,
                   "accuracy": accuracy}
            if core:
                average, stderr = _average(accuracy, core), _stderr(accuracy, core, results)
                row.update(average=average, average_stderr=stderr, kept=kept(average, full_average),
                           kept_stderr=stderr / full_average if full_average else math.nan,
                           kept_above_chance=kept(average, full_average, chance))
            rows.append(row)
    return {
        "settings": settings,
        "teacher": teacher,
        "methods": {m: {k: training[m][k] for k in ("trained_parameters", "tokens", "steps", "seconds")} for m in methods},
        "heldout_tokens": next(iter(results[m]["heldout"]["tokens"] for m in methods)),
        "original": {"perplexity": results[methods[0]]["heldout"]["original_perplexity"],
                     **({"accuracy": reference, "average": full_average} if core else {})},
        "tasks": columns, "average_of": core, "chance_average": chance,
        "documents": {c: _first(results, c)["documents"] for c in columns},
        "untrained": {m: {c: results[m]["downstream"][c]["untrained"] for c in columns} for m in methods},
        "rows": rows,
        "notes": beaten(rows),
    }


def _reference(methods: list[str], results: dict, columns: list[str]) -> dict:
    """The original full model's accuracy per column: any untouched method's full row, or its own sweep."""
    source = next((results[m] for m in methods if m != "layerskip"), results.get("original"))
    return {c: source["downstream"][c]["accuracy"][FULL] for c in columns}


def _first(results: dict, column: str) -> dict:
    return next(r["downstream"][column] for r in results.values() if column in r.get("downstream", {}))


def _average(accuracy: dict, core: list[str]) -> float:
    return sum(accuracy[c] for c in core) / len(core) if core else math.nan


def _stderr(accuracy: dict, core: list[str], results: dict) -> float:
    """The binomial standard error of an average over `core` (each task's documents independent)."""
    return math.sqrt(sum(accuracy[c] * (1 - accuracy[c]) / _first(results, c)["documents"] for c in core)) / len(core)


def beaten(rows: list[dict]) -> list[str]:
    """Where another method beats balcony at the same exit, figure by figure (KL lower, the rest higher)."""
    ours = {r["exit"]: r for r in rows if r["method"] == "balcony" and r["exit"] != FULL}
    notes = []
    for row in rows:
        mine = ours.get(row["exit"])
        if mine is None or row["method"] == "balcony":
            continue
        for name, better in (("kl", row["kl"] < mine["kl"]), ("agreement", row["agreement"] > mine["agreement"]),
                             ("average", "average" in row and row["average"] > mine["average"])):
            if better:
                extra = f" (standard error {row['average_stderr']:.3f})" if name == "average" else ""
                notes.append(f"exit {row['exit']}: {row['method']} beats balcony on {_NAMES[name]}, "
                             f"{row[name]:.3f} vs {mine[name]:.3f}{extra}")
    return notes


_NAMES = {"kl": "held-out KL", "agreement": "held-out agreement", "average": "the downstream average"}


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{seconds / 60:.1f} min"


def format_table(report: dict) -> str:
    """The report as text: one line per method (training and its full model), then method x exit."""
    core = report["average_of"]
    tokens = next(iter(report["methods"].values()))["tokens"]  # --tokens, rounded up to whole steps
    lines = [(f"{tokens:,} training tokens per method, the same data and order; held-out: "
              f"{report['heldout_tokens']:,} tokens, original perplexity {report['original']['perplexity']:.2f}")]
    if report.get("teacher"):
        lines.append(f"teacher pass (shared by every method): {report['teacher']['rows']:,} rows, "
                     f"{_duration(report['teacher']['seconds'])}")
    head = f"{'method':<10} {'trained params':>15} {'tokens':>11} {'train time':>11} | full model: {'KL':>6} {'agree':>6}"
    lines += ["", head + (f" {'avg':>6}" if core else ""), "-" * (len(head) + (7 if core else 0))]
    for method, info in report["methods"].items():
        full = next(r for r in report["rows"] if r["method"] == method and r["exit"] == FULL)
        line = (f"{method:<10} {info['trained_parameters']:>15,} {info['tokens']:>11,} {_duration(info['seconds']):>11} |"
                f" {'':11} {full['kl']:>6.3f} {full['agreement']:>6.3f}")
        lines.append(line + (f" {100 * full['average']:>6.1f}" if core else ""))
    names = [short_name(c) for c in report["tasks"]]
    head = f"{'method':<10} {'exit':>4} {'cost':>5} | {'KL':>6} {'agree':>6} {'ppl':>8}"
    if core:
        head += f" | {'avg':>5} {'+-se':>4} {'kept':>6} {'>chance':>7} | " + " ".join(f"{n:>7}" for n in names)
    lines += ["", head, "-" * len(head)]
    for row in report["rows"]:
        line = (f"{row['method']:<10} {row['exit']:>4} {row['cost']:>5.2f} | {row['kl']:>6.3f} {row['agreement']:>6.3f} "
                f"{row['perplexity']:>8.2f}")
        if core:
            line += (f" | {100 * row['average']:>5.1f} {100 * row['average_stderr']:>4.1f} {100 * row['kept']:>5.1f}%"
                     f" {100 * row['kept_above_chance']:>6.1f}% | "
                     + " ".join(f"{100 * row['accuracy'][c]:>7.1f}" for c in report["tasks"]))
        lines.append(line)
    lines.append("")
    lines.append("cost: per-token FLOPs relative to the full model (LayerSkip's exit e runs e layers, a balcony's "
                 "e + 1); KL and agree: to and with the original full model on the held-out text")
    if core:
        docs = ", ".join(f"{short_name(c)} {report['documents'][c]}" for c in report["tasks"])
        lines.append(f"avg over {', '.join(short_name(c) for c in core)} (accuracy, %; +-se its standard error); kept = "
                     f"avg / the original's {100 * report['original']['average']:.1f}; >chance: above chance "
                     f"{100 * report['chance_average']:.1f}; documents: {docs}")
    lines += [f"note: {n}" for n in report["notes"]] or ["balcony is beaten by no method at any exit on any figure"]
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> None:
    """Held-out agreement (and the downstream average) against per-token cost, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("agreement", "top-1 agreement with the original (held-out)", 1.0)]
    if report["average_of"]:
        panels.append(("average", "downstream average accuracy, %", 100.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), dpi=120, squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], panels):
        for method in report["methods"]:
            color, marker = _STYLES.get(method, ("tab:gray", "x"))
            rows = sorted((r for r in report["rows"] if r["method"] == method), key=lambda r: r["cost"])
            ax.plot([r["cost"] for r in rows], [scale * r[key] for r in rows], marker=marker, color=color, label=method)
            for r in rows:
                ax.annotate(str(r["exit"]), (r["cost"], scale * r[key]), textcoords="offset points", xytext=(4, -10),
                            fontsize=8, color=color)
        ax.set_xlabel("per-token cost relative to the full model (FLOPs)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"balcony compare: {report['settings']['tokens']:,} training tokens per method", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

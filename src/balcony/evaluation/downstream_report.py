"""The downstream table: its JSON, the paper's table as text, and the accuracy-against-cost plot.

`table_report` turns accuracy per variant and column into the report `balcony eval --tasks`
writes: each row's average over the core columns, the share of the full model's average it
keeps, and that share above chance; costs are per token, relative to the full model.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..core.model import BalconyModel
from ..core.policy import FULL
from .sweep import Variant
from .tasks import MMLU

# lm-eval's accuracy; for HellaSwag the length-normalised one, as it is conventionally reported
# (its endings differ in length, and raw log-likelihood favours short ones: below chance on small models)
METRICS = {"hellaswag": "acc_norm"}


def metric(column: str) -> str:
    return METRICS.get(column, "acc")


def table_report(model: BalconyModel, columns: list[str], core: list[str], accuracy: dict, chance: dict, counts: dict,
                 **extra) -> dict:
    """The table as JSON: one row per variant with its average over `core`, kept %, above-chance kept %."""
    full = accuracy[Variant(FULL, None)]
    full_average = sum(full[c] for c in core) / len(core)
    chance_average = sum(chance[c] for c in core) / len(core)
    costs = variant_costs(model)
    rows = []
    for variant, acc in accuracy.items():
        average = sum(acc[c] for c in core) / len(core)
        rows.append({
            "method": variant.method,
            "exit": variant.exit,
            "cost": costs[variant],
            "accuracy": {c: acc[c] for c in columns},
            "average": average,
            "kept": kept(average, full_average),
            "kept_above_chance": kept(average, full_average, chance_average),
        })
    return {
        "tasks": columns,
        "average_of": core,
        "limit": extra.pop("limit"),
        "documents": counts,
        "chance": chance,
        "stderr": {c: math.sqrt(full[c] * (1 - full[c]) / counts[c]) for c in columns},
        "average_stderr": math.sqrt(sum(full[c] * (1 - full[c]) / counts[c] for c in core)) / len(core),
        "cost_source": costs["source"],
        "metric": {c: metric(c) for c in columns},
        "rows": rows,
        **extra,
    }


def kept(value: float, full: float, chance: float = 0.0) -> float:
    """The share of the full model's score (above `chance`) that `value` keeps."""
    if full - chance <= 0:
        return float("nan")  # the full model itself is at chance: nothing to keep
    return (value - chance) / (full - chance)


def variant_costs(model: BalconyModel) -> dict:
    """Per-token cost of each variant relative to the full model, and where the figures come from.

    With a speed profile (`balcony bench`, batch-1 decode) the balcony's cost is measured;
    truncation runs the same number of layers, so it costs the same; early exit runs n layers
    fewer (n per balcony) and is scaled from the balcony's measured figure by the FLOP model.
    Without a profile, all come from the FLOP model.
    """
    measured = (model.policy.profile or {}).get("ms_per_token") or {}
    costs: dict = {Variant(FULL, None): 1.0, "source": "measured" if measured else "flops"}
    for e in model.exits:
        flops = model.costs.relative(e)
        balcony = measured[str(e)] / measured[FULL] if measured.get(str(e)) and measured.get(FULL) else flops
        early_flops = model.costs.flops_at_depth(e) / model.costs.flops(None)  # layers[:e] and the head
        costs[Variant("balcony", e)] = costs[Variant("truncation", e)] = balcony
        costs[Variant("early_exit", e)] = balcony * early_flops / flops
    return costs


_SHORT = {"arc_easy": "ARC-E", "arc_challenge": "ARC-C", "lambada_openai": "LAMBADA", "piqa": "PIQA",
          "winogrande": "WinoG", "hellaswag": "HellaS", MMLU: "MMLU"}


def short_name(column: str) -> str:
    """A column's name in a table's header (ARC-E, MMLU, ...)."""
    return _SHORT.get(column, column)


def format_table(report: dict) -> str:
    """The paper's table in plain text: accuracy per task, average, difference, kept %, above-chance kept %."""
    columns, core = report["tasks"], report["average_of"]
    extra = [c for c in columns if c not in core]
    names = [_SHORT.get(c, c) for c in core] + ["avg", "diff", "kept", ">chance"] + [_SHORT.get(c, c) for c in extra]
    widths = [max(7, len(n)) for n in names]
    head = f"{'method':<11} {'exit':>4} {'cost':>5} | " + " ".join(n.rjust(w) for n, w in zip(names, widths))
    lines = [head, "-" * len(head)]
    full = next(r for r in report["rows"] if r["method"] == FULL)
    for row in report["rows"]:
        cells = [100 * row["accuracy"][c] for c in core]
        cells += [100 * row["average"], 100 * (row["average"] - full["average"]), 100 * row["kept"],
                  100 * row["kept_above_chance"]]
        cells += [100 * row["accuracy"][c] for c in extra]
        text = [f"{v:+.1f}" if i == len(core) + 1 else f"{v:.1f}" for i, v in enumerate(cells)]
        exit_text = "-" if row["exit"] is None else str(row["exit"])
        lines.append(f"{row['method']:<11} {exit_text:>4} {row['cost']:>5.2f} | "
                     + " ".join(t.rjust(w) for t, w in zip(text, widths)))
    docs = ", ".join(f"{_SHORT.get(c, c)} {report['documents'][c]}" for c in columns)
    stderr = ", ".join(f"{_SHORT.get(c, c)} {100 * report['stderr'][c]:.1f}" for c in columns)
    lines.append("")
    norm = [_SHORT.get(c, c) for c in columns if report["metric"][c] != "acc"]
    lines.append("accuracy in % (acc" + (f"; acc_norm for {', '.join(norm)}" if norm else "")
                 + f"); avg over {', '.join(_SHORT.get(c, c) for c in core)}; "
                 f"kept = avg / full avg; >chance = (avg - chance) / (full avg - chance), chance avg "
                 f"{100 * sum(report['chance'][c] for c in core) / len(core):.1f}")
    sampled = report.get("sampled") or {}
    if sampled:
        which = "every task" if len(sampled) == len(columns) else ", ".join(_SHORT.get(c, c) for c in sampled)
        sample = f"{which}: a seeded random sample" + (" (MMLU: spread evenly over its 57 subjects)"
                                                         if MMLU in sampled else "")
        sample += "" if len(sampled) == len(columns) else "; the rest: all documents"
    else:
        sample = "all documents"
    lines.append(f"documents ({sample}): {docs}")
    lines.append(f"standard error of the full model's accuracy, points: {stderr}; of its average: "
                 f"{100 * report['average_stderr']:.1f}")
    lines.append(f"cost: per-token cost relative to the full model ({report['cost_source']}"
                 + (", batch-1 decode profile from `balcony bench`" if report["cost_source"] == "measured" else "") + ")")
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> None:
    """Average accuracy against cost per exit: the three methods and the full model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"balcony": ("tab:blue", "o"), "early_exit": ("tab:red", "s"), "truncation": ("tab:orange", "^")}
    for method, (color, marker) in styles.items():
        rows = sorted((r for r in report["rows"] if r["method"] == method), key=lambda r: r["cost"])
        ax.plot([r["cost"] for r in rows], [100 * r["average"] for r in rows], marker=marker, color=color,
                label=method.replace("_", " "))
        for r in rows:
            ax.annotate(str(r["exit"]), (r["cost"], 100 * r["average"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=8, color=color)
    full = next(r for r in report["rows"] if r["method"] == FULL)
    ax.plot([full["cost"]], [100 * full["average"]], marker="*", markersize=14, color="black", linestyle="none",
            label="full model")
    chance = 100 * sum(report["chance"][c] for c in report["average_of"]) / len(report["average_of"])
    ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.set_xlabel(f"per-token cost relative to the full model ({report['cost_source']})")
    ax.set_ylabel("average accuracy, %")
    count = sum(report["documents"][c] for c in report["average_of"])
    tasks = ", ".join(_SHORT.get(c, c) for c in report["average_of"])
    ax.set_title(f"Downstream accuracy per exit: average of {tasks}\n({count} documents)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

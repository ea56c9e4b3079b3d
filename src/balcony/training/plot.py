"""The learning curve: validation agreement and KL per exit against training tokens."""

from __future__ import annotations

import json
from pathlib import Path

CURVE_NAME = "learning_curve.png"


def plot_learning_curve(metrics: str | Path, path: str | Path) -> None:
    """Validation top-1 agreement and KL per exit against training tokens, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    val = [r for r in records if r.get("split") == "val"]
    exits = sorted({int(k.split("/")[1]) for r in val for k in r if k.startswith("agreement/")})
    if not exits:
        return
    fig, (agree, kl) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for e in exits:
        points = [(r.get("tokens_seen", 0) / 1e6, r[f"agreement/{e}"], r[f"kl/{e}"]) for r in val if f"agreement/{e}" in r]
        tokens = [p[0] for p in points]
        agree.plot(tokens, [p[1] for p in points], "o-", label=f"exit {e}")
        kl.plot(tokens, [p[2] for p in points], "o-", label=f"exit {e}")
    agree.set_ylabel("top-1 agreement with the full model")
    kl.set_ylabel("KL(full || exit), nats/token")
    kl.set_yscale("log")
    for ax in (agree, kl):
        ax.set_xlabel("training tokens (millions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("balcony: held-out validation during training")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

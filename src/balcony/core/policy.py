"""How deep to run: one typed request, resolved in one place against one cost table.

A `DepthRequest` names an exit, a budget (a fraction of the full model's per-token cost), a
latency target (milliseconds per output token, from the speed profile `balcony bench`
measured), or nothing: the full model. The CLI, the Python API, the server, the lm-eval model
type and the serving engine all build one and call `DepthPolicy.resolve`, so the same input is
accepted or refused the same way everywhere. `CostTable` is the one cost model: budgets, the
bench's ideal speedup, the truncation baseline's cost and speculative decoding's draft policy
all read it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ExitError

FULL = "full"  # the label of the full model wherever exits are named (tables, JSON, profiles)


def label(exit_layer: int | None) -> str:
    return FULL if exit_layer is None else str(exit_layer)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class DepthRequest:
    """At most one of: an exit (a layer number, "full" or None), a budget in (0, 1], a latency target > 0 ms."""

    exit: int | str | None = None
    budget: float | None = None
    max_ms_per_token: float | None = None

    def __post_init__(self):
        given = [n for n in ("exit", "budget", "max_ms_per_token") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ExitError(f"give one of exit_layer (--exit), budget or max_ms_per_token, not several (got {', '.join(given)})")
        if self.budget is not None and not (_is_number(self.budget) and 0 < self.budget <= 1):
            raise ExitError(f"budget must be a fraction of the full model's cost in (0, 1], not {self.budget!r}")
        if self.max_ms_per_token is not None and not (_is_number(self.max_ms_per_token) and self.max_ms_per_token > 0):
            raise ExitError(f"max_ms_per_token must be a positive number of milliseconds, not {self.max_ms_per_token!r}")


@dataclass(frozen=True)
class CostTable:
    """Matmul FLOPs per token (2 x weights touched) of each exit: its layers plus the head.

    Attention over the context adds a length-dependent term left out here; at the short and
    medium contexts this is used for, the weights dominate.
    """

    num_layers: int
    layer_flops: int  # one decoder layer
    head_flops: int
    depths: dict  # exit -> decoder layers it runs (e + its balcony's layers); None -> num_layers

    @classmethod
    def of(cls, layer, head, depths: dict) -> CostTable:
        """The table for decoder layers like `layer` (a module) and a linear `head`."""
        return cls(num_layers=depths[None], layer_flops=2 * sum(p.numel() for p in layer.parameters()),
                   head_flops=2 * head.weight.numel(), depths=depths)

    def flops_at_depth(self, depth: int) -> int:
        return depth * self.layer_flops + self.head_flops

    def flops(self, exit_layer: int | None) -> int:
        return self.flops_at_depth(self.depths[exit_layer])

    def relative(self, exit_layer: int | None) -> float:
        """Per-token cost of `exit_layer` as a fraction of the full model's."""
        return self.flops(exit_layer) / self.flops(None)

    def share(self, layers: int, head: float = 1.0) -> float:
        """Cost of `layers` decoder layers and `head` of the head (a fraction of its rows), per full token."""
        return (layers * self.layer_flops + head * self.head_flops) / self.flops(None)


class DepthPolicy:
    """Checks exits and turns a `DepthRequest` into the exit to run (None: the full model)."""

    def __init__(self, exits: list[int], num_layers: int, costs: CostTable, profile: dict | None = None):
        self.exits, self.num_layers, self.costs = list(exits), num_layers, costs
        self.profile = profile  # measured speed per exit (`balcony bench`), for max_ms_per_token

    def check_exit(self, exit_layer: int | str | None) -> int | None:
        """Normalise an exit: None for the full model, else an exit that has a balcony."""
        if exit_layer is None or exit_layer == FULL:
            return None
        if isinstance(exit_layer, str):
            if not exit_layer.strip().lstrip("-").isdigit():
                raise ExitError(f"exit {exit_layer!r} is not a layer number: use an integer in {self._help()}")
            exit_layer = int(exit_layer)
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, int):
            raise ExitError(f"exit {exit_layer!r} is not a layer number: use an integer in {self._help()}")
        if exit_layer == self.num_layers:
            return None
        if not 1 <= exit_layer < self.num_layers:
            raise ExitError(f"exit {exit_layer} is out of range: {self._help()}")
        if exit_layer not in self.exits:
            raise ExitError(f"exit {exit_layer} has no balcony: {self._help()}. "
                            f"Train balconies that include exit {exit_layer} to use it.")
        return exit_layer

    def _help(self) -> str:
        return (f"balconies are at exits {self.exits}; use {self.num_layers}, None or 'full' for the full "
                f"{self.num_layers}-layer model")

    def resolve(self, request: DepthRequest) -> int | None:
        if request.budget is not None:
            return self.deepest_within(self.costs.relative, request.budget)
        if request.max_ms_per_token is not None:
            measured = self._measured_ms()
            return self.deepest_within(lambda e: measured[label(e)], request.max_ms_per_token)
        return self.check_exit(request.exit)

    def deepest_within(self, cost: Callable[[int | None], float], limit: float, floor: int | None = None) -> int | None:
        """The deepest exit whose cost is within `limit` (None, the full model, when it fits
        itself); when none does, the shallowest allowed, as the cheapest there is. `floor` is the
        shallowest exit allowed (an operator's quality floor): it wins over the limit."""
        allowed = [None, *reversed([e for e in self.exits if floor is None or e >= floor])]
        for exit_layer in allowed:
            if cost(exit_layer) <= limit * (1 + 1e-9):
                return exit_layer
        return allowed[-1]

    def quality_floor(self, report: dict, min_agreement: float) -> int | None:
        """The shallowest exit whose balcony reaches `min_agreement` (top-1 agreement with the full
        model) in an eval report (`balcony eval --json`); None, the full model, if none does."""
        rows = {row.get("exit"): row for row in report.get("exits", []) if isinstance(row, dict)}
        if not rows:
            raise ExitError("the quality report has no per-exit figures: give the JSON `balcony eval --data ... --json` wrote")
        reached = [e for e in self.exits if e in rows and rows[e]["balcony"]["agreement"] >= min_agreement]
        return reached[0] if reached else None

    def _measured_ms(self) -> dict[str, float]:
        if not self.profile:
            raise ExitError("max_ms_per_token needs a measured speed profile: run `balcony bench ARTIFACT` once "
                            "(it stores bench_profile.json beside the artifact), or give a budget instead")
        measured = self.profile.get("ms_per_token", {})
        missing = [label(e) for e in [*self.exits, None] if measured.get(label(e)) is None]
        if missing:
            raise ExitError(f"the speed profile has no figure for exits {missing}: run `balcony bench` again")
        return measured

"""lm-evaluation-harness at any exit, without forking it.

Importing this module registers the model type `balcony` with lm-eval:

    python -m balcony.evaluation.harness --model balcony --model_args artifact=DIR,exit_layer=15 --tasks arc_easy

is lm-eval's own command line with that type registered (the plain `lm_eval` script does not
import third-party model types). `model_args` takes `artifact` (or `model` for fresh
balconies on a base), `exit_layer` (a number or `full`) or `budget`, and any `HFLM` option
(batch_size, max_length, ...). `balcony eval ARTIFACT --tasks ...` sweeps every exit and both
baselines in one pass instead (`balcony.evaluation.downstream`).

The sub-model is lm-eval's ordinary Hugging Face backend (`HFLM`) run on the exit model (an
object of the base's own class), so loglikelihood, rolling perplexity and generation tasks all work.
"""

from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..core.errors import ExitError
from ..core.model import BalconyModel


@register_model("balcony")
class BalconyLM(HFLM):
    def __init__(
        self,
        artifact: str | None = None,
        exit_layer: int | str | None = None,
        budget: float | str | None = None,
        model: str | None = None,
        verify_base: bool = True,
        balcony_model: BalconyModel | None = None,
        **kwargs,
    ):
        if balcony_model is None:
            if artifact:
                balcony_model = BalconyModel.from_pretrained(artifact, base=model, verify_base=verify_base)
            else:
                balcony_model = BalconyModel.from_base(model)
        self.balcony = balcony_model
        # model_args arrive as text: "15", "full", "0.7"
        self.exit_layer = balcony_model.resolve_depth(exit_layer, None if budget is None else _number(budget, "budget"))
        # lm-eval sees an ordinary causal LM whose layer list ends in the balcony: the exit model,
        # which shares the base's weights and leaves the BalconyModel free for anything else
        kwargs.setdefault("backend", "causal")
        super().__init__(pretrained=balcony_model.exit_model(self.exit_layer), tokenizer=balcony_model.tokenizer, **kwargs)

    def close(self) -> None:
        """Nothing to release: the exit model never changed the base (kept for older callers)."""


def _number(text: float | str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ExitError(f"{name} must be a number, not {text!r}") from None


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()

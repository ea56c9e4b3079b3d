"""lm-evaluation-harness at any exit, without forking it.

Importing this module registers the model type `balcony` with lm-eval:

    python -m balcony.harness --model balcony --model_args artifact=DIR,exit_layer=15 --tasks arc_easy

is lm-eval's own command line with that type registered (the plain `lm_eval` script does not
import third-party model types). `model_args` takes `artifact` (or `model` for fresh
balconies on a base), `exit_layer` (a number or `full`) or `budget`, and any `HFLM` option
(batch_size, max_length, ...). `balcony eval ARTIFACT --tasks ...` sweeps every exit and both
baselines in one pass instead (`balcony.downstream`).

The sub-model is lm-eval's ordinary Hugging Face backend (`HFLM`) run on the base while it
is held in the exit view, so loglikelihood, rolling perplexity and generation tasks all work.
"""

from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .model import BalconyModel


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
        if budget is not None:
            exit_layer = balcony_model.choose_exit(budget=float(budget))
        self.balcony = balcony_model
        self.exit_layer = balcony_model.check_exit(exit_layer)
        # Hold the exit view for this evaluator's lifetime: lm-eval then sees an ordinary causal
        # LM whose layer list ends in the balcony. The BalconyModel is dedicated to it meanwhile.
        self._view = balcony_model.exit_view(self.exit_layer)
        sub_model = self._view.__enter__()
        kwargs.setdefault("backend", "causal")
        super().__init__(pretrained=sub_model, tokenizer=balcony_model.tokenizer, **kwargs)

    def close(self) -> None:
        """Give the base back its own layers (the view is also released when this object is collected)."""
        if self._view is not None:
            self._view.__exit__(None, None, None)
            self._view = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()

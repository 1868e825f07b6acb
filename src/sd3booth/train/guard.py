"""Steps that went wrong numerically: skipped (fp16 overflow) or non-finite, said once, then a stop.

With fp16 mixed precision the grad scaler skips a step whose gradients overflowed and lowers its scale; that
is normal now and then, alarming when it repeats: after ``max_bad_steps`` skips in a row the run stops with one
line. Without a scaler (bf16, fp32) a non-finite loss has already reached the weights, so the run stops at
once, before anything non-finite is saved: the last checkpoint stays the last good state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from sd3booth.errors import UserError

ADVICE = "lower --learning_rate or --max_grad_norm, or use --mixed_precision bf16 where the GPU has it"


class StepGuard:
    def __init__(self, max_bad_steps: int, say: Callable[[str], None]) -> None:
        self.max_bad_steps = max_bad_steps
        self.say = say
        self.in_a_row = 0
        self.skipped_total = 0
        self._said = False

    def after_step(self, step: int, skipped: bool, scale: float | None = None) -> None:
        """After each optimizer step of an fp16 run: whether the scaler skipped it, and its new scale."""
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.skipped_total += 1
        if not self._said:
            self._said = True
            lowered = f"; loss scale lowered to {scale:g}" if scale else ""
            self.say(f"step {step}: gradients overflowed fp16, step skipped{lowered} (said once)")
        if self.in_a_row >= self.max_bad_steps:
            raise UserError(
                f"{self.in_a_row} steps in a row skipped for fp16 overflow, up to step {step}; the last checkpoint "
                f"is intact: {ADVICE}"
            )

    def check_loss(self, step: int, loss: float, scaled: bool) -> None:
        """Each time the loss is read. With a scaler a non-finite loss is a skipped step (counted above)."""
        if not math.isfinite(loss) and not scaled:
            raise UserError(
                f"the loss became {loss} by step {step}, so the LoRA weights are no longer finite; nothing was "
                f"saved after the last checkpoint: {ADVICE}"
            )


def out_of_memory_message(stage: str | None, place: Any, explicit: bool) -> str:
    """One line for an out-of-memory error: the stage, the budget, the planner's prediction, what to try."""
    stage = stage or "setup"
    keys = {"text encoder CLIP-L": "CLIP-L", "text encoder CLIP-G": "CLIP-G", "text encoder T5": "T5",
            "load transformer": "training", "validation": "validation"}  # fmt: skip
    key = next((v for k, v in keys.items() if stage.startswith(k)), stage)
    predicted = place.memory.predicted.get(key)
    guess = f"; the planner predicted {predicted:.2f} GiB allocated for it" if predicted is not None else ""
    budget = place.budget_gib
    lower = max(1.0, round(budget - max(1.0, 0.15 * budget), 1))
    flag = "--max_vram" if explicit else "the default budget"
    return (
        f"out of GPU memory in stage '{stage}' with {flag} {budget:.1f} GiB{guess}; nothing saved was lost: "
        f"try --max_vram {lower:g} (a more frugal plan), and close other programs using the GPU"
    )

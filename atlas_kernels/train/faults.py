"""What the training run does when numbers go wrong: the per-step finiteness check, the
GradScaler skip report, and the checks that refuse non-finite inputs before the first step.

The per-step check costs one host synchronisation, which the loop needs anyway to log the loss:
the loss, the gradient norm and the number of non-finite coefficients are stacked into one small
tensor and read back with a single ``tolist()``. (A count, not a norm: the norm of large but finite
coefficients overflows float32.)
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .._checks import all_finite, require_finite

__all__ = ["DivergedError", "SKIP_WARN_FRACTION", "step_values", "diverged_message",
           "check_finite_tensors", "skip_report"]

# A fp16 run whose GradScaler skipped more than this fraction of its optimizer steps (inf/NaN
# gradients at the current loss scale) is reported: its coefficients barely trained.
SKIP_WARN_FRACTION = 0.25


class DivergedError(RuntimeError):
    """The run produced a non-finite loss, gradient norm or coefficient; nothing was written
    after the last finite checkpoint."""


def step_values(loss: torch.Tensor, gnorm: torch.Tensor, params: Sequence[torch.Tensor]) -> Tuple[float, float, int]:
    """``(loss, grad norm, number of non-finite coefficients)``, read back in one synchronisation
    (the coefficients are small: one concatenation and one comparison)."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    vals = torch.stack([loss.detach().float().reshape(()), gnorm.detach().float().reshape(()),
                        (~torch.isfinite(flat)).sum().float()])
    out = vals.tolist()
    return out[0], out[1], int(out[2])


def diverged_message(*, step: int, epoch: int, quantity: str, value: float, lr: float, precision: str,
                     resumed_at: Optional[int], checkpoint: Optional[str]) -> str:
    """One paragraph naming the step, the quantity, the likely cause and what was kept."""
    first = step == (resumed_at or 0) + 1
    if first and resumed_at:
        cause = ("the resumed checkpoint or the inputs (a NaN/inf in the weights, task vectors or images), "
                 "since the very first step after resuming failed")
    elif first:
        cause = ("the inputs (a NaN/inf in --weights, the task vectors or the images)"
                 + (", or fp16 overflowing in the forward pass (try --precision bf16 or fp32)"
                    if precision == "fp16" else "")
                 + ", since the very first step failed")
    else:
        cause = (f"the learning rate (--lr {lr:g} is likely too high: lower it, or keep --clip-grad > 0)"
                 + ("; or fp16 overflow (try --precision bf16 or fp32)" if precision == "fp16" else ""))
    kept = (f"the last finite checkpoint {checkpoint} is kept as it was" if checkpoint
            else "no checkpoint had been written yet")
    return (f"training diverged at optimizer step {step} (epoch {epoch}): the {quantity} is {value}; "
            f"likely cause: {cause}. Stopped; {kept}, and no non-finite coefficient was written.")


def check_finite_tensors(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise ValueError naming the first tensor of ``tensors`` that holds NaN or inf."""
    for k, v in tensors.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel():
            require_finite(v, f"{what}: tensor {k!r}", then="; training from it cannot give finite coefficients")


def skip_report(skipped: int, steps: int) -> Optional[Dict[str, object]]:
    """``None`` or the record (and the warning text) for a run whose GradScaler skipped more than
    :data:`SKIP_WARN_FRACTION` of its steps."""
    if steps <= 0 or skipped <= SKIP_WARN_FRACTION * steps:
        return None
    frac = skipped / steps
    msg = (f"warning: the fp16 GradScaler skipped {skipped} of {steps} optimizer steps ({frac:.0%}, more than "
           f"{SKIP_WARN_FRACTION:.0%}) because the gradients overflowed at the current loss scale; the "
           f"coefficients trained on few or no steps. Use --precision bf16 or fp32, or a lower --lr.")
    return {"skipped_steps": skipped, "steps": steps, "fraction": frac, "warning": msg}


def nonfinite_blocks(coefs: Mapping[str, torch.Tensor]) -> List[str]:
    return [k for k, v in coefs.items() if not all_finite(v)]

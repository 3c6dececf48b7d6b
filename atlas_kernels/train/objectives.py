"""Training objectives over the coefficients.

An objective sees, at every step, one batch per training dataset ("task") and returns one loss
vector per task with a weight: the step's objective is ``sum_t w_t * mean(loss_t)`` over the
*global* batch. Returning per-sample losses (not means) lets the loop divide by the global batch
size, so the objective is exactly the same whether the batch is split over processes or not.

After every evaluation, :meth:`Objective.score` says whether the coefficients are admissible and
how good they are (larger is better); the loop keeps the best admissible coefficients.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .config import OBJECTIVES, TTA_LOSSES  # noqa: F401  (defined with the config: no torch needed for --help)

Forward = Callable[[torch.Tensor, int], torch.Tensor]  # (images, task index) -> logits (float32)
Metrics = Dict[str, Dict[str, float]]  # task name -> {"acc": ..., "loss": ..., "n": ...}


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of softmax(logits)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class Objective:
    name = ""
    #: whether evaluation uses labels for the training sets' selection ("best") by default
    default_select = "best"

    def views(self, task: int) -> Tuple[str, ...]:
        """The transforms of a training sample (see :func:`~atlas_kernels.train.data.train_transform`)."""
        return ("eval",)

    def losses(self, forward: Forward, batches: Sequence[tuple]) -> List[Tuple[float, torch.Tensor]]:
        raise NotImplementedError

    def score(self, metrics: Metrics, zero_shot: Metrics) -> Tuple[bool, float]:
        raise NotImplementedError

    def eval_terms(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, task: int) -> torch.Tensor:
        """``[correct, loss sum, count]`` (float64) of one validation batch: accuracy and mean
        cross-entropy are their ratios. Default: classification (one label per sample)."""
        logits = forward(x, task)
        return torch.stack([(logits.argmax(-1) == y).sum().double(),
                            F.cross_entropy(logits, y, reduction="sum").double(),
                            torch.tensor(float(y.numel()), dtype=torch.float64, device=logits.device)])


def next_token_losses(logits: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor,
                      reduction: str = "mean") -> torch.Tensor:
    """Per-example next-token cross-entropy of a causal LM: position ``t`` predicts ``ids[t + 1]``
    for ``t + 1 < length``. ``reduction="mean"``: each example's mean over its predicted tokens;
    ``"none"``: the per-position losses ``[B, L - 1]`` with masked positions 0. Also returns nothing
    else: see :meth:`LanguageModel.eval_terms` for the token counts."""
    pred = logits[:, :-1].float()
    target = ids[:, 1:]
    mask = torch.arange(target.shape[1], device=ids.device)[None, :] < (lengths.to(ids.device)[:, None] - 1)
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none").reshape(target.shape)
    ce = ce * mask
    if reduction == "none":
        return ce
    return ce.sum(1) / mask.sum(1).clamp_min(1)


class LanguageModel(Objective):
    """Next-token cross-entropy of a causal LM on one text file (one example per line): each
    example's loss is its mean over its predicted tokens, and the step's loss is the mean over the
    global batch (so every example counts the same, whatever its length). Evaluation reports the
    token-level accuracy and mean cross-entropy (and its exponential, the perplexity); the best
    epoch is the one with the lowest validation loss."""

    name = "lm"

    def losses(self, forward, batches):
        ids, lengths = batches[0]
        return [(1.0, next_token_losses(forward(ids, 0), ids, lengths))]

    def score(self, metrics, zero_shot):
        return True, -sum(m["loss"] for m in metrics.values()) / max(1, len(metrics))

    def eval_terms(self, forward, x, y, task):
        logits = forward(x, task)
        ce = next_token_losses(logits, x, y, reduction="none")
        mask = torch.arange(x.shape[1] - 1, device=x.device)[None, :] < (y.to(x.device)[:, None] - 1)
        correct = ((logits[:, :-1].argmax(-1) == x[:, 1:]) & mask).sum()
        return torch.stack([correct.double(), ce.sum().double(), mask.sum().double()])


class FewShot(Objective):
    """Cross-entropy against the zero-shot head, on (k-shot) labelled images."""

    name = "fewshot"

    def __init__(self, augment: bool = False):
        self.augment = augment

    def views(self, task):
        return ("augment",) if self.augment else ("eval",)

    def losses(self, forward, batches):
        images, labels = batches[0]
        return [(1.0, F.cross_entropy(forward(images, 0), labels, reduction="none"))]

    def score(self, metrics, zero_shot):
        return True, _mean_acc(metrics)


class TTA(Objective):
    """Unsupervised test-time adaptation on unlabelled images.

    - ``pseudo``: the prediction on a weak view, where its confidence reaches ``threshold``, is the
      label for a strong view (FixMatch without labelled data); samples below it contribute 0;
    - ``entropy``: mean prediction entropy of the weak view.
    """

    name = "tta"
    default_select = "last"  # unsupervised: by default no labels pick the result

    def __init__(self, loss: str = "pseudo", threshold: float = 0.95):
        if loss not in TTA_LOSSES:
            raise ValueError(f"unknown tta loss {loss!r}; choose one of {TTA_LOSSES}")
        self.loss, self.threshold = loss, float(threshold)

    def views(self, task):
        return ("weak", "strong") if self.loss == "pseudo" else ("weak",)

    def losses(self, forward, batches):
        if self.loss == "entropy":
            weak, _ = batches[0]
            return [(1.0, entropy(forward(weak, 0)))]
        weak, strong, _ = batches[0]
        with torch.no_grad():
            probs = forward(weak, 0).float().softmax(-1)
        conf, pseudo = probs.max(-1)
        mask = (conf >= self.threshold).float()
        ce = F.cross_entropy(forward(strong, 0), pseudo, reduction="none")
        return [(1.0, ce * mask)]

    def score(self, metrics, zero_shot):
        return True, _mean_acc(metrics)


class Negation(Objective):
    """Forget the target task, keep the control task: gradient ascent on the target's
    cross-entropy, descent on the control's (task 0 is the target, task 1 the control).
    Admissible coefficients keep control accuracy at least ``threshold`` times its zero-shot
    accuracy; among them the lowest target accuracy wins (the zero-shot point is admissible)."""

    name = "negation"

    def __init__(self, threshold: float = 0.95, control_weight: float = 1.0):
        self.threshold, self.control_weight = float(threshold), float(control_weight)

    def losses(self, forward, batches):
        (xt, yt), (xc, yc) = batches
        return [(-1.0, F.cross_entropy(forward(xt, 0), yt, reduction="none")),
                (self.control_weight, F.cross_entropy(forward(xc, 1), yc, reduction="none"))]

    def score(self, metrics, zero_shot):
        names = list(metrics)
        target, control = names[0], names[1]
        ok = metrics[control]["acc"] >= self.threshold * zero_shot[control]["acc"] - 1e-12
        return ok, -metrics[target]["acc"]


class Addition(Objective):
    """One set of coefficients for several datasets: the mean of their cross-entropies, each
    against its own zero-shot head; the best mean accuracy wins."""

    name = "addition"

    def __init__(self, n_tasks: int):
        self.n_tasks = n_tasks

    def losses(self, forward, batches):
        w = 1.0 / len(batches)
        return [(w, F.cross_entropy(forward(x, t), y, reduction="none"))
                for t, (x, y) in enumerate(batches)]

    def score(self, metrics, zero_shot):
        return True, _mean_acc(metrics)


def _mean_acc(metrics: Metrics) -> float:
    return sum(m["acc"] for m in metrics.values()) / max(1, len(metrics))


def make_objective(name: str, *, n_tasks: int = 1, augment: bool = False, tta_loss: str = "pseudo",
                   confidence: float = 0.95, control_threshold: float = 0.95,
                   control_weight: float = 1.0) -> Objective:
    if name == "fewshot":
        return FewShot(augment=augment)
    if name == "tta":
        return TTA(tta_loss, confidence)
    if name == "negation":
        return Negation(control_threshold, control_weight)
    if name == "addition":
        return Addition(n_tasks)
    if name == "lm":
        return LanguageModel()
    raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")

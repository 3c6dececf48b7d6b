"""A training step captured once in a CUDA graph and replayed: :class:`GraphedStep`.

A training step's eager run on a GPU spends part of its time in Python between the kernels (the
numbers: docs/PERFORMANCE.md, "Launches and host cost"). Once a step's shapes are static, capturing it
takes the host out of the way:

    opt = torch.optim.AdamW(ak.coefficients(model).values(), lr=torch.tensor(1e-3, device="cuda"),
                            capturable=True)       # the optimizer must be capturable (a tensor lr: schedulers fill it)

    def step(images, labels):                      # forward, backward and optimizer step, no CPU sync
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        return loss.detach()

    graphed = ak.GraphedStep(step, example_images, example_labels)   # warms up, then captures
    for images, labels in loader:
        loss = graphed(images, labels)             # copies the batch into the graph's inputs, replays

What a captured step must not do: synchronise with the CPU (``.item()``, a GradScaler's inf
check: fp16 training takes the eager step), change shapes, or create tensors whose values the next
step reads from Python. The inputs are copied into static buffers on every call; a batch of
another shape or dtype is refused with a message saying so (run it eagerly: ``graphed.eager(...)``).
The returned tensors are the graph's own outputs, overwritten by the next replay (clone to keep).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["GraphedStep", "graphs_supported"]


def graphs_supported(device) -> Optional[str]:
    """Why a step on ``device`` cannot be captured here, or None."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device; this step runs on {device.type}"
    if not torch.cuda.is_available():
        return "CUDA graphs need a CUDA device; torch.cuda.is_available() is False"
    return None


class GraphedStep:
    """``step_fn(*inputs)`` captured once in a CUDA graph (after ``warmup`` eager calls on a side
    stream, as PyTorch's whole-network capture recipe does) and replayed by each call.

    ``example_inputs``: tensors of the shapes, dtypes and device every later call will pass (their
    values are the warm-up batch). ``graph``: for tests, a stand-in with ``capture_begin``/
    ``capture_end``-free ``replay()`` semantics (see :meth:`_capture`); by default a
    ``torch.cuda.CUDAGraph``.
    """

    def __init__(self, step_fn: Callable, *example_inputs: torch.Tensor, warmup: int = 3, graph=None):
        if not example_inputs or not all(isinstance(t, torch.Tensor) for t in example_inputs):
            raise TypeError("GraphedStep(step_fn, *example_inputs): the example inputs must be tensors")
        if graph is None:
            why = graphs_supported(example_inputs[0].device)
            if why is not None:
                raise RuntimeError(f"GraphedStep: {why}; run the step eagerly")
        self.step_fn = step_fn
        self.static_inputs = [t.detach().clone() for t in example_inputs]
        self.warmup = int(warmup)
        self.graph = graph
        self.outputs = None
        self.replays = 0
        self._capture()

    def _capture(self) -> None:
        fn, inputs = self.step_fn, self.static_inputs
        if self.graph is not None:  # a stand-in (tests): the logic without CUDA
            for _ in range(self.warmup):
                fn(*inputs)
            self.outputs = self.graph.capture(lambda: fn(*inputs))
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*inputs)

    def matches(self, *inputs: torch.Tensor) -> Optional[str]:
        """Why ``inputs`` cannot be replayed (another count, shape, dtype or device), or None."""
        if len(inputs) != len(self.static_inputs):
            return f"the step was captured with {len(self.static_inputs)} inputs, got {len(inputs)}"
        for i, (t, s) in enumerate(zip(inputs, self.static_inputs)):
            if not isinstance(t, torch.Tensor):
                return f"input {i} is a {type(t).__name__}, not a tensor"
            if t.shape != s.shape or t.dtype != s.dtype or t.device != s.device:
                return (f"input {i} is {tuple(t.shape)} {t.dtype} on {t.device}; the step was captured with "
                        f"{tuple(s.shape)} {s.dtype} on {s.device}")
        return None

    def __call__(self, *inputs: torch.Tensor):
        why = self.matches(*inputs)
        if why is not None:
            raise ValueError(f"GraphedStep: {why} (a captured step replays one shape; run this batch with "
                             f".eager(...), or capture another GraphedStep for it)")
        for s, t in zip(self.static_inputs, inputs):
            s.copy_(t, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self.outputs

    def eager(self, *inputs: torch.Tensor):
        """The same step run eagerly (a batch of another shape)."""
        return self.step_fn(*inputs)

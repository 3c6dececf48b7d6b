"""The CUDA-graph helper's logic (atlas_kernels.graphs.GraphedStep and the train CLI's --cuda-graph)
without a GPU: a stand-in graph replays the captured function, so what is copied in, what is
refused and what the training run decides are tested here; the real capture and replay are tested
on a GPU in test_cuda_graph.py (skipped without one, with the reason)."""
import pytest
import torch

import atlas_kernels as ak
from atlas_kernels.graphs import GraphedStep, graphs_supported


class _FakeGraph:
    """Capture = remember the closure; replay = run it (what a CUDA graph does, without CUDA)."""

    def capture(self, fn):
        self.fn = fn
        return fn()

    def replay(self):
        self.fn()


def test_graphed_step_copies_each_batch_into_its_static_inputs_and_refuses_other_shapes():
    seen = []

    def step(x, y):
        seen.append((x.clone(), y.clone()))
        return x.sum() + y.sum()

    x0, y0 = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    gs = GraphedStep(step, x0, y0, warmup=2, graph=_FakeGraph())
    assert len(seen) == 3  # two warm-up calls, one capture
    x1, y1 = torch.ones(2, 3), torch.full((2,), 4)
    gs(x1, y1)
    assert torch.equal(seen[-1][0], x1) and torch.equal(seen[-1][1], y1)
    assert gs.static_inputs[0] is not x1  # copied into the graph's own buffers
    with pytest.raises(ValueError, match=r"input 0 is \(3, 3\).*captured with \(2, 3\).*\.eager"):
        gs(torch.ones(3, 3), y1)
    with pytest.raises(ValueError, match="captured with 2 inputs, got 1"):
        gs(x1)
    assert float(gs.eager(torch.ones(3, 3), y1)) == 9 + 8  # another shape runs eagerly


def test_graphed_step_needs_a_cuda_device_and_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU (test_cuda_graph.py covers the real capture)")
    assert "CUDA" in graphs_supported("cpu")
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device.*run the step eagerly"):
        GraphedStep(lambda x: x, torch.zeros(2))
    assert ak.GraphedStep is GraphedStep


def test_train_cuda_graph_choice():
    from types import SimpleNamespace

    from atlas_kernels.train.config import ConfigError, TrainConfig
    from atlas_kernels.train.loop import graph_choice

    def setup(dev, world=1):
        return SimpleNamespace(device=torch.device(dev), dist=SimpleNamespace(world=world))

    cfg = TrainConfig(task_vectors="t", out="o")
    assert cfg.cuda_graph == "auto"
    assert graph_choice(cfg, setup("cpu"), False) == (False, "it needs a CUDA device (this run is on cpu)")
    assert graph_choice(cfg, setup("cuda"), False) == (True, None)
    assert graph_choice(cfg, setup("cuda"), True)[1].startswith("fp16 training uses a GradScaler")
    assert graph_choice(cfg, setup("cuda", world=2), False)[0] is False
    on = TrainConfig(task_vectors="t", out="o", cuda_graph="on")
    with pytest.raises(ConfigError, match="--cuda-graph on: it needs a CUDA device"):
        graph_choice(on, setup("cpu"), False)
    off = TrainConfig(task_vectors="t", out="o", cuda_graph="off")
    assert graph_choice(off, setup("cuda"), False) == (False, "--cuda-graph off")

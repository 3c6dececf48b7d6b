"""A CUDA graph captures one whole patched training step (forward, backward, optimizer step on the
coefficients) and its replay gives the eager step's coefficients. GPU only: skips, with the reason,
without one (CUDA graphs do not exist on a CPU)."""
import copy

import pytest
import torch

import atlas_kernels as ak

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA-graph capture)")]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_graph_captures_one_patched_training_step(tiny_vit, backend):
    g = torch.Generator().manual_seed(0)
    tvs = ak.TaskVectors({k: torch.randn((3, *p.shape), generator=g) * 0.05
                          for k, p in tiny_vit.named_parameters()}).to("cuda")
    m = ak.patch(copy.deepcopy(tiny_vit), tvs, backend=backend)
    coefs = list(ak.coefficients(m).values())
    x = torch.randn(4, 3, 32, 32, generator=g).cuda()
    opt = torch.optim.SGD(coefs, lr=0.5)

    def step():
        opt.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(x).float().square().mean()
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, lazy allocations) outside the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    start = [c.detach().clone() for c in coefs]
    graph.replay()
    torch.cuda.synchronize()
    replayed = [c.detach().clone() for c in coefs]
    with torch.no_grad():
        for c, s in zip(coefs, start):
            c.copy_(s)
    step()
    torch.cuda.synchronize()
    moved = sum((r - s).abs().sum().item() for r, s in zip(replayed, start))
    assert moved > 0, "the replayed step did not change the coefficients"
    for c, r in zip(coefs, replayed):
        torch.testing.assert_close(r, c.detach(), rtol=1e-4, atol=1e-6)


def test_graphed_step_replays_an_adamw_step_on_new_batches(tiny_vit):
    """ak.GraphedStep: capturable AdamW with a tensor learning rate, a new batch copied in per call;
    the replayed coefficients equal an eager twin's, step by step (fp32 without TF32: cuBLAS may
    pick other algorithms inside a capture, which in bf16 moved the loss by 1.5e-4 on the H200)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # the patch convolution: TF32 moved the loss by 1.5e-3
    g = torch.Generator().manual_seed(0)
    tvs = ak.TaskVectors({k: torch.randn((3, *p.shape), generator=g) * 0.05
                          for k, p in tiny_vit.named_parameters()}).to("cuda")
    models = [ak.patch(copy.deepcopy(tiny_vit), tvs) for _ in range(2)]
    opts = [torch.optim.AdamW(list(ak.coefficients(m).values()), lr=torch.tensor(1e-2, device="cuda"),
                              capturable=True) for m in models]

    def step_of(m, opt):
        def step(x):
            opt.zero_grad(set_to_none=False)
            loss = m(x).float().square().mean()
            loss.backward()
            opt.step()
            return loss.detach()
        return step

    xs = [torch.randn(4, 3, 32, 32, generator=g).cuda() for _ in range(4)]
    graphed = ak.GraphedStep(step_of(models[0], opts[0]), xs[0], warmup=0)
    eager = step_of(models[1], opts[1])
    start = [c.detach().clone() for c in ak.coefficients(models[0]).values()]
    for x in xs:
        a, b = graphed(x).clone(), eager(x)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    moved = sum(float((c - s).abs().sum()) for c, s in zip(ak.coefficients(models[0]).values(), start))
    assert moved > 0 and graphed.replays == len(xs)
    for ca, cb in zip(ak.coefficients(models[0]).values(), ak.coefficients(models[1]).values()):
        torch.testing.assert_close(ca, cb, rtol=1e-3, atol=1e-6)

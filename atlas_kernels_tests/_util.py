"""Shared test helpers."""
import warnings

import torch

# The Triton backend needs CUDA tensors on a GPU machine; without one, conftest runs the interpreter.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_tiny_vit(device=DEV):
    """A 2-layer, width-64 open_clip image tower on 32 x 32 images (random weights), in eval mode."""
    import open_clip

    vision = {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}
    text = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)
    return model.visual.eval().to(device)


# fp32 accumulation: relative to the sum of |terms| (about 16 ulps)
ACC_RTOL = 1e-6


def assert_close(out, ref, ref_low=None, ref_abs=None, rtol=ACC_RTOL, name=None, *, atol=0.0, what=None):
    """Elementwise ``|out - ref| <= atol + 2 * |ref_low - ref| + rtol * ref_abs``, in float64 on the CPU.

    ``ref`` is the float64 reference. ``ref_low`` (optional) is the same computation in the kernel's
    precisions (fp32 accumulation, rounding where the kernel rounds): twice its distance from ``ref``
    is allowed (flash-attention's rule, made elementwise). ``ref_abs`` (optional) is the reference
    computed on absolute values, the natural scale of rounding errors; without it ``|ref|``. With
    neither, this is ``|out - ref| <= atol + rtol * |ref|``. ``out`` must exist (a missing gradient
    is None), have ``ref``'s shape and hold no NaN (an unwritten or poisoned element) and no inf.
    ``name`` (or ``what``) labels the message, which names the worst element."""
    name = what if what is not None else (name if name is not None else "output")
    assert out is not None, f"{name}: no gradient"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o = out.detach().double().cpu()
    r = ref.detach().double().cpu()
    nan = torch.isnan(o)
    if nan.any():
        idx = tuple(int(v) for v in torch.nonzero(nan)[0])
        raise AssertionError(f"{name}: {int(nan.sum())} NaN of {o.numel()} (unwritten or poisoned); first at {idx}")
    assert torch.isfinite(o).all(), f"{name}: non-finite values at {torch.nonzero(~torch.isfinite(o))[:3].tolist()}"
    err = (o - r).abs()
    tol = torch.full_like(r, atol)
    if ref_low is not None:
        tol = tol + 2 * (ref_low.detach().double().cpu() - r).abs()
    tol = tol + rtol * (ref_abs.detach().double().cpu() if ref_abs is not None else r.abs())
    bad = err > tol
    if bad.any():
        flat = int(torch.argmax(err - tol))
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(flat), r.shape)) if r.dim() else ()
        lo = "" if ref_low is None else f" ref_low={ref_low.detach().double().cpu().reshape(-1)[flat].item():.8g}"
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {o.numel()} elements out of tolerance; worst at {idx}: "
            f"out={o.reshape(-1)[flat].item():.9g} ref={r.reshape(-1)[flat].item():.9g}{lo} "
            f"err={err.reshape(-1)[flat].item():.3g} tol={tol.reshape(-1)[flat].item():.3g}")


def rel_err(out, ref):
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------------------
# whole patched towers against float64: the set-up the whole-model tests share


def random_task_vectors(module, n, generator, std=0.05, device=DEV):
    """``n`` task vectors for every parameter of ``module``, ``N(0, std^2)`` drawn from ``generator``
    on the CPU (block by block, in parameter order), then moved to ``device``."""
    import atlas_kernels as ak

    return ak.TaskVectors({k: torch.randn((n, *p.shape), generator=generator) * std
                           for k, p in module.named_parameters()}).to(device)


def randomize_coefficients(model, generator, scale=None):
    """Every coefficient of a patched ``model`` set to ``N(0, 1)`` (times ``scale``) drawn from
    ``generator`` on the CPU (nonzero, so the composition is not theta0); returns them by block."""
    import atlas_kernels as ak

    coefs = ak.coefficients(model)
    with torch.no_grad():
        for c in coefs.values():
            v = torch.randn(c.shape, generator=generator)
            c.copy_(v if scale is None else v * scale)
    return coefs


def float64_reference(module, tvs, coefs, x, partitions, mode, seed):
    """The patched tower's output by the specification: ``module`` in float64 run (functional_call)
    on ``theta0 + reference.compose(...)`` per block with float64 copies of ``coefs`` (leaf tensors,
    so gradients can be compared). Returns ``(ref, c64)``."""
    import copy

    from torch.func import functional_call

    from atlas_kernels import reference
    from atlas_kernels.partitions import Partition

    m64 = copy.deepcopy(module).double()
    c64 = {k: c.detach().double().requires_grad_(True) for k, c in coefs.items()}
    params = {k: reference.compose(p.detach(), tvs[k], c64[k], Partition.for_block(k, partitions, mode, seed))
              for k, p in m64.named_parameters()}
    return functional_call(m64, params, (x.double(),)), c64


def coefficient_gradient_errors(out, ref, coefs, c64, generator=None):
    """Backpropagate one random weighting ``w`` (float64, drawn from ``generator`` on the CPU) of
    ``out`` and of its float64 reference ``ref``; the relative error of every block's coefficient
    gradient against the float64 one."""
    w = torch.randn(ref.shape, generator=generator, dtype=torch.float64).to(ref.device)
    (out * w.float()).sum().backward()
    (ref * w).sum().backward()
    return {k: rel_err(coefs[k].grad, c64[k].grad) for k in coefs}


def assert_compiles_like_eager(model, coefs, x):
    """``torch.compile(model, fullgraph=True)`` (aot_eager: no compiler needed) traces without graph
    breaks and gives the eager output (rel. err < 1e-6) and coefficient gradients (< 1e-5)."""
    y = model(x)
    y.sum().backward()
    eager = {k: c.grad.clone() for k, c in coefs.items()}
    for c in coefs.values():
        c.grad = None
    torch._dynamo.reset()
    yc = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    yc.sum().backward()
    assert rel_err(yc, y) < 1e-6, rel_err(yc, y)
    for k, c in coefs.items():
        assert rel_err(c.grad, eager[k]) < 1e-5, k

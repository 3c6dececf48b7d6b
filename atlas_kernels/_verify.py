"""``patch(..., verify=...)``: one probe forward of the patched module checked against the
functional reference path (`torch.func.functional_call` on an unpatched copy).

The reference is the module as it was before patching (a structural copy that shares its tensors,
so it costs no parameter memory) run through ``torch.func.functional_call`` with every adapted
parameter replaced by ``theta0 + sum_i lam_i tau_i``, composed here in plain PyTorch from the task
vectors themselves. It does not go through any atlas module, so it catches a patched module whose
parameters are read somewhere the swap does not see (a parent reading ``child.weight``, a tied
tensor, a custom head): the class of silent wrong answers that a per-module test cannot.

The check runs at random coefficients in [-1, 1] (the coefficients are put back afterwards), in
eval mode and without gradients, and passes when

    |patched - reference| <= 0.05 * |reference - plain| + tol(dtype) * |reference|

(norms over the whole output): the patched output must move with the reference, to within 5 % of
how far the task vectors move it, plus the rounding of the dtype.
"""
from __future__ import annotations

import copy
from typing import Dict

import torch
import torch.nn as nn

from .blocks import coef_matrix

__all__ = ["snapshot", "check", "probe_input"]

_TOL = {torch.float64: 1e-9, torch.float32: 2e-4}


def snapshot(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure that shares every parameter and buffer (no tensor copied)."""
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo)


def probe_input(module: nn.Module, verify) -> tuple:
    """The positional arguments of the probe forward: ``verify`` itself (a tensor or a tuple), or,
    for ``verify=True``, one random image sized from the module's own config (open_clip towers'
    ``image_size``, Hugging Face ``config.image_size``/``num_channels``, timm's ``pretrained_cfg``)."""
    if isinstance(verify, torch.Tensor):
        return (verify,)
    if isinstance(verify, tuple):
        return verify
    p = next(module.parameters())
    size, channels = None, 3
    cfg = getattr(module, "config", None)
    if getattr(module, "image_size", None) is not None:
        size = module.image_size
    elif cfg is not None and getattr(cfg, "image_size", None) is not None:
        size, channels = cfg.image_size, getattr(cfg, "num_channels", 3)
    elif isinstance(getattr(module, "pretrained_cfg", None), dict) and "input_size" in module.pretrained_cfg:
        channels, *size = module.pretrained_cfg["input_size"]
    if size is None:
        raise ValueError("verify=True needs to know the module's input: pass an example instead, "
                         "patch(..., verify=example_input) (a tensor, or a tuple of positional arguments)")
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    g = torch.Generator(device="cpu").manual_seed(0)
    return (torch.randn((1, channels, *size), generator=g, dtype=torch.float32).to(p.device, p.dtype),)


def _composed(theta0: torch.Tensor, tvs, tv_name: str, coef: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    # float32 accumulation (float64 for a float64 model): the bound's tol(float32) is far above it.
    acc_dtype = torch.float64 if theta0.dtype == torch.float64 else torch.float32
    acc = theta0.detach().to(acc_dtype).reshape(-1).clone()
    c = coef_matrix(coef.detach().to(torch.float64), coef.shape[0])
    for i in range(c.shape[0]):
        if tvs.is_lora(tv_name) or tvs.scale(tv_name) is not None or tvs.index(tv_name) is not None:
            tau = tvs.dense(tv_name, i)
        else:
            tau = tvs[tv_name][i]
        if c.shape[1] == 1:
            acc.add_(tau.reshape(-1), alpha=float(c[i, 0]))
        else:
            acc += (c[i, part] * tau.to(torch.float64).reshape(-1)).to(acc_dtype)
    return acc.reshape(theta0.shape).to(theta0.dtype)


@torch.no_grad()
def check(module: nn.Module, reference: nn.Module, theta0: Dict[str, torch.Tensor], tvs, tv_name: Dict[str, str],
          coefs: Dict[str, nn.Parameter], partitions: Dict[str, object], args: tuple) -> None:
    """Run the probe; raise ``RuntimeError`` naming the size of the mismatch if the patched module
    does not match the reference. ``theta0``/``tv_name``/``partitions`` are keyed by parameter name,
    ``coefs`` by the names :func:`~atlas_kernels.coefficients` gives."""
    from torch.func import functional_call

    saved = {k: c.detach().clone() for k, c in coefs.items()}
    modes = [(m, m.training) for m in list(module.modules()) + list(reference.modules())]
    g = torch.Generator(device="cpu").manual_seed(1234)
    try:
        for c in coefs.values():
            c.copy_((torch.rand(c.shape, generator=g, dtype=torch.float64) * 2 - 1).to(c.device, c.dtype))
        module.eval()
        reference.eval()
        values = {}
        for name, t0 in theta0.items():
            c = coefs[name]
            part = None if c.dim() == 1 else partitions[name].index(t0.numel(), device=t0.device)
            values[name] = _composed(t0, tvs, tv_name[name], c, part)
        out = _first_tensor(module(*args))
        ref = _first_tensor(functional_call(reference, values, args, strict=False))
        plain = _first_tensor(reference(*args))
    finally:
        for k, c in coefs.items():
            c.copy_(saved[k])
        for m, mode in modes:
            m.training = mode
    err = (out.double() - ref.double()).norm().item()
    moved = (ref.double() - plain.double()).norm().item()
    scale = ref.double().norm().item()
    bound = 0.05 * moved + _TOL.get(ref.dtype, 2e-2) * scale
    if not (err <= bound):
        raise RuntimeError(
            f"patch(verify=...): the patched module does not compute the composed model: on a probe input at random "
            f"coefficients its output differs from the reference (functional_call with theta0 + sum lam tau) by "
            f"{err:.3g} (norm), while the task vectors move the output by {moved:.3g} (bound {bound:.3g}). Some "
            f"parameter is read where the swap does not reach (a parent reading a child's weight, a custom head); "
            f"patch fewer blocks (blocks=...) or report the module type")


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "values"):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    raise TypeError(f"patch(verify=...): the module's output holds no tensor ({type(out).__name__})")

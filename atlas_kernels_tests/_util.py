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


def assert_close(out, ref, *, rtol, atol=0.0, what="output"):
    """|out - ref| <= atol + rtol * |ref|, elementwise; the message names the worst element."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values at {torch.nonzero(~torch.isfinite(out))[:3].tolist()}"
    err = (out - ref).abs()
    bound = atol + rtol * ref.abs()
    excess = err - bound
    if (excess > 0).any():
        i = int(torch.argmax(excess))
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), out.shape)) if out.dim() else ()
        raise AssertionError(
            f"{what}: worst element {idx}: got {out.reshape(-1)[i].item():.9g}, "
            f"reference {ref.reshape(-1)[i].item():.9g}, "
            f"|err| {err.reshape(-1)[i].item():.3g} > bound {bound.reshape(-1)[i].item():.3g} "
            f"({int((excess > 0).sum())} of {out.numel()} elements out of tolerance)")


def rel_err(out, ref):
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()

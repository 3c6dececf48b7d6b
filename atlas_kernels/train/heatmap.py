"""A heatmap of learned coefficients: one row per block, one column per task vector."""
from __future__ import annotations

import io
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .._io import atomic_write


def coefficient_matrix(coefs: Dict[str, torch.Tensor]) -> Tuple[List[str], torch.Tensor]:
    """Block names and a ``[blocks, N]`` float32 matrix (aTLAS x K: the mean over the K parts)."""
    rows, vals = [], []
    for name, c in coefs.items():
        c = c.detach().float().cpu()
        rows.append(name)
        vals.append(c if c.dim() == 1 else c.mean(dim=tuple(range(1, c.dim()))))
    if not vals:
        return rows, torch.zeros(0, 0)
    return rows, torch.stack(vals)


def save_heatmap(coefs: Dict[str, torch.Tensor], path, names: Optional[Sequence[str]] = None,
                 title: Optional[str] = None) -> Optional[str]:
    """Write a PNG heatmap; returns the path, or None (with a warning) without matplotlib.

    Uses matplotlib's object API with the Agg canvas, so no global backend is switched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import TwoSlopeNorm
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping the coefficient heatmap "
                      "(pip install matplotlib to get it)", stacklevel=2)
        return None
    rows, m = coefficient_matrix(coefs)
    if m.numel() == 0:
        warnings.warn("no coefficients to plot", stacklevel=2)
        return None
    n_blocks, n_tv = m.shape
    names = list(names) if names is not None else [str(i) for i in range(n_tv)]
    fig = Figure(figsize=(min(2.0 + 0.45 * n_tv + 3.5, 30.0), min(1.5 + 0.16 * n_blocks, 60.0)),
                 dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    lim = float(m.abs().max()) or 1.0
    im = ax.imshow(m.numpy(), aspect="auto", cmap="RdBu_r",
                   norm=TwoSlopeNorm(vmin=-lim, vcenter=0.0, vmax=lim), interpolation="nearest")
    ax.set_xticks(range(n_tv))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n_blocks))
    ax.set_yticklabels(rows, fontsize=6 if n_blocks > 40 else 8)
    ax.set_xlabel("task vector")
    ax.set_ylabel("block")
    parts = max((c[0].numel() if c.dim() > 1 else 1) for c in coefs.values())
    label = "coefficient" if parts == 1 else f"coefficient (mean over the {parts} partitions)"
    ax.set_title(title or ("learned coefficients" if parts == 1 else
                           f"learned coefficients, mean over K = {parts} partitions"), fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04).set_label(label, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())
    return str(path)

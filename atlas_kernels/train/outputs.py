"""A finished run's outputs: the selected coefficients loaded into the model and written as
``coefficients.safetensors``, ``metrics.json``, ``coefficients.png`` and (with
``--export-merged``) the merged or linearised model."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Dict

import torch

from .._io import atomic_save_safetensors, atomic_write_json
from .checkpointing import coef_snapshot
from .evaluation import format_metrics
from .faults import skip_report
from .heatmap import save_heatmap
from .prepare import Setup


def write_outputs(s: Setup, state: Dict[str, Any]) -> Dict[str, Any]:
    """Load the selected coefficients into the model and write ``coefficients.safetensors``,
    ``metrics.json``, ``coefficients.png`` and (with ``--export-merged``) the merged model."""
    import atlas_kernels as ak

    cfg = s.cfg
    out = Path(cfg.out)
    best = state["best"]
    if best is None:  # no admissible evaluation at all: keep the zero-shot point
        best = {"epoch": 0, "score": None, "metrics": state["zero_shot"],
                "coefficients": {k: torch.zeros_like(v) for k, v in coef_snapshot(s.coefs).items()}}
    with torch.no_grad():
        for k, v in s.coefs.items():
            v.copy_(best["coefficients"][k].to(v.device, v.dtype))
    result = {
        "objective": cfg.objective, "model": s.fingerprint.get("model"),
        "task_vectors": {"path": cfg.task_vectors, "names": [str(n) for n in s.tvs.names]},
        "datasets": [{"name": t.name, "train": t.train_path, "val": t.val_path,
                      "n_train": len(t.train), "n_val": len(t.val), "classes": t.classes}
                     for t in s.tasks],
        "world_size": s.dist.world, "device": str(s.device), "precision": s.precision,
        "steps": state["global_step"], "train_time_s": state["train_time_s"],
        "zero_shot": state["zero_shot"], "history": state["history"],
        "selected": {"epoch": best["epoch"], "rule": cfg.select if cfg.select != "auto"
                     else s.objective.default_select, "metrics": best["metrics"]},
        "config": dataclasses.asdict(cfg),
    }
    try:  # the backend that ran (config.backend is what was asked for, often "auto")
        from ..patch_config import PatchConfig

        result["backend_ran"] = PatchConfig.of(s.tower).resolved_backend
    except Exception:  # a model without an open_clip image tower attribute
        pass
    if s.precision == "fp16":
        rep = skip_report(state.get("skipped_steps", 0), state["global_step"])
        result["grad_scaler"] = rep or {"skipped_steps": state.get("skipped_steps", 0),
                                        "steps": state["global_step"]}
        if rep and s.dist.main:
            print(f"[atlas_kernels.train] {rep['warning']}", file=sys.stderr, flush=True)
    if not s.dist.main:
        if cfg.export_merged and s.sharded:
            export_merged(s, None)  # unpatching a sharded module is a collective: every process merges its rows
        return result
    out.mkdir(parents=True, exist_ok=True)
    ak.save_coefficients(s.tower, str(out / "coefficients.safetensors"))
    result["outputs"] = {"coefficients": str(out / "coefficients.safetensors"),
                         "checkpoint": str(out / "checkpoint.pt")}
    png = save_heatmap(s.coefs, out / "coefficients.png", names=[str(n) for n in s.tvs.names],
                       title=f"aTLAS coefficients ({cfg.objective}, epoch {best['epoch']})")
    if png:
        result["outputs"]["heatmap"] = png
    if cfg.export_merged:
        export_merged(s, cfg.export_merged)
        result["outputs"]["merged"] = cfg.export_merged
    atomic_write_json(out / "metrics.json", result)
    s.log(f"selected epoch {best['epoch']}: {format_metrics(best['metrics'])}; wrote {out}")
    return result


def export_merged(s: Setup, path) -> None:
    """Merge the coefficients into plain weights and write the whole model's state dict (``path``
    None: merge only, on a process that writes nothing)."""
    import atlas_kernels as ak

    if ak.is_patched(s.tower) and ak.PatchConfig.of(s.tower).linearised:
        # no plain model equals a linearised one: theta0 plus D per block (atlas_kernels.load_linearised)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        ak.export_linearised(s.tower, path)
        return
    ak.unpatch(s.tower)  # in place (sharded: every process merges its rows, then they are all-gathered)
    if path is None:  # a process that is not the main one, under --fsdp: it only took part in the merge
        return
    sd, seen = {}, {}
    for k, v in s.model.state_dict().items():
        v = v.detach().cpu().contiguous()
        key = (v.data_ptr(), v.numel(), v.dtype)
        sd[k] = v.clone() if key in seen and v.numel() else v
        seen[key] = k
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(sd, str(path), metadata={"format": "pt", "model": str(s.fingerprint.get("model")),
                                       "producer": "atlas_kernels.train"})

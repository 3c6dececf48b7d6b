"""A session: runs jobs in this process, caching towers (GPU) and task vectors between them,
and turns one job into its row's measured fields (never raising: a failed configuration is a
result)."""
from __future__ import annotations

import copy
import time
from typing import Dict

import torch

from .grid import FLOAT_STORAGES, Job, Settings
from .measure import count_ops, free_memory, is_oom, measure_ceiling, rss_bytes, time_step
from .methods import StepBuilder
from .synthetic import adapted_blocks, lora_rank, make_lora_factors, make_slabs
from .towers import MODEL_SOURCE, build_visual


class Session:
    """Runs jobs in this process. ``cache_models``: keep a CPU master copy of each tower and give
    every job a fresh device copy (GPU runs); otherwise build the tower per job (a CPU worker runs
    one job per process). Task vectors are cached for consecutive jobs with the same
    (model, N, storage) and dropped before a job that needs none (so floor peaks exclude them)."""

    def __init__(self, dev: torch.device, settings: Settings, cache_models: bool):
        self.dev, self.s, self.cache_models = dev, settings, cache_models
        if dev.type == "cpu" and settings.threads:
            torch.set_num_threads(settings.threads)
        self._masters: Dict[str, torch.nn.Module] = {}
        self._tv_key = None
        self._slabs = None
        self._tvs = None

    def _master(self, model: str):
        if model not in self._masters:
            self._masters.clear()
            self._masters[model] = build_visual(model, self.s.seed)
        return self._masters[model]

    def visual(self, model: str):
        if self.cache_models:
            return copy.deepcopy(self._master(model)).to(self.dev)
        return build_visual(model, self.s.seed).to(self.dev)

    def drop_task_vectors(self):
        self._tv_key = self._slabs = self._tvs = None
        free_memory()

    def slabs(self, job: Job, visual) -> Dict[str, torch.Tensor]:
        key = (job.model, job.n_task_vectors, job.storage)
        if self._tv_key != key:
            self.drop_task_vectors()
            rank = lora_rank(job.storage)
            if rank:
                self._slabs = make_lora_factors(visual, job.n_task_vectors, rank, self.dev, self.s.seed,
                                                self.s.tau_scale)
            else:
                self._slabs = make_slabs(visual, job.n_task_vectors, job.storage, self.dev, self.s.seed,
                                         self.s.tau_scale)
            self._tv_key = key
        return self._slabs

    def task_vectors(self, storage: str):
        """The same slabs as an ``atlas_kernels.TaskVectors`` (built once; the float slabs are
        then taken from it, so naive/merge_once and atlas share one copy)."""
        import atlas_kernels as ak

        if self._tvs is None and lora_rank(storage):
            n = next(iter(self._slabs.values()))[0].shape[0]
            self._tvs = ak.TaskVectors({}, lora=dict(self._slabs), n=n)
            return self._tvs
        if self._tvs is None:
            tvs = ak.TaskVectors(dict(self._slabs))
            if storage not in FLOAT_STORAGES:  # built in bf16, quantized here (per-row scales)
                tvs = tvs.to_storage(storage)
            self._slabs = {b: tvs[b] for b in tvs.blocks}  # drop anything TaskVectors copied
            self._tvs = tvs
        return self._tvs

    def run(self, job: Job) -> dict:
        """Measure one job: a dict of the measured fields (no run info), never raises."""
        t_start = time.perf_counter()
        out: dict = {"oom": False}
        if not job.needs_task_vectors and self._tv_key is not None:
            self.drop_task_vectors()
        try:
            if job.method == "ceiling":
                out.update(measure_ceiling(self.dev))
            else:
                out.update(self._run_step(job))
        except BaseException as e:  # noqa: BLE001 - a failed configuration is a result
            if isinstance(e, KeyboardInterrupt):
                raise
            if is_oom(e):
                out["oom"] = True
                out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                if self.dev.type == "cuda":
                    out["peak_bytes"] = int(torch.cuda.max_memory_allocated(self.dev))
                    out["peak_kind"] = "cuda.max_memory_allocated (until OOM)"
            else:
                out["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            e = None  # drop the traceback's frames (and their tensors) before freeing memory
        free_memory()
        out["wall_s"] = round(time.perf_counter() - t_start, 2)
        return out

    def _run_step(self, job: Job) -> dict:
        base_rss = rss_bytes() if self.dev.type == "cpu" else None  # interpreter + torch, no model yet
        visual = self.visual(job.model)
        res: dict = {"adapted_params": sum(p.numel() for p in adapted_blocks(visual).values())}
        if base_rss is not None:
            res["base_rss_bytes"] = base_rss
        if MODEL_SOURCE["how"] != "open_clip.create_model":
            res["model_source"] = MODEL_SOURCE["how"]
        slabs = None
        if job.needs_task_vectors:
            if job.method != "atlas" and job.storage not in FLOAT_STORAGES:
                raise ValueError(f"{job.method} needs floating task vectors, not {job.storage}")
            slabs = self.slabs(job, visual)
            if job.method == "atlas":
                tvs = self.task_vectors(job.storage)
                if lora_rank(job.storage):
                    res["adapted_params"] = tvs.numel  # the LoRA-adapted matrices only
            slabs = self._slabs
        if job.method in ("atlas", "floor"):  # the library's planner, read from the unpatched tower
            try:
                import atlas_kernels as ak

                tv_spec = (job.n_task_vectors, job.storage) if job.method == "atlas" else None
                est = ak.estimate_memory(visual, tv_spec, job.batch, precision=job.precision,
                                         partitions=job.partitions or 1, device=self.dev.type)
                res["predicted_peak_bytes"] = int(est.total)
            except Exception as e:  # an older library without a planner, or a case it refuses
                res["predict_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        builder = StepBuilder(job, self.s, visual, slabs, lambda: self.task_vectors(job.storage), self.dev)
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        res["setup_rss_bytes"] = rss_bytes() if self.dev.type == "cpu" else None
        step = builder.build()
        if job.method == "fusionbench":
            # it keeps its own copy of the task vectors (N modules): drop the shared slabs, so that its
            # peak over the timed steps holds one copy, as every other method's does
            slabs = None
            self.drop_task_vectors()
        res.update(time_step(step, self.dev, self.s))
        if self.s.profile:
            try:
                res.update(count_ops(step, self.dev))
            except Exception as e:  # the numbers above stand without it
                res["profile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        res.update(builder.extra)
        del step, builder, visual
        return res

"""The methods' training steps, one builder per job: ``floor`` (the plain model, weight
gradients), ``naive`` (the paper's Python sum per block), ``merge_once`` (one tensordot per block),
``fusionbench`` (FusionBench's own ``LayerWiseMergedModel``, imported unmodified: :mod:`bench.peers`)
and ``atlas`` (this library's patched tower). Every ``step()`` returns its loss (the first one,
before any update, goes into the row as ``loss0``). See :mod:`bench.workload` for what every method
shares."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from .grid import Job, Settings
from .synthetic import coef_init, contiguous_counts, make_data

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class StepBuilder:
    """Builds ``step()`` for one job; keeps references alive for as long as it lives."""

    def __init__(self, job: Job, settings: Settings, visual, slabs, tvs_factory, dev: torch.device):
        self.job, self.s, self.visual, self.dev = job, settings, visual, dev
        self.slabs = slabs
        self.tvs_factory = tvs_factory
        self.x, self.y, self.head = make_data(visual, job.batch, settings.classes, settings.seed, dev)
        ad = AUTOCAST_DTYPES[job.precision]
        self.autocast = (lambda: torch.autocast(device_type=dev.type, dtype=ad)) if ad is not None else nullcontext
        self.scaler = torch.amp.GradScaler(dev.type) if job.precision == "fp16" else None
        self.extra: dict = {}

    def adamw(self, params):
        """AdamW as every method with coefficients takes it: on a GPU fused (one kernel over all
        coefficients) and capturable (so that the step can be replayed in a CUDA graph)."""
        if self.dev.type == "cuda":
            return torch.optim.AdamW(params, lr=self.s.lr, fused=True, capturable=True)
        return torch.optim.AdamW(params, lr=self.s.lr)

    def _loss(self, feats):
        return F.cross_entropy(feats.float() @ self.head.t(), self.y)

    def _backward_and_step(self, loss, opt):
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()
        else:
            loss.backward()
            opt.step()

    def _coefficients(self, k: int) -> Dict[str, torch.nn.Parameter]:
        n = self.job.n_task_vectors
        shape = (n,) if k == 1 else (n, k)
        return {
            b: torch.nn.Parameter(coef_init(b, shape, self.s.seed, self.s.coef_scale).to(self.dev))
            for b in self.slabs
        }

    def _composing_setup(self):
        """What ``naive`` and ``merge_once`` start from: (K, theta0 per block, coefficients, the
        contiguous parts' sizes per block, AdamW over the coefficients)."""
        k = self.job.partitions
        theta0 = {b: p.detach() for b, p in self.visual.named_parameters() if b in self.slabs}
        coefs = self._coefficients(k)
        counts = {b: contiguous_counts(theta0[b].numel(), k) for b in self.slabs}
        opt = self.adamw(list(coefs.values()))
        return k, theta0, coefs, counts, opt

    def _composed_step(self, compose: Callable[[str], torch.Tensor], opt) -> Callable[[], None]:
        """The step of ``naive`` and ``merge_once``: every block composed afresh (``compose(b)``),
        the tower run once on them through ``torch.func.functional_call``, loss, backward, step."""
        from torch.func import functional_call

        visual, blocks = self.visual, list(self.slabs)

        def step():
            params = {b: compose(b) for b in blocks}
            with self.autocast():
                feats = functional_call(visual, params, (self.x,))
            loss = self._loss(feats)
            self._backward_and_step(loss, opt)
            return loss.detach()  # not the graph: a kept graph breaks a later CUDA-graph capture

        return step

    # -- floor ---------------------------------------------------------------------------
    def floor_step(self) -> Callable[[], None]:
        """The plain model's training step: forward, backward with weight gradients (set to None
        before each backward, as ``zero_grad`` does). No optimizer step over the weights: the floor
        (docs/PERFORMANCE.md) is forward + backward with weight gradients, which is what
        the fused step has to beat (it needs G); an AdamW step over 88M fp32 weights would add
        several model-sized passes that aTLAS never makes."""
        visual = self.visual
        params = [p for p in visual.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        self.extra["optimizer_step"] = False

        def step():
            for p in params:
                p.grad = None
            with self.autocast():
                feats = visual(self.x)
            loss = self._loss(feats)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            return loss.detach()  # not the graph: a kept graph breaks a later CUDA-graph capture

        return step

    # -- naive -----------------------------------------------------------------------------
    def naive_step(self) -> Callable[[], None]:
        """The paper's way: every block rebuilt every step as a Python sum of N coefficient-times-
        task-vector products plus theta0 (``reference.naive_compose``), task vectors kept as N
        separate tensors per block, the tower run through ``torch.func.functional_call``.
        With K partitions each product is ``cat([chunk_k * c[i, k]])`` over the K contiguous chunks
        (the paper multiplies by K one-hot masks instead, which costs more)."""
        from atlas_kernels.reference import naive_compose

        k, theta0, coefs, counts, opt = self._composing_setup()
        taus = {b: list(s.unbind(0)) for b, s in self.slabs.items()}
        self._keep = (theta0, taus, coefs, opt)

        def compose(b):
            c = coefs[b]
            if k == 1:
                return naive_compose(theta0[b], taus[b], [c[i] for i in range(len(taus[b]))])
            shape = theta0[b].shape
            terms = [
                torch.cat([ch * c[i, j] for j, ch in enumerate(t.reshape(-1).split(counts[b]))]).view(shape)
                for i, t in enumerate(taus[b])
            ]
            return sum(terms) + theta0[b]

        return self._composed_step(compose, opt)

    # -- merge_once ----------------------------------------------------------------------------
    def merge_once_step(self) -> Callable[[], None]:
        """Layer-wise merging libraries' way: every block composed once per step with one tensor op
        over the stacked slab, ``theta0 + tensordot(coef, tau, 1)`` (coefficients cast to the
        storage dtype, the result to theta0's dtype), then one ``functional_call``. With K
        partitions: one ``coef[:, k] @ chunk_k`` per contiguous chunk, concatenated."""
        k, theta0, coefs, counts, opt = self._composing_setup()
        flat = {b: s.reshape(s.shape[0], -1) for b, s in self.slabs.items()}
        self._keep = (theta0, flat, coefs, opt)

        def compose(b):
            t0, f, c = theta0[b], flat[b], coefs[b].to(flat[b].dtype)
            if k == 1:
                delta = torch.tensordot(c, f, dims=1)
            else:
                delta = torch.cat([c[:, j] @ ch for j, ch in enumerate(f.split(counts[b], dim=1))])
            return t0 + delta.to(t0.dtype).view(t0.shape)

        return self._composed_step(compose, opt)

    # -- fusionbench ---------------------------------------------------------------------------
    def fusionbench_step(self) -> Callable[[], None]:
        """A peer's own code: FusionBench's ``LayerWiseMergedModel`` (package fusion-bench, imported
        unmodified, built by :func:`bench.peers.layer_wise_merged_model` from N fine-tuned copies
        ``theta0 + tau_i``), one coefficient per (task vector, parameter) initialised as every other
        method's, AdamW on its ``merge_weight``. Each step is FusionBench's AdaMerging loop:
        ``merge_weights()`` (a Python loop of N multiplies and adds per parameter, outside autocast),
        then its forward (``functional_call`` on the merged state dict), loss, backward, step."""
        from .peers import fusionbench_version, layer_wise_merged_model

        if self.job.partitions not in (None, 1):
            raise ValueError("fusionbench has one coefficient per task vector and parameter: partitions must be 1")
        # FusionBench merges the pretrained model's trainable parameters (AdaMerging counts its layers
        # as those): the adapted blocks, as for every other method
        for b, p in self.visual.named_parameters():
            p.requires_grad_(b in self.slabs)
        names = [b for b, p in self.visual.named_parameters() if p.requires_grad]
        n = self.job.n_task_vectors
        weights = torch.stack([coef_init(b, (n,), self.s.seed, self.s.coef_scale) for b in names], dim=1)
        model = layer_wise_merged_model(self.visual, self.slabs, weights.to(self.dev))
        self.slabs = None  # its own task vectors are what it keeps (the session drops the shared slabs)
        opt = self.adamw([model.merge_weight])
        self.extra["coef_init_matched"] = True
        self.extra["peer"] = f"fusion-bench {fusionbench_version()}"
        self._keep = (model, opt)

        def step():
            model.merge_weights()
            with self.autocast():
                feats = model(self.x)
            loss = self._loss(feats)
            self._backward_and_step(loss, opt)
            return loss.detach()  # not the graph: a kept graph breaks a later CUDA-graph capture

        return step

    # -- atlas -----------------------------------------------------------------------------------
    def atlas_step(self) -> Callable[[], None]:
        """This library: ``atlas_kernels.patch(model.visual, tvs, partitions=K, backend=...)``, then
        AdamW on ``atlas_kernels.coefficients(model.visual).values()``."""
        import atlas_kernels as ak

        visual = self.visual
        tvs = self.tvs_factory()
        ak.patch(visual, tvs, partitions=self.job.partitions, backend=self.job.backend)
        self.extra["backend_ran"] = ak.PatchConfig.of(visual).resolved_backend
        self.extra["plan"] = visual._atlas_plan_root.summary()
        coefs = ak.coefficients(visual)
        with torch.no_grad():
            for name, c in coefs.items():
                c.copy_(coef_init(name, c.shape, self.s.seed, self.s.coef_scale).to(c.device, c.dtype))
        self.extra["coef_init_matched"] = all(name in self.slabs for name in coefs)
        ids = {id(c) for c in coefs.values()}
        for p in visual.parameters():
            if id(p) not in ids:
                p.requires_grad_(False)
        opt = self.adamw(list(coefs.values()))
        self._keep = (tvs, coefs, opt)

        def step():
            with self.autocast():
                feats = visual(self.x)
            loss = self._loss(feats)
            self._backward_and_step(loss, opt)
            return loss.detach()  # not the graph: a kept graph breaks a later CUDA-graph capture

        return step

    def build(self) -> Callable[[], None]:
        return getattr(self, f"{self.job.method}_step")()

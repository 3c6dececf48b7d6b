"""Linearised task vectors: aTLAS in the tangent space of the pre-trained model.

``patch(module, task_vectors, linearised=True)`` makes ``module(x)`` return
``f(x; theta0) + J f(x; theta0) . D(lam)``, ``D_b = sum_i lam_{i,b} tau_{i,b}``, in one
forward-mode pass (:mod:`.modules`, :mod:`.ops`). :mod:`.export` writes and reads the linearised
model as a file (``export_linearised``; ``atlas_kernels.load_linearised``, which patches, lives in
:mod:`atlas_kernels.patching`); the published linearised checkpoints are read by
:mod:`atlas_kernels.checkpoints.linearised`, beside the other checkpoint formats.
"""

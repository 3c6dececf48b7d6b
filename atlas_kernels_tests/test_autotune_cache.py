"""Triton's autotune disk cache (``TRITON_CACHE_AUTOTUNING=1``) stores each tuned config's
``__dict__`` as JSON and rebuilds it with ``Config(**json)`` (triton 3.6 and 3.8 alike). A Config
carrying an attribute of ours crashed every kernel on a warm cache (``TypeError: Config.__init__()
got an unexpected keyword argument 'atlas_light'``, found on the H200, issue 22). This writes the
cache entries the way Triton does, reads them back, and runs the pruning on what comes back."""
import json

import pytest

triton = pytest.importorskip("triton")

from atlas_kernels.kernels import _linear, _linear_tuning  # noqa: E402


def _round_trip(configs):
    # triton.runtime.autotuner.Autotuner.check_disk_cache: write ...
    text = json.dumps({"key": [1], "configs_timings": [(c.__dict__, 1.0 + i) for i, c in enumerate(configs)]})
    # ... and read back
    return [triton.Config(**cfg) for cfg, _ in json.loads(text)["configs_timings"]]


@pytest.mark.parametrize("launcher", ["_fused_launch", "_fused_dx_launch", "_lcg_launch"])
def test_autotune_configs_survive_the_disk_cache(launcher):
    fn = getattr(_linear, launcher, None)
    configs = getattr(fn, "configs", None)
    if configs is None:  # under TRITON_INTERPRET=1 the launchers are not autotuned: use the config lists
        configs = (_linear_tuning._fused_configs(_linear_tuning.FUSED_SAFE, _linear_tuning.FUSED_LIGHT, "BLOCK_O")
                   if launcher != "_fused_dx_launch" else
                   _linear_tuning._fused_configs(_linear_tuning.FUSED_DX_SAFE, _linear_tuning.FUSED_DX_LIGHT,
                                                 "BLOCK_I"))
    back = _round_trip(configs)
    assert [(c.kwargs, c.num_warps, c.num_stages) for c in back] == [(c.kwargs, c.num_warps, c.num_stages)
                                                                      for c in configs]
    if launcher == "_lcg_launch":
        return
    # the pruning recognises the light configs from their values, so it prunes the same after the cache
    heavy = {"K": 4, "HAS_SCALE": True}
    assert ([c.kwargs for c in _linear_tuning._prune_fused(back, {}, **heavy)]
            == [c.kwargs for c in _linear_tuning._prune_fused(configs, {}, **heavy)])
    assert len(_linear_tuning._prune_fused(configs, {}, **heavy)) < len(configs)
    assert len(_linear_tuning._prune_fused(back, {}, K=1, HAS_SCALE=False)) == len(configs)

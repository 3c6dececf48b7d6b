"""The README's API snippet is a complete script: run it as written, on the toy open_clip config
(the one name swapped) with checkpoints made here, so that a README edit that breaks it fails CI."""
import os
import re
import warnings
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Use it with open_clip"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_api_snippet_runs(tmp_path, monkeypatch):
    import open_clip
    from safetensors.torch import save_file

    from atlas_kernels.train.model import register_model_config
    from atlas_kernels.train.toy import write_model_config

    code = _snippet()
    assert 'MODEL = "ViT-B-32"' in code
    name = register_model_config(write_model_config(tmp_path))
    code = code.replace('MODEL = "ViT-B-32"', f"MODEL = {name!r}")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = open_clip.create_model(name, pretrained=None)
    sd = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file(sd, "zeroshot.safetensors")
    for i, f in enumerate(["cars.safetensors", "dtd.safetensors"]):
        g = torch.Generator().manual_seed(i)
        save_file({k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v).contiguous()
                   for k, v in sd.items()}, f)
    scope = {"__name__": "__readme__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, str(README), "exec"), scope)
    assert os.path.exists("coefficients.safetensors")
    assert not scope["ak"].is_patched(scope["model"].visual)
    coefs = scope["coefs"]
    assert len(coefs) > 0 and all(c.grad is None or torch.isfinite(c.grad).all() for c in coefs.values())
    # the one training step moved the coefficients off zero (AdamW's first step is about lr)
    assert any(c.detach().abs().max() > 0 for c in coefs.values())

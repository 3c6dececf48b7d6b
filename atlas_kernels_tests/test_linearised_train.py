"""The training CLI's --linearised for every objective (the toy setup of test_train)."""
import pytest
import torch

import atlas_kernels as ak
from atlas_kernels.train import run
from atlas_kernels.train.cli import build_parser, config_from_args

from .test_train import _cfg, demo, toy_model  # noqa: F401  (shared fixtures and helpers)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_flag_reaches_the_config(tmp_path):
    args = build_parser().parse_args(["--task-vectors", "t", "--objective", "fewshot", "--train", "a", "--val", "b",
                                      "--out", str(tmp_path), "--linearised"])
    assert config_from_args(args).linearised is True


@pytest.mark.parametrize("objective", ["fewshot", "tta", "negation", "addition"])
def test_every_objective_trains_linearised(demo, tmp_path, objective):  # noqa: F811
    d = demo["data"]
    kw = dict(objective=objective, epochs=1, batch_size=8, linearised=True)
    if objective == "negation":
        kw.update(control_train=str(d["colours"]["train"]), control_val=str(d["colours"]["val"]))
    if objective == "addition":
        kw.update(train=[str(d["shapes"]["train"]), str(d["colours"]["train"])],
                  val=[str(d["shapes"]["val"]), str(d["colours"]["val"])],
                  export_merged=str(tmp_path / "run" / "linearised.safetensors"))
    res = run(_cfg(demo, tmp_path / "run", **kw))
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in res["history"])
    path = tmp_path / "run" / "coefficients.safetensors"
    tvs = ak.TaskVectors.load(str(demo["task_vectors"]))
    model = toy_model(demo)
    with pytest.raises(ValueError, match="learned by a linearised"):
        ak.load_coefficients(ak.patch(model.visual, tvs), str(path))
    lin = toy_model(demo)
    ak.patch(lin.visual, tvs, linearised=True)
    ak.load_coefficients(lin.visual, str(path))
    if objective == "addition":
        back = ak.load_linearised(tmp_path / "run" / "linearised.safetensors", toy_model(demo).visual)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(back(x), lin.visual(x), atol=1e-5, rtol=1e-5)

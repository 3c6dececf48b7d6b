"""LoRA task vectors against their densified form, and per-block budgets (ragged sets)."""
import copy

import pytest
import torch
import torch.nn as nn

import atlas_kernels as ak

from ._util import assert_close, rel_err


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(24, 40)
        self.attn = nn.MultiheadAttention(40, 4, batch_first=True)
        self.proj = nn.Parameter(torch.randn(40, 8))

    def forward(self, x):
        h = self.fc(x)
        h = self.attn(h, h, h, need_weights=False)[0]
        return h @ self.proj


LORA_BLOCKS = {"fc.weight": (40, 24), "attn.in_proj_weight": (120, 40), "attn.out_proj.weight": (40, 40),
               "proj": (40, 8)}


def _factors(n, r=3):
    out = []
    for i in range(n):
        f = {}
        for b, (o, inn) in LORA_BLOCKS.items():
            if i == 1 and b == "proj":
                continue  # task vector 1 does not touch proj
            rank = r if i != 2 else r - 1  # ragged ranks
            f[b] = (torch.randn(rank, inn) * 0.3, torch.randn(o, rank) * 0.3)
        out.append(f)
    return out


def _dense_from(factors, n, dtype=torch.float32):
    slabs = {}
    for b, (o, inn) in LORA_BLOCKS.items():
        slabs[b] = torch.stack([(factors[i][b][1].to(dtype) @ factors[i][b][0].to(dtype)) if b in factors[i]
                                else torch.zeros(o, inn, dtype=dtype) for i in range(n)])
    return ak.TaskVectors(slabs)


def _run(model, x, coef_values):
    coefs = ak.coefficients(model)
    with torch.no_grad():
        for k, c in coefs.items():
            c.copy_(coef_values[k])
    y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    (y * g).sum().backward()
    return y, {k: c.grad for k, c in coefs.items()}


@pytest.mark.parametrize("m_rows,partitions", [(2, 1), (64, 1), (5, 2)])
def test_lora_matches_densified(m_rows, partitions):
    torch.manual_seed(0)
    net = _Net().double().float()
    n = 3
    factors = _factors(n)
    lora_tvs = ak.TaskVectors.from_lora(factors)
    assert lora_tvs.is_lora("fc.weight") and lora_tvs.lora("fc.weight")[0].shape == (3, 3, 24)
    dense_tvs = _dense_from(factors, n)
    a = ak.patch(copy.deepcopy(net), lora_tvs, partitions=partitions, partition_mode="hash")
    b = ak.patch(copy.deepcopy(net), dense_tvs, partitions=partitions, partition_mode="hash")
    shape = (n,) if partitions == 1 else (n, partitions)
    values = {k: torch.randn(shape) for k in LORA_BLOCKS}
    x = torch.randn(1, m_rows, 24)
    ya, ga = _run(a, x, values)
    yb, gb = _run(b, x, values)
    assert rel_err(ya, yb) < 1e-5
    for k in LORA_BLOCKS:
        assert rel_err(ga[k], gb[k]) < 1e-4, k
    # and in float64, where the two must agree to rounding
    a64 = ak.patch(copy.deepcopy(net).double(), ak.TaskVectors.from_lora(
        [{k: (p.double(), q.double()) for k, (p, q) in f.items()} for f in factors], storage="float64"),
        partitions=partitions,
        partition_mode="hash")
    b64 = ak.patch(copy.deepcopy(net).double(), _dense_from(factors, n, torch.float64), partitions=partitions,
                   partition_mode="hash")
    ya64, ga64 = _run(a64, x.double(), values)
    yb64, gb64 = _run(b64, x.double(), values)
    assert_close(ya64, yb64, rtol=1e-10, atol=1e-10)
    for k in LORA_BLOCKS:
        assert_close(ga64[k], gb64[k], rtol=1e-9, atol=1e-9, what=k)
    # a float64 model with the factors stored float32: theta0 and the block's gradient stay float64
    # (composing in the factors' float32 rounded theta0 to float32: ~1e-8, and the sharded path,
    # which reduces in float64, disagreed with one process by 1e-6)
    a32 = ak.patch(copy.deepcopy(net).double(), lora_tvs, partitions=partitions, partition_mode="hash")
    ya32, ga32 = _run(a32, x.double(), values)
    assert_close(ya32, yb64, rtol=1e-10, atol=1e-10)
    for k in LORA_BLOCKS:
        assert_close(ga32[k], gb64[k], rtol=1e-6, atol=1e-6, what=k)  # coefficient grads are float32


def test_lora_unpatch_merges_and_files_round_trip(tmp_path):
    net = _Net()
    factors = _factors(2)
    tvs = ak.TaskVectors.from_lora(factors, names=["a", "b"])
    assert tvs.nbytes < 0.35 * sum(o * i for o, i in LORA_BLOCKS.values()) * 4 * 2
    tvs.save(tmp_path / "lora.safetensors")
    back = ak.TaskVectors.load(tmp_path / "lora.safetensors")
    assert back.blocks == tvs.blocks and back.names == ["a", "b"]
    for b in tvs.blocks:
        assert all(torch.equal(p, q) for p, q in zip(back.lora(b), tvs.lora(b)))
    m = ak.patch(copy.deepcopy(net), back)
    with torch.no_grad():
        for c in ak.coefficients(m).values():
            c.normal_()
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        y = m(x)
    ak.unpatch(m)
    with torch.no_grad():
        assert_close(m(x), y, rtol=1e-4, atol=1e-4)


def test_lora_bad_input():
    with pytest.raises(ValueError, match=r"factors\[0\]\['w'\]: need A \(r, in\) and B \(out, r\)"):
        ak.TaskVectors.from_lora([{"w": (torch.randn(3, 4), torch.randn(5, 2))}])
    with pytest.raises(ValueError, match=r"block 'w': factors\[1\] gives a \(6, 4\) update"):
        ak.TaskVectors.from_lora([{"w": (torch.randn(2, 4), torch.randn(5, 2))},
                                  {"w": (torch.randn(2, 4), torch.randn(6, 2))}])
    bad = torch.randn(2, 4)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"LoRA factor A of block 'w'.*NaN"):
        ak.TaskVectors.from_lora([{"w": (bad, torch.randn(5, 2))}])
    with pytest.raises(ValueError, match="LoRA factors take float storage"):
        ak.TaskVectors.from_lora([{"w": (torch.randn(2, 4), torch.randn(5, 2))}], storage="int8")


def test_budget_keeps_selected_task_vectors_only():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(16, 12), nn.LayerNorm(12), nn.Linear(12, 4))
    n = 4
    slabs = {k: torch.randn(n, *p.shape) * 0.1 for k, p in net.named_parameters()}
    tvs = ak.TaskVectors(slabs)
    sel = {"0.weight": [0, 2], "2.weight": [3], "1.bias": []}
    small = tvs.keep(sel)
    assert small.index("0.weight").tolist() == [0, 2] and small["0.weight"].shape[0] == 2
    assert "1.bias" not in small.blocks
    saved = tvs.nbytes - small.nbytes
    assert saved == (2 * 16 * 12 + 3 * 12 * 4 + 4 * 12) * 4
    # reference: the full set with the dropped task vectors zeroed (and 1.bias not adapted)
    zeroed = {k: v.clone() for k, v in slabs.items() if k != "1.bias"}
    zeroed["0.weight"][[1, 3]] = 0
    zeroed["2.weight"][[0, 1, 2]] = 0
    a = ak.patch(copy.deepcopy(net), small)
    b = ak.patch(copy.deepcopy(net), ak.TaskVectors(zeroed))
    assert set(ak.coefficients(a)) == set(ak.coefficients(b))
    values = {k: torch.randn(n) for k in ak.coefficients(a)}
    x = torch.randn(3, 16)
    ya, ga = _run(a, x, values)
    yb, gb = _run(b, x, values)
    assert rel_err(ya, yb) < 1e-6
    for k in ga:
        assert ga[k].shape == (n,)
        assert_close(ga[k], gb[k], rtol=1e-5, atol=1e-6, what=k)
    assert (ga["0.weight"][[1, 3]] == 0).all() and (ga["2.weight"][:3] == 0).all()


def test_budget_files_round_trip_and_bad_selection(tmp_path):
    tvs = ak.TaskVectors({"w": torch.randn(3, 4, 5), "b": torch.randn(3, 4)})
    small = tvs.keep({"w": [2]})
    small.save(tmp_path / "s.safetensors")
    back = ak.TaskVectors.load(tmp_path / "s.safetensors")
    assert back.index("w").tolist() == [2] and len(back) == 3 and torch.equal(back["w"], small["w"])
    assert torch.equal(back.dense("w", 2), tvs["w"][2]) and (back.dense("w", 0) == 0).all()
    with pytest.raises(ValueError, match=r"block 'w': task vectors \[5\] are not in \[0, 3\)"):
        tvs.keep({"w": [5]})
    with pytest.raises(KeyError, match="'nope'"):
        tvs.keep({"nope": [0]})
    with pytest.raises(ValueError, match=r"\[0\] were already dropped"):
        small.keep({"w": [0]})


def test_select_task_vectors_by_gradient_picks_the_informative_ones():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    n = 4
    slabs = {k: torch.randn(n, *p.shape) * 0.1 for k, p in net.named_parameters()}
    slabs["0.weight"][[0, 2]] *= 1e-4  # task vectors 0 and 2 barely touch block 0.weight
    tvs = ak.TaskVectors(slabs)
    m = ak.patch(copy.deepcopy(net), tvs)
    batches = [torch.randn(16, 8) for _ in range(3)]
    sel = ak.select_task_vectors(m, batches, lambda mod, x: mod(x).square().mean(), per_block=2)
    assert sel["0.weight"] == [1, 3]
    assert all(len(v) == 2 for v in sel.values())
    assert all(c.grad is None for c in ak.coefficients(m).values())
    glob = ak.select_task_vectors(m, batches, lambda mod, x: mod(x).square().mean(), fraction=0.5, task_vectors=tvs)
    small = tvs.keep(glob)
    assert small.nbytes <= 0.5 * tvs.nbytes
    assert "saved" in ak.budget_report(tvs, small)
    with pytest.raises(ValueError, match="exactly one of per_block= or fraction="):
        ak.select_task_vectors(m, batches, lambda mod, x: mod(x).sum())

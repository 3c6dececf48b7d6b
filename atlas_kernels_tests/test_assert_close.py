"""The shared tolerance check (``_util.assert_close``) fails where it must: a value outside
``atol + 2 |ref_low - ref| + rtol * ref_abs``, a NaN (an unwritten or poisoned element), an inf,
a missing gradient, another shape; and passes on the bound itself."""
import pytest
import torch

from ._util import assert_close


def test_bound_is_atol_plus_rtol_times_abs_ref_without_low_precision_reference():
    ref = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    assert_close(ref + torch.tensor([1e-3, -2e-3, 1e-4], dtype=torch.float64), ref, rtol=1e-3, atol=1e-4)
    with pytest.raises(AssertionError, match=r"1 of 3 elements out of tolerance; worst at \(2,\)"):
        assert_close(ref + torch.tensor([0.0, 0.0, 2e-4], dtype=torch.float64), ref, rtol=1e-3, atol=1e-4)


def test_low_precision_reference_and_absolute_scale_widen_the_bound():
    ref = torch.tensor([1.0, 1.0], dtype=torch.float64)
    low = torch.tensor([1.01, 1.0], dtype=torch.float64)  # the kernel's precisions miss by 0.01
    scale = torch.tensor([1.0, 100.0], dtype=torch.float64)  # |terms| summed: cancellation at [1]
    assert_close(torch.tensor([1.02, 1.01]), ref, low, scale, 1e-4, "y")
    with pytest.raises(AssertionError, match=r"y: 1 of 2 .* worst at \(0,\)"):
        assert_close(torch.tensor([1.0205, 1.01]), ref, low, scale, 1e-4, "y")
    with pytest.raises(AssertionError, match=r"y: 1 of 2 .* worst at \(1,\)"):
        assert_close(torch.tensor([1.02, 1.011]), ref, low, scale, 1e-4, "y")


@pytest.mark.parametrize("bad,match", [(float("nan"), "NaN of 3 .*unwritten or poisoned"),
                                       (float("inf"), "non-finite values")])
def test_nan_and_inf_fail_even_with_a_wide_bound(bad, match):
    ref = torch.ones(3, dtype=torch.float64)
    out = torch.ones(3)
    out[1] = bad
    with pytest.raises(AssertionError, match=match):
        assert_close(out, ref, rtol=1e9, atol=1e9)


def test_missing_gradient_and_shape_mismatch_fail():
    ref = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="dcoef: no gradient"):
        assert_close(None, ref, name="dcoef")
    with pytest.raises(AssertionError, match=r"shape \(3, 2\) != reference \(2, 3\)"):
        assert_close(torch.ones(3, 2), ref, rtol=1.0)

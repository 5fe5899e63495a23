"""The one tolerance table of the test suite, and the comparison helpers that use it.

fp64/fp32: torch.testing.assert_close with the (atol, rtol) below (fp32 GEMMs with TF32 off).
fp16/bf16: the flash-attn rule |ours − ref_hi| ≤ 2·|ref_lowp − ref_hi| + floor, elementwise, where ref_hi is the
reference in fp64 and ref_lowp the same reference run in the low precision with plain torch.
"""
import torch

TOLERANCES = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-9},
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    # floors of the 2x rule for 16-bit outputs
    torch.float16: {"floor": 1e-3},
    torch.bfloat16: {"floor": 1e-2},
}

# Relative error bound of the upcycling invariant (an upcycled model with copied experts vs the dense one, fp32).
UPCYCLE_RTOL = 1e-5


def assert_close(actual, expected, dtype=None, msg=""):
    """assert_close with the table's atol/rtol for `dtype` (default: expected's dtype)."""
    tol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=tol["atol"], rtol=tol["rtol"],
                               msg=lambda m: f"{msg}: {m}" if msg else m)


def assert_close_lowp(actual, ref_hi, ref_lowp, msg=""):
    """The 2x rule: `actual` (low precision) may err vs `ref_hi` at most twice as much as plain torch in the same
    low precision (`ref_lowp`), plus the dtype's floor."""
    floor = TOLERANCES[actual.dtype]["floor"]
    err = (actual.double() - ref_hi.double()).abs()
    bound = 2 * (ref_lowp.double() - ref_hi.double()).abs() + floor
    bad = err > bound
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(f"{msg}: {int(bad.sum())} of {err.numel()} elements break |err| <= 2*|err_torch| + "
                             f"{floor}; first at flat index {i}: err {err.flatten()[i]:.3e} > bound "
                             f"{bound.flatten()[i]:.3e}")


def relative_error(a, b):
    """‖a − b‖ / ‖b‖ in fp64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

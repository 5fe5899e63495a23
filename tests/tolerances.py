"""The one tolerance table of the test suite, and the comparison helpers that use it.

fp64/fp32: torch.testing.assert_close with the (atol, rtol) below (fp32 GEMMs with TF32 off).
fp16/bf16: the flash-attn rule max|ours − ref_hi| ≤ 2·max|ref_lowp − ref_hi| + floor (max over the tensor), where
ref_hi is the reference in fp64 and ref_lowp the same reference run in the low precision with plain torch.
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
    assert actual.shape == ref_hi.shape == ref_lowp.shape, f"{msg}: shapes differ"
    if actual.numel() == 0:
        return
    err = (actual.double() - ref_hi.double()).abs().max().item()
    err_torch = (ref_lowp.double() - ref_hi.double()).abs().max().item()
    if not err <= 2 * err_torch + floor:  # also fails on NaN
        raise AssertionError(f"{msg}: max error {err:.3e} > 2 * {err_torch:.3e} (plain torch in {actual.dtype}) "
                             f"+ {floor}")


def relative_error(a, b):
    """‖a − b‖ / ‖b‖ in fp64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

"""Expert dropout fused into the grouped GEMMs: a counter-based Philox mask, regenerated wherever it is needed, never
stored.

CLIP-MoE's expert FFN drops the activation before the down-projection: a' = a ⊙ keep / (1 − p). The keep bit of
hidden unit n of flat slot f = t·k + j (token t, choice j) is a pure function of (seed, f·F + n):
    u = Philox4x32-10(counter = (f·F + n as two 32-bit halves, 0, 0), key = seed) word 0 (Triton's tl.randint),
    u' = u as int32, with negative values complemented (u' in [0, 2^31)),
    keep = u' >= threshold,   threshold = round(p · 2^31),
so the mask does not depend on the expert order of the rows, the up-projection's forward, the down-projection's
backward and the dW2 kernel regenerate exactly the same bits, and `dropout_keep_ref` rebuilds them in plain torch
(the exact test oracle). The keep probability is 1 − threshold / 2^31 = 1 − p to within 2^-31. The seed is one int64
drawn from torch's generator of the tensors' device (`dropout_seed`), so a run is reproducible under
torch.manual_seed, CUDA-graph capturable and never synchronises with the host.
"""
import torch
import triton
import triton.language as tl

_TWO_31 = 1 << 31
_MASK32 = 0xFFFFFFFF
# Philox4x32 constants (Salmon et al. 2011; the values tl.randint uses for 32-bit counters).
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def check_dropout_p(dropout_p) -> float:
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def dropout_threshold(dropout_p: float) -> int:
    """The int32 threshold of the keep test for drop probability p."""
    return round(check_dropout_p(dropout_p) * _TWO_31)


def dropout_seed(device: torch.device) -> torch.Tensor:
    """A fresh [1] int64 Philox key from torch's generator of `device` (a device op: no host synchronisation)."""
    return torch.randint(2**62, (1,), device=device, dtype=torch.int64)


@triton.jit
def dropout_keep(seed, flat, cols, F, THRESHOLD):
    """[rows, cols] keep bits of flat slots `flat` (int64 [rows]) x hidden units `cols` ([cols]); F = hidden width."""
    offsets = flat[:, None] * F + cols[None, :]
    u = tl.randint(seed, offsets).to(tl.int32, bitcast=True)
    u = tl.where(u < 0, ~u, u)
    return u >= THRESHOLD


def _umul32(a: torch.Tensor, b: int):
    """(high, low) 32-bit words of a · b for int64 tensors a and an int b, both < 2^32, in int64 arithmetic."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    t_hi, t_lo = a_hi * b, a_lo * b
    high = (t_hi + (t_lo >> 16)) >> 16
    low = (((t_hi & 0xFFFF) << 16) + t_lo) & _MASK32
    return high, low


def philox_randint_ref(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Plain torch twin of tl.randint(seed, offsets) for int64 offsets: int32 word 0 of Philox4x32-10."""
    offsets = offsets.to(torch.int64)
    c0, c1 = offsets & _MASK32, (offsets >> 32) & _MASK32
    c2 = c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _umul32(c2, _ROUND_B)
        hi_a, lo_a = _umul32(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return torch.where(c0 >= _TWO_31, c0 - (1 << 32), c0).to(torch.int32)


def dropout_keep_ref(seed, num_slots: int, hidden: int, dropout_p: float, first_slot: int = 0) -> torch.Tensor:
    """[num_slots, hidden] bool keep mask of flat slots first_slot.. first_slot+num_slots-1 (seed: int or a [1]
    tensor)."""
    seed = int(seed) if not isinstance(seed, torch.Tensor) else int(seed.reshape(-1)[0])
    slots = torch.arange(first_slot, first_slot + num_slots, dtype=torch.int64)
    offsets = slots[:, None] * hidden + torch.arange(hidden, dtype=torch.int64)
    u = philox_randint_ref(seed, offsets)
    u = torch.where(u < 0, ~u, u)
    return u >= dropout_threshold(dropout_p)

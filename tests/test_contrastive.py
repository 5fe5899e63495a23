"""Contrastive loss: open_clip ClipLoss equivalence, label smoothing by hand, and a real 2-process gloo run that must
match one process on the global batch (loss, feature gradients, DDP parameter gradients)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from clipmoe.train.contrastive import FIXED_LOGIT_SCALE, ContrastiveLoss, clip_contrastive_loss
from tests.dist_utils import run_gloo
from tests.tolerances import assert_close

WORLD = 2
LOCAL_BATCH = 4
DIM = 6


def _features(n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    return img, txt


# --------------------------------------------------------------------------------------------- single process
@pytest.mark.parametrize("n, d", [(1, 4), (8, 16), (33, 7)])  # batch of one; square-ish; odd sizes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_open_clip(n, d, dtype):
    from open_clip.loss import ClipLoss
    img, txt = _features(n, d, dtype)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=dtype)
    inputs = [t.clone().requires_grad_() for t in (img, txt, log_scale)]
    ref_inputs = [t.clone().requires_grad_() for t in (img, txt, log_scale)]
    ours = ContrastiveLoss()(inputs[0], inputs[1], inputs[2].exp())
    ref = ClipLoss()(ref_inputs[0], ref_inputs[1], ref_inputs[2].exp())
    assert_close(ours, ref)
    ours.backward()
    ref.backward()
    for a, b in zip(inputs, ref_inputs, strict=True):
        assert_close(a.grad, b.grad)


def test_logit_bias_and_output_dict_match_open_clip():
    from open_clip.loss import ClipLoss
    img, txt = _features(5, 8)
    ours = ContrastiveLoss()(img, txt, 10.0, logit_bias=-1.5, output_dict=True)
    ref = ClipLoss()(img, txt, 10.0, logit_bias=-1.5, output_dict=True)
    assert ours.keys() == ref.keys()
    assert_close(ours["contrastive_loss"], ref["contrastive_loss"])


def test_label_smoothing_by_hand():
    eps, scale = 0.1, FIXED_LOGIT_SCALE
    img, txt = _features(6, 5, torch.float64)
    logits = scale * img @ txt.T

    def smoothed_ce(lg):  # (1 − ε)·(−log p_ii) + ε·mean_j(−log p_ij), mean over rows
        logp = lg.log_softmax(dim=1)
        return ((1 - eps) * -logp.diagonal() + eps * -logp.mean(dim=1)).mean()

    expected = (smoothed_ce(logits) + smoothed_ce(logits.T)) / 2
    got = ContrastiveLoss(logit_scale=FIXED_LOGIT_SCALE, label_smoothing=eps)(img, txt)
    assert_close(got, expected)
    assert not torch.allclose(got, ContrastiveLoss(logit_scale=scale)(img, txt))  # smoothing does change the value


def test_fixed_scale_and_override():
    img, txt = _features(4, 3)
    fixed = ContrastiveLoss(logit_scale=FIXED_LOGIT_SCALE)
    assert_close(fixed(img, txt), clip_contrastive_loss(img, txt, 100.0))
    assert_close(fixed(img, txt, 5.0), clip_contrastive_loss(img, txt, 5.0))  # a per-call scale wins


@pytest.mark.parametrize("call, match", [
    (lambda: ContrastiveLoss()(torch.randn(3, 4), torch.randn(3, 4)), "no logit_scale"),
    (lambda: clip_contrastive_loss(torch.randn(3, 4), torch.randn(2, 4), 1.0), "equal shapes"),
    (lambda: clip_contrastive_loss(torch.randn(3), torch.randn(3), 1.0), r"\[B, D\]"),
    (lambda: ContrastiveLoss(label_smoothing=1.0), "label_smoothing"),
    (lambda: ContrastiveLoss(logit_scale=0.0), "logit_scale"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------------------------- 2 processes (gloo)

class _Tower(nn.Module):  # stands in for the two CLIP towers: a linear map each, then L2 normalisation
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.image = nn.Linear(DIM, DIM)
        self.text = nn.Linear(DIM, DIM)

    def forward(self, x_img, x_txt):
        return F.normalize(self.image(x_img), dim=1), F.normalize(self.text(x_txt), dim=1)


def _global_inputs():
    return _features(WORLD * LOCAL_BATCH, DIM, seed=3)


REFERENCE_CASES = {  # name -> (ContrastiveLoss options, logit_scale, logit_bias)
    "plain": (dict(), 10.0, None),
    "official": (dict(logit_scale=FIXED_LOGIT_SCALE, label_smoothing=0.1), None, None),
}
DIST_CASES = {  # name -> (options, logit_scale, logit_bias, reference case)
    "plain_local": (dict(), 10.0, None, "plain"),
    "plain_global": (dict(local_loss=False), 10.0, None, "plain"),
    "official": (dict(logit_scale=FIXED_LOGIT_SCALE, label_smoothing=0.1), None, None, "official"),
}


def _single_process_reference():
    """Loss, feature gradients and tower parameter gradients of one process on the global batch."""
    img, txt = (t.clone().requires_grad_() for t in _global_inputs())
    out = {}
    for name, (kw, scale, bias) in REFERENCE_CASES.items():
        img.grad = txt.grad = None
        loss = ContrastiveLoss(**kw)(img, txt, scale, logit_bias=bias)
        loss.backward()
        out[name] = (loss.detach(), img.grad.clone(), txt.grad.clone())
    tower = _Tower()
    x_img, x_txt = _global_inputs()
    ContrastiveLoss(logit_scale=FIXED_LOGIT_SCALE, label_smoothing=0.1)(*tower(x_img, x_txt)).backward()
    out["tower_grads"] = {k: p.grad.clone() for k, p in tower.named_parameters()}
    return out


def _worker(rank):
    from open_clip.loss import ClipLoss
    from torch.nn.parallel import DistributedDataParallel
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    g_img, g_txt = _global_inputs()
    result = {}
    for name, (kw, scale, bias, _) in DIST_CASES.items():
        img, txt = g_img[rows].clone().requires_grad_(), g_txt[rows].clone().requires_grad_()
        loss = ContrastiveLoss(**kw)(img, txt, scale, logit_bias=bias)
        loss.backward()
        result[name] = (loss.detach(), img.grad.clone(), txt.grad.clone())
    result["open_clip"] = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD)(
        g_img[rows], g_txt[rows], 10.0)
    # DDP: averaged parameter gradients must equal one process on the global batch.
    tower = DistributedDataParallel(_Tower())
    ContrastiveLoss(logit_scale=FIXED_LOGIT_SCALE, label_smoothing=0.1)(*tower(g_img[rows], g_txt[rows])).backward()
    result["tower_grads"] = {k.removeprefix("module."): p.grad.clone() for k, p in tower.named_parameters()}
    return result


def test_two_process_gloo_matches_single_process(tmp_path):
    results = run_gloo(_worker, WORLD, tmp_path)
    ref = _single_process_reference()
    for r, res in enumerate(results):
        rows = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
        for name, (kw, _, _, ref_name) in DIST_CASES.items():
            loss, g_img, g_txt = res[name]
            ref_loss, ref_img, ref_txt = ref[ref_name]
            if kw.get("local_loss") is False:  # every rank computes the whole global loss
                assert_close(loss, ref_loss, msg=f"rank {r} {name} loss")
            # The gradient reaching rank r's rows sums every rank's loss: W × the single-process gradient
            # (DDP's averaging divides by W again, see tower_grads).
            assert_close(g_img, WORLD * ref_img[rows], msg=f"rank {r} {name} image grad")
            assert_close(g_txt, WORLD * ref_txt[rows], msg=f"rank {r} {name} text grad")
        for k, g in res["tower_grads"].items():
            assert_close(g, ref["tower_grads"][k], msg=f"rank {r} DDP grad {k}")
    for name, ref_name in [("plain_local", "plain"), ("official", "official")]:  # local losses average to the global
        mean = sum(res[name][0] for res in results) / WORLD
        assert_close(mean, ref[ref_name][0], msg=f"{name} mean loss")
    for r in range(WORLD):  # and match open_clip's ClipLoss(local_loss, gather_with_grad) under the same world
        assert_close(results[r]["plain_local"][0], results[r]["open_clip"], msg=f"rank {r} vs open_clip")

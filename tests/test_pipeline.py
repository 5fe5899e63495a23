"""The DMU pipeline on a tiny real open_clip model: FFN-only MCL stages, assembly, router training, baselines,
and a 2-process gloo MCL stage against one process with the same global batch (and the same random augmentation)."""
import json
import math
import os
import random
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import Dataset, TensorDataset

from clipmoe import MoEFFN
from clipmoe.data.datasets import CsvCaptionDataset
from clipmoe.data.sampler import ClusterBatchSampler
from clipmoe.models import create_model
from clipmoe.train.distributed import DistInfo, init_distributed, sum_over_ranks
from clipmoe.train.dmu import (
    build_clip_moe,
    contrastive_loss,
    ffn_state_dicts,
    finetune_baseline,
    load_ffns,
    run_mcl,
    train_router,
)
from clipmoe.train.loop import SeededDraws, TrainConfig, draw_keys, draw_seed, read_metrics, train
from tests.dist_utils import free_port, run_gloo
from tests.tolerances import TOLERANCES, assert_close

CPU = DistInfo()


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return create_model("clipmoe-tiny")[0]


def random_dataset(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(1, 49407, (n, 32), generator=g))


class Augmented(Dataset):
    """random_dataset with a random augmentation: noise drawn from torch's global RNG on every read, as torchvision's
    random crops draw (train() seeds that RNG per sample draw)."""

    def __init__(self, n=48, seed=0):
        self.data = random_dataset(n, seed)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        image, text = self.data[index]
        return image + 0.5 * torch.randn(image.shape), text


def small_cfg(**kw):
    return TrainConfig(**{"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 1, "batch_size": 8, "max_steps": 3,
                          "checkpoint_every": 2, **kw})


def test_mcl_stage_changes_only_ffn_parameters(tmp_path):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    labels = torch.arange(48) % 3
    sampler = ClusterBatchSampler(labels, 8, world_size=1, rank=0, small_cluster="drop")
    train(model, random_dataset(), sampler, contrastive_loss(small_cfg()), small_cfg(), tmp_path, trainable="ffn",
          info=CPU)
    changed_ffn = 0
    for name, p in model.named_parameters():
        if ".mlp." in name:
            changed_ffn += not torch.equal(p, before[name])
        else:  # logit_scale included: "auto" keeps the model's own, frozen
            assert torch.equal(p, before[name]), f"{name} changed in an FFN-only stage"
    assert changed_ffn == sum(".mlp." in n for n in before)


@pytest.mark.parametrize("logit_scale", [100.0, None])
def test_logit_scale_number_fixes_it_and_none_trains_it(tmp_path, logit_scale):
    model = tiny_model()
    before = model.logit_scale.item()
    cfg = small_cfg(logit_scale=logit_scale)
    sampler = ClusterBatchSampler(None, 8, num_samples=48, world_size=1, rank=0)
    summary = train(model, random_dataset(), sampler, contrastive_loss(cfg), cfg, tmp_path, trainable="all",
                    info=CPU)
    if logit_scale is None:
        assert model.logit_scale.item() != before and summary["logit_scale"] is None
    else:
        assert model.logit_scale.item() == pytest.approx(math.log(logit_scale))
        assert summary["logit_scale"] == logit_scale


def test_assembly_puts_stage_j_ffn_into_expert_j():
    base = tiny_model()
    stages = []
    for j in range(3):
        ffns = ffn_state_dicts(base)
        stages.append({name: {k: v + j for k, v in sd.items()} for name, sd in ffns.items()})
    moe = build_clip_moe(base, stages, top_k=2)
    blocks = [m for m in moe.modules() if isinstance(m, MoEFFN)]
    assert len(blocks) == len(stages[0]) == 4  # 2 vision + 2 text blocks
    for name, block in ((n, m) for n, m in moe.named_modules() if isinstance(m, MoEFFN)):
        assert block.num_experts == 3 and block.top_k == 2
        for j in range(3):
            assert torch.equal(block.w1[j], stages[j][name]["c_fc.weight"])
            assert torch.equal(block.b2[j], stages[j][name]["c_proj.bias"])
    assert not any(isinstance(m, MoEFFN) for m in base.modules())  # base untouched
    with pytest.raises(ValueError, match="lacks the FFN"):
        build_clip_moe(base, [stages[0], {}])


def test_run_mcl_router_training_and_baselines(tmp_path):
    base, data = tiny_model(), random_dataset(72)
    cfg = small_cfg(max_steps=2)
    ffns = run_mcl(base, data, cfg, tmp_path / "mcl", CPU, stages=2, clusters=2, small_cluster="remainder")
    assert len(ffns) == 3
    for s in range(3):
        assert (tmp_path / "mcl" / f"stage_{s}" / "ffn.safetensors").exists()
    labels = torch.load(tmp_path / "mcl" / "labels_1.pt")
    assert labels.shape == (72,) and labels.max() < 16  # two stages of 2x2 joint clusters
    reloaded = load_ffns(tmp_path / "mcl" / "stage_2" / "ffn.safetensors", base)
    name = next(iter(reloaded))
    assert torch.equal(reloaded[name]["c_fc.weight"], ffns[2][name]["c_fc.weight"])
    assert not torch.equal(ffns[1][name]["c_fc.weight"], ffns[0][name]["c_fc.weight"])

    moe = build_clip_moe(base, ffns, top_k=2)
    experts_before = {n: p.detach().clone() for n, p in moe.named_parameters()
                      if not n.endswith("router.weight") and n != "logit_scale"}
    routers_before = {n: p.detach().clone() for n, p in moe.named_parameters() if n.endswith("router.weight")}
    summary = train_router(moe, data, small_cfg(max_steps=2), tmp_path / "router", CPU)
    assert summary["steps"] == 2 and summary["final"]["balance_loss"] > 0
    for n, p in moe.named_parameters():
        if n in experts_before:
            assert torch.equal(p, experts_before[n]), n
        elif n in routers_before:
            assert not torch.equal(p, routers_before[n]), n

    for method in ("direct", "sparse_upcycling", "wo_mcl"):
        model = finetune_baseline(method, base, data, small_cfg(max_steps=1), tmp_path / method, CPU, num_experts=3)
        moes = [m for m in model.modules() if isinstance(m, MoEFFN)]
        assert len(moes) == {"direct": 0, "sparse_upcycling": 4, "wo_mcl": 4}[method]
        if method == "wo_mcl":
            assert moes[0].num_experts == 2



def _mcl_stage_worker(rank, world_size, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    model = tiny_model()
    cfg = small_cfg()
    labels = torch.arange(48) % 2
    sampler = ClusterBatchSampler(labels, cfg.batch_size // world_size, world_size=world_size, rank=rank)
    train(model, Augmented(), sampler, contrastive_loss(cfg), cfg, out_dir, trainable="ffn", info=info)
    if rank == 0:
        torch.save(ffn_state_dicts(model), os.path.join(out_dir, "ffns.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_draws_are_named_by_the_slot_in_the_global_batch_not_the_rank():
    labels = torch.arange(48) % 3
    one = list(ClusterBatchSampler(labels, 8, world_size=1, rank=0, seed=5))
    ranks = [list(ClusterBatchSampler(labels, 4, world_size=2, rank=r, seed=5)) for r in range(2)]
    single = list(draw_keys(one, seed=7, first_step=10, rank=0))
    # Rank r holds chunk r of each global batch: its keys are those one process uses for these samples.
    joined = [k0 + k1 for k0, k1 in zip(*(draw_keys(b, seed=7, first_step=10, rank=r) for r, b in enumerate(ranks)),
                                        strict=True)]
    assert joined == single
    assert len({seed for batch in single for seed, _ in batch}) == sum(len(b) for b in single)  # all distinct
    # One process draws what it drew before the rank left the formula (then: seeds of rank 0 at its batch slot),
    # so seeded single-process results (the README's) are unchanged.
    def rank_formula(seed, rank, step, slot):
        return (((seed * 1_000_003 + rank) * 1_000_000_007 + step) * 1_000_033 + slot) % (2 ** 63)
    assert single == [[(rank_formula(7, 0, 10 + b, j), i) for j, i in enumerate(batch)] for b, batch in enumerate(one)]


class PythonAugmented(Augmented):
    """Augmented plus a shift drawn from Python's RNG (as torchvision's RandomApply / RandomChoice draw)."""

    def __getitem__(self, index):
        image, text = super().__getitem__(index)
        return torch.roll(image, random.randint(0, 3), dims=2), text


def test_a_batch_of_draws_reads_each_sample_as_its_own_seeded_read():
    data, keys = PythonAugmented(), [(draw_seed(7, 3, j), i) for j, i in enumerate([5, 0, 5, 47])]
    torch.manual_seed(1)
    random.seed(1)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    got = SeededDraws(data).__getitems__(keys)  # what the DataLoader calls with a batch of keys
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state  # restored
    for (seed, index), (image, text) in zip(keys, got, strict=True):
        torch.manual_seed(seed)
        random.seed(seed)
        want_image, want_text = data[index]
        assert torch.equal(image, want_image) and torch.equal(text, want_text)
    assert not torch.equal(got[0][0], got[2][0])  # the same index drawn twice: two augmentations
    assert torch.equal(SeededDraws(data)[keys[1]][0], got[1][0])


def test_train_seeds_torch_globally_once_per_batch_not_per_sample(tmp_path, monkeypatch):
    """torch.manual_seed also seeds the accelerators; on a CUDA build whose GPU is not initialised it formats the
    Python stack (0.1-0.3 ms): once per sample it was about 40 % of a demo training step. The draws seed the CPU
    generator; the batch's last draw seed still reaches the accelerators' generators, as it did."""
    model, cfg = tiny_model(), small_cfg()
    sampler = ClusterBatchSampler(None, cfg.batch_size, num_samples=48, world_size=1, rank=0)
    seeds, manual_seed = [], torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda seed: seeds.append(seed) or manual_seed(seed))
    train(model, PythonAugmented(), sampler, contrastive_loss(cfg), cfg, tmp_path, trainable="ffn", info=CPU)
    last_slot = cfg.batch_size - 1
    assert seeds == [cfg.seed] + [draw_seed(cfg.seed, step, last_slot) for step in range(cfg.max_steps)]


def test_two_process_gloo_mcl_stage_matches_single_process(tmp_path):
    single = tmp_path / "single"
    _mcl_stage_worker(0, 1, free_port(), str(single))
    double = tmp_path / "double"
    mp.spawn(_mcl_stage_worker, args=(2, free_port(), str(double)), nprocs=2, join=True)
    want, got = torch.load(single / "ffns.pt"), torch.load(double / "ffns.pt")
    # Two ranks sum the gradient in another order than one process, and AdamW divides each gradient element by its
    # own magnitude: an element whose gradient is at rounding level may move by up to lr per step, in either
    # direction (seen: 1 element of 65536 off by 4.8e-4 on one machine, none on another). So every element must lie
    # within that bound, and all but a few in 10^4 within the table's tolerance: a missing all-reduce or a wrong
    # shard of the batch would move most elements.
    cfg = small_cfg()
    tol = TOLERANCES[torch.float32]
    for name in want:
        for key in want[name]:
            a, b = got[name][key], want[name][key]
            off = ~torch.isclose(a, b, atol=tol["atol"], rtol=tol["rtol"])
            assert off.float().mean() <= 3e-4, f"{name}.{key}: {int(off.sum())} of {off.numel()} elements differ"
            torch.testing.assert_close(a, b, atol=2 * cfg.lr * cfg.max_steps, rtol=0, msg=f"{name}.{key}")
    assert any(not torch.equal(want[n]["c_fc.weight"], ffn["c_fc.weight"])
               for n, ffn in ffn_state_dicts(tiny_model()).items())  # the stage did train
    # The logged losses are the global means: those of one process on the same global batches.
    single_log, double_log = read_metrics(single / "metrics.jsonl"), read_metrics(double / "metrics.jsonl")
    assert [r["step"] for r in double_log] == [r["step"] for r in single_log] == [1, 2, 3]
    for key in ("loss", "clip_loss"):
        assert_close(torch.tensor([r[key] for r in double_log]), torch.tensor([r[key] for r in single_log]),
                     msg=key)


def _skip_count_worker(rank, table, out_dir):
    info = init_distributed("cpu")  # run_gloo's process group, or one process
    torch.manual_seed(0)
    model, preprocess, _, tokenizer = create_model("clipmoe-tiny")
    data = CsvCaptionDataset(table, preprocess, tokenizer, on_error="substitute", max_bad_fraction=0.2)
    cfg = small_cfg(max_steps=None)  # one epoch: every sample is read once
    sampler = ClusterBatchSampler(None, cfg.batch_size // info.world_size, num_samples=len(data),
                                  world_size=info.world_size, rank=info.rank)
    summary = train(model, data, sampler, contrastive_loss(cfg), cfg, out_dir, trainable="ffn", info=info)
    logged = read_metrics(Path(out_dir) / "metrics.jsonl") if info.is_main else []  # the main rank writes them
    # and the count the CLI prints at the end: each rank's own reads, summed
    return summary["skipped_samples"], [r["skipped_samples"] for r in logged], sum_over_ranks([data.num_skipped], info)


def test_bad_samples_are_counted_over_all_ranks(tmp_path):
    from PIL import Image
    rows = []
    for i in range(32):
        if i not in (3, 12, 25):  # three rows name images that are not there: substituted and counted where read
            Image.new("RGB", (8, 8), (8 * i, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(f"{tmp_path / f'{i}.png'}\ta square number {i}")
    table = tmp_path / "train.tsv"
    table.write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    single = _skip_count_worker(0, str(table), str(tmp_path / "one"))
    assert single[0] == single[1][-1] == 3 and len(single[1]) == 4 and single[2] == [3]
    (summary, logged, cli_count), (other_summary, _, other_cli_count) = run_gloo(
        _skip_count_worker, 2, tmp_path, str(table), str(tmp_path / "two"))
    assert summary == other_summary == logged[-1] == 3 and len(logged) == 4
    assert cli_count == other_cli_count == [3]


def _timeout_worker(rank, world_size, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    init_distributed("cpu", timeout_seconds=2)
    if rank == 1:  # a rank that stops answering
        time.sleep(6)
        os._exit(0)
    start = time.time()
    try:
        torch.distributed.barrier()
        outcome = "returned"
    except RuntimeError as exc:
        outcome = f"raised: {exc}"[:200]
    with open(os.path.join(out_dir, "rank0.json"), "w") as f:
        json.dump({"seconds": time.time() - start, "outcome": outcome}, f)
    os._exit(0)  # no process-group teardown with a peer that is gone


def test_dist_timeout_bounds_the_wait_for_a_stopped_rank(tmp_path):
    mp.spawn(_timeout_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["outcome"].startswith("raised") and result["seconds"] < 5, result

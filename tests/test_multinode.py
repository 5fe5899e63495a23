"""Distributed MCL passes: embedding split over ranks and clustered in place on fp16 features (within 1 % of the
fp32 k-means inertia), and `clipmoe mcl` under `torchrun --nnodes 2` (c10d rendezvous, two node groups of one
process over loopback, gloo) giving the same result as one process."""
import json
import os
import subprocess

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file

from clipmoe.data.synthetic import SyntheticShapes
from clipmoe.models import create_model
from clipmoe.train.cluster import assign, kmeans
from clipmoe.train.distributed import DistInfo, init_distributed
from clipmoe.train.dmu import cluster_dataset, embed_dataset, rank_block
from tests.dist_utils import free_port
from tests.test_cli_pipeline import clipmoe_cmd, run
from tests.tolerances import TOLERANCES, assert_close


def inertia(features: torch.Tensor, centroids: torch.Tensor) -> float:
    """Σ min_j ‖x − c_j‖² over the L2-normalised fp32 rows (the k-means objective)."""
    x = F.normalize(features.double(), dim=1)
    c = centroids.double()
    return float(((x - c[assign(x, c)]) ** 2).sum())


@pytest.mark.parametrize("spread", [0.3, None])  # weakly clustered rows; rows with no cluster structure at all
def test_fp16_features_keep_the_kmeans_inertia_within_1_percent(spread):
    g = torch.Generator().manual_seed(0)
    n, d, k = 8192, 768, 3
    if spread is None:
        x = torch.randn(n, d, generator=g)
    else:
        centres = F.normalize(torch.randn(k, d, generator=g), dim=1)
        x = centres[torch.randint(k, (n,), generator=g)] + spread * torch.randn(n, d, generator=g) / d ** 0.5
    x = F.normalize(x, dim=1)
    full, _ = kmeans(x, k, seed=1)
    half, _ = kmeans(x.half(), k, seed=1)
    assert half.dtype == torch.float32
    ratio = inertia(x, half) / inertia(x, full)
    assert ratio <= 1.01, ratio


def tiny_model():
    torch.manual_seed(0)
    return create_model("clipmoe-tiny")[0]


def _cluster_worker(rank, world_size, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    data = SyntheticShapes(90, seed=3)
    model = tiny_model()
    own_image, own_text = embed_dataset(model, data, info, batch_size=16, gather=False)
    image, text = embed_dataset(model, data, info, batch_size=16)
    labels = cluster_dataset(model, data, info, clusters=3, seed=7, batch_size=16)
    block = rank_block(len(data), info)
    torch.save({"own": len(own_image), "image": image, "text": text, "labels": labels,
                "block": own_image.float() - image[block.start:block.stop].float()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_embedding_is_split_over_ranks_and_clustered_in_place(tmp_path):
    mp.spawn(_cluster_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    data, model = SyntheticShapes(90, seed=3), tiny_model()
    image, text = embed_dataset(model, data, DistInfo(), batch_size=16)
    labels = cluster_dataset(model, data, DistInfo(), clusters=3, seed=7, batch_size=16)
    assert image.dtype == torch.float16 and image.shape[0] == 90
    assert [r["own"] for r in ranks] == [45, 45]  # each rank embedded its own block only
    for r in ranks:
        assert torch.equal(r["block"], torch.zeros_like(r["block"]))  # the gathered rows are the ranks' blocks
        # fp16 rows of fp32 features computed in other batches (45 + 45 rows vs 90): within one fp16 rounding step
        torch.testing.assert_close(r["image"], image, atol=1e-3, rtol=0)
        torch.testing.assert_close(r["text"], text, atol=1e-3, rtol=0)
        assert torch.equal(r["labels"], labels)
    assert len(labels.unique()) > 1


# ----------------------------------------------------------------------------------------------------- torchrun
# --small-cluster drop (the default): with "remainder" the plan depends on the world size (a cluster's tail of odd
# length is one process's batch but cannot be split over 2 ranks), so only "drop" has one process's batches on 2 ranks.
MCL = ["mcl", "--model", "clipmoe-tiny", "--batch-size", "16", "--stages", "2", "--max-steps", "3", "--warmup", "1",
       "--lr", "1e-4", "--deterministic", "--device", "cpu"]


def torchrun(*args, nodes: int, port: int) -> list:
    """`torchrun` with 2 processes in all: one node group of 2 (--standalone), or 2 node groups of 1 that meet at a
    c10d rendezvous on loopback (as two machines would). Returns each group's (return code, output)."""
    cmd = clipmoe_cmd(*args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    launch = [cmd[0], "-m", "torch.distributed.run"]
    if nodes == 1:
        groups = [[*launch, "--standalone", "--nproc-per-node", "2"]]
    else:
        groups = [[*launch, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                   f"127.0.0.1:{port}", "--rdzv-id", "clipmoe-test", "--rdzv-conf", f"is_host={str(g == 0).lower()}",
                   "--local-addr", "127.0.0.1"] for g in range(2)]
    procs = [subprocess.Popen([*group, "--no-python", *cmd], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for group in groups]
    return [(proc.wait(timeout=600), proc.communicate()[0]) for proc in procs]


def jsonl(path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mcl_on_two_node_groups_equals_one_node_and_one_process(tmp_path):
    pattern = SyntheticShapes(128, seed=0).write_webdataset(tmp_path / "wds", samples_per_shard=32)
    single = run(*MCL, "--train-data", pattern, "--output-dir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-2000:]
    for nodes in (1, 2):
        groups = torchrun(*MCL, "--train-data", pattern, "--output-dir", str(tmp_path / f"nodes{nodes}"),
                          nodes=nodes, port=free_port())
        assert [rc for rc, _ in groups] == [0] * len(groups), "\n".join(log[-3000:] for _, log in groups)
        assert any("world size 2" in log for _, log in groups)
    one, two_nodes, one_node = (tmp_path / d / "mcl" for d in ("one", "nodes2", "nodes1"))

    # Two node groups meeting at a c10d rendezvous are the same 2 ranks as one node group: the same bits.
    for s in range(3):
        want, got = (load_file(d / f"stage_{s}" / "ffn.safetensors") for d in (one_node, two_nodes))
        assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want), s

    # Against one process: the distributed passes (embedding split over ranks, k-means in place) give its labels,
    # hence the same plan of global batches, in which every sample is augmented as one process augments it.
    for s in range(2):
        assert torch.equal(torch.load(two_nodes / f"labels_{s}.pt"), torch.load(one / f"labels_{s}.pt")), s
    plans = [[{k: v for k, v in r.items() if k != "world_size"} for r in jsonl(d / "pipeline.jsonl")
              if "num_batches" in r] for d in (one, two_nodes)]
    assert plans[0] == plans[1] and len(plans[0]) == 2
    # Not bitwise from here on: each rank sums a weight's gradient over its 8 samples and the all-reduce adds the two
    # sums, where one process sums all 16 at once (the same sum in another order, ulps apart); the logged loss is a
    # mean over ranks of local means. AdamW's first steps divide the gradient by |g| + eps, which turns these ulps
    # into up to lr·δg/eps for weights whose |g| is near eps (measured: at most 6e-6 at lr 1e-4, ~95 % of the
    # weights bitwise equal), well inside the fp32 tolerance; different augmentation draws move them by ~5e-4.
    for s in (1, 2):
        want, got = (jsonl(d / f"stage_{s}" / "metrics.jsonl") for d in (one, two_nodes))
        assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3]
        for key in ("epoch", "lr", "skipped_samples"):
            assert [r[key] for r in got] == [r[key] for r in want], (s, key)
        for key in ("loss", "clip_loss", "balance_loss"):
            assert_close(torch.tensor([r[key] for r in got]), torch.tensor([r[key] for r in want]),
                         msg=f"stage {s} {key}")
    base = load_file(one / "stage_0" / "ffn.safetensors")
    for s in range(3):
        want, got = (load_file(d / f"stage_{s}" / "ffn.safetensors") for d in (one, two_nodes))
        assert want.keys() == got.keys()
        for k in want:
            assert_close(got[k], want[k], msg=f"stage {s} {k}")
        if s:  # the stages did train, by more than the tolerance
            assert max((want[k] - base[k]).abs().max().item() for k in want) > 2 * TOLERANCES[torch.float32]["atol"]

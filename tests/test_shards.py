"""Indexed access to webdataset tar shards (clipmoe.data.shards): the same samples as the stream and the source,
an index built once and rebuilt when stale, bad samples and damaged shards counted against max_bad_fraction, the
build split over gloo ranks; and MCL on shards as users run it: the same labels, FFNs and metrics as on the same
data as a TSV, and a kill-and-resume that ends where an uninterrupted run ends."""
import io
import json
import os
import signal
import subprocess
import tarfile
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from clipmoe.data import shards
from clipmoe.data.shards import INDEX_SUFFIX, ShardCaptionDataset
from clipmoe.data.synthetic import SyntheticShapes
from clipmoe.data.webdataset import WebDatasetCaptions
from tests.dist_utils import free_port
from tests.tar_files import write_tar
from tests.test_cli_pipeline import clipmoe_cmd, run


def write_shards(directory, n=40, per_shard=10, seed=0, ext="png"):
    """Synthetic samples as webdataset shards; returns (the dataset, the shard pattern, the shard paths)."""
    ds = SyntheticShapes(n, seed=seed)
    pattern = ds.write_webdataset(directory, samples_per_shard=per_shard, ext=ext)
    paths = sorted(str(p) for p in directory.glob("train-*.tar"))
    return ds, pattern, paths


def png(ds, i):
    buf = io.BytesIO()
    ds.image(i).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------ the index
def test_indexed_shards_match_the_stream_and_the_source(tmp_path):
    ds, pattern, paths = write_shards(tmp_path / "wds", n=40, per_shard=12)
    data = ShardCaptionDataset(pattern, tokenizer=ds.tokenizer, with_index=True)
    assert len(data) == 40 and data.num_bad_indexed == 0 and not data.damaged_shards
    for i in (0, 11, 12, 39, 17, 3):  # random access across shard boundaries
        image, tokens, index = data[i]
        assert index == i and torch.equal(image, ds[i][0]) and torch.equal(tokens, ds[i][1])
    streamed = list(WebDatasetCaptions(pattern, tokenizer=ds.tokenizer))
    assert all(torch.equal(a, b[0]) and torch.equal(t, b[1]) for (a, t), b in zip(streamed, data, strict=True))
    assert data.key(13) == "000000013"
    assert all(os.path.isfile(p + INDEX_SUFFIX) for p in paths)
    assert data.index_bytes == 24 * 40 + 8 * (len(paths) + 1)  # arrays only: 24 bytes per sample
    assert len(ShardCaptionDataset(pattern, max_samples=25)) == 25


def test_index_is_built_once_and_rebuilt_when_stale(tmp_path, monkeypatch, caplog):
    ds, pattern, paths = write_shards(tmp_path / "wds", n=20, per_shard=10)
    ShardCaptionDataset(pattern)
    stamps = [os.stat(p + INDEX_SUFFIX).st_mtime_ns for p in paths]

    def no_indexing(*args, **kwargs):
        raise AssertionError("a valid cached index was rebuilt")

    with monkeypatch.context() as m:
        m.setattr(shards, "index_shard", no_indexing)
        again = ShardCaptionDataset(pattern, tokenizer=ds.tokenizer)
    assert [os.stat(p + INDEX_SUFFIX).st_mtime_ns for p in paths] == stamps
    assert torch.equal(again[15][1], ds[15][1])

    other, _, _ = write_shards(tmp_path / "other", n=20, per_shard=10, seed=5)  # new content for shard 0
    os.replace(tmp_path / "other" / "train-000000.tar", paths[0])
    (tmp_path / "wds" / ("train-000001.tar" + INDEX_SUFFIX)).write_bytes(b"not an index")
    rebuilt = ShardCaptionDataset(pattern, tokenizer=ds.tokenizer)
    assert torch.equal(rebuilt[3][0], other[3][0]) and torch.equal(rebuilt[13][1], ds[13][1])
    assert "unreadable shard index" in caplog.text
    with pytest.raises(ValueError, match="needs local shard files"):
        ShardCaptionDataset("https://example.org/data-{000..009}.tar")
    with pytest.raises(FileNotFoundError, match="1 of 3 shard file"):
        ShardCaptionDataset([*paths, str(tmp_path / "missing.tar")])


def test_index_goes_to_a_cache_folder_when_it_cannot_be_written_beside_the_shard(tmp_path, monkeypatch):
    ds, pattern, paths = write_shards(tmp_path / "wds", n=20, per_shard=10)
    explicit = ShardCaptionDataset(pattern, index_dir=tmp_path / "idx")
    assert len(os.listdir(tmp_path / "idx")) == 2 and not any(os.path.exists(p + INDEX_SUFFIX) for p in paths)
    assert len(explicit) == 20

    monkeypatch.setenv("CLIPMOE_CACHE", str(tmp_path / "cache"))
    os.mkdir(paths[0] + INDEX_SUFFIX)  # the index's place beside the shard is taken: writing there fails
    data = ShardCaptionDataset(pattern, tokenizer=ds.tokenizer)
    cached = os.listdir(tmp_path / "cache" / "shard-index")
    assert len(cached) == 1 and cached[0].endswith("train-000000.tar" + INDEX_SUFFIX)
    assert torch.equal(data[4][1], ds[4][1])
    assert os.path.isfile(paths[1] + INDEX_SUFFIX)  # the writable place is still used for the others


def test_the_stream_is_split_by_webdataset_node_then_worker(tmp_path, monkeypatch):
    ds, pattern, _ = write_shards(tmp_path / "wds", n=40, per_shard=10)
    monkeypatch.setenv("RANK", "1")  # what torchrun sets; webdataset's split_by_node reads it
    monkeypatch.setenv("WORLD_SIZE", "2")
    captions = [c for _, c in WebDatasetCaptions(pattern)]
    assert captions == ds.captions[10:20] + ds.captions[30:40]  # shards 1 and 3
    shuffled = [c for _, c in WebDatasetCaptions(pattern, shuffle_shards=True, shuffle_buffer=8, seed=3)]
    shard_of = {c: i // 10 for i, c in enumerate(ds.captions)}
    picked = sorted({shard_of[c] for c in shuffled})  # two whole shards of the seeded shard order, samples shuffled
    assert len(picked) == 2 and sorted(shuffled) == sorted(c for c in ds.captions if shard_of[c] in picked)
    assert shuffled != [c for c in ds.captions if shard_of[c] in picked]


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_samples_are_counted_while_indexing_and_on_access(tmp_path, caplog):
    ds = SyntheticShapes(10, seed=1)
    samples = [(f"{i:03d}", {"png": png(ds, i), "txt": ds.captions[i].encode()}) for i in range(10)]
    del samples[2][1]["txt"]
    samples[5][1]["txt"] = b"  \n"
    samples[7][1]["png"] = b"not a png"
    shard = write_tar(tmp_path / "bad.tar", samples)

    data = ShardCaptionDataset(shard, max_bad_fraction=0.5, on_error="substitute", with_index=True)
    assert len(data) == 8 and data.num_bad_indexed == 2
    assert "2 of 10 samples are bad" in caplog.text and "bad.tar:002: no .txt member" in caplog.text
    keys = [data.key(i) for i in range(8)]
    assert keys == ["000", "001", "003", "004", "006", "007", "008", "009"]
    _, caption, index = data[5]  # key 007, whose image is broken: the next sample is substituted, and counted
    assert index == 6 and caption == ds.captions[8] and data.num_skipped == 1
    assert data.bad_samples[5].startswith("unreadable image")
    with pytest.raises(ValueError, match=r"bad\.tar: 2 of 10 samples are bad, more than max_bad_fraction=0.01"):
        ShardCaptionDataset(shard)
    with pytest.raises(ValueError, match="bad.tar:007: unreadable image"):
        ShardCaptionDataset(shard, max_bad_fraction=0.5, on_error="raise")[5]


def test_a_truncated_shard_is_counted_not_lost_silently(tmp_path):
    ds, pattern, paths = write_shards(tmp_path / "wds", n=40, per_shard=10)
    with tarfile.open(paths[1]) as tar:
        image = tar.getmembers()[3 * 5]  # the png of the sixth sample
    whole = open(paths[1], "rb").read()
    with open(paths[1], "wb") as f:
        f.write(whole[:image.offset_data + image.size // 2])  # an interrupted download

    with pytest.raises(ValueError, match=r"train-000001.tar: truncated: member .* ends at byte \d+, the file has "
                                         r"\d+; 1 of 4 shards are damaged, more than max_bad_fraction=0.01"):
        ShardCaptionDataset(pattern)
    data = ShardCaptionDataset(pattern, tokenizer=ds.tokenizer, max_bad_fraction=0.25)
    kept = len(data) - 30
    assert kept == 5 and data.num_bad_indexed == 1 and list(data.damaged_shards) == [paths[1]]
    assert torch.equal(data[10 + kept][1], ds[20][1])  # the shards after it are indexed as before
    # The stream (and its in-memory to_indexed) counts the damaged shard too, instead of yielding fewer samples.
    with pytest.raises(ValueError, match="train-000001.tar: cannot read the whole shard .* 1 of 2 shards read so far"):
        list(WebDatasetCaptions(pattern))
    with pytest.raises(ValueError, match="1 of 4 shards read so far are damaged"):
        WebDatasetCaptions(pattern).to_indexed()
    assert len(list(WebDatasetCaptions(pattern, max_bad_fraction=0.5))) == 30 + kept

    # Cut exactly after a sample (no member is cut): the missing end-of-archive marker gives it away.
    with tarfile.open(paths[2]) as tar:
        members = tar.getmembers()
    cut = members[3 * 4 - 1].offset_data + members[3 * 4 - 1].size  # after 4 whole samples (png, txt, json)
    cut += -cut % 512
    data = open(paths[2], "rb").read()[:cut]
    open(paths[2], "wb").write(data)
    damaged = ShardCaptionDataset(pattern, max_bad_fraction=0.5).damaged_shards
    assert damaged[paths[2]].startswith("no end-of-archive marker")

    (tmp_path / "junk.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(ValueError, match="junk.tar: not a readable tar file"):
        ShardCaptionDataset(str(tmp_path / "junk.tar"))


# -------------------------------------------------------------------------------------------- distributed build
def _build_worker(rank, world_size, port, pattern, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    built = []
    index_shard = shards.index_shard

    def recording(path, *args):
        built.append(os.path.basename(path))
        return index_shard(path, *args)

    shards.index_shard = recording
    data = ShardCaptionDataset(pattern)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"built": built, "keys": [data.key(i) for i in range(len(data))], "caption": data[33][1]}, f)
    torch.distributed.destroy_process_group()


def test_index_build_is_split_over_ranks(tmp_path):
    _, pattern, paths = write_shards(tmp_path / "wds", n=40, per_shard=10)
    mp.spawn(_build_worker, args=(2, free_port(), pattern, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["built"] == ["train-000000.tar", "train-000002.tar"]
    assert ranks[1]["built"] == ["train-000001.tar", "train-000003.tar"]
    assert all(os.path.isfile(p + INDEX_SUFFIX) for p in paths)
    single = ShardCaptionDataset(pattern)  # from the files the ranks wrote
    keys = [f"{i:09d}" for i in range(40)]
    assert ranks[0]["keys"] == ranks[1]["keys"] == [single.key(i) for i in range(40)] == keys
    assert ranks[0]["caption"] == ranks[1]["caption"] == single[33][1]


# ------------------------------------------------------------------------------------------------- MCL on shards
MCL = ["mcl", "--model", "clipmoe-tiny", "--batch-size", "16", "--stages", "2", "--max-steps", "12", "--warmup", "2",
       "--lr", "1e-4", "--checkpoint-every", "2", "--deterministic", "--device", "cpu", "--small-cluster", "remainder"]


def run_outputs(mcl_dir):
    """What an MCL run leaves that must not depend on the data's format: labels, FFNs, metrics (less timings)."""
    out = {}
    for path in sorted(mcl_dir.rglob("*")):
        name = str(path.relative_to(mcl_dir))
        if path.suffix == ".pt" and path.name.startswith("labels"):
            out[name] = torch.load(path, weights_only=True)
        elif path.suffix == ".safetensors":
            out[name] = load_file(path)
        elif path.suffix == ".jsonl":
            out[name] = [without_timings(json.loads(line)) for line in path.read_text().splitlines()]
    return out


def without_timings(record):
    if isinstance(record, dict):
        return {k: without_timings(v) for k, v in record.items() if k != "seconds"}
    return record


def assert_same_outputs(got, want):
    assert got.keys() == want.keys()
    for name, value in want.items():
        if isinstance(value, dict):
            assert value.keys() == got[name].keys(), name
            assert all(torch.equal(got[name][k], v) for k, v in value.items()), name
        elif isinstance(value, torch.Tensor):
            assert torch.equal(got[name], value), name
        else:
            assert got[name] == value, name


@pytest.fixture(scope="module")
def mcl_data(tmp_path_factory):
    """The same 256 samples as a TSV of PNG files and as 4 webdataset shards, and an MCL run on the shards."""
    root = tmp_path_factory.mktemp("mcl")
    ds = SyntheticShapes(256, seed=0)
    tsv = ds.write_csv(root / "csv", ext="png")
    pattern = ds.write_webdataset(root / "wds", samples_per_shard=64, ext="png")
    whole = run(*MCL, "--train-data", pattern, "--output-dir", str(root / "shards"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    return {"tsv": tsv, "shards": pattern, "outputs": run_outputs(root / "shards" / "mcl")}


def test_mcl_on_shards_equals_mcl_on_the_same_data_as_tsv(mcl_data, tmp_path):
    result = run(*MCL, "--train-data", mcl_data["tsv"], "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    want = run_outputs(tmp_path / "mcl")
    assert {"labels_0.pt", "labels_1.pt", "stage_2/ffn.safetensors", "stage_2/metrics.jsonl"} <= want.keys()
    assert_same_outputs(mcl_data["outputs"], want)


def test_mcl_on_shards_killed_mid_stage_resumes_to_the_same_result(mcl_data, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [*MCL, "--train-data", mcl_data["shards"], "--output-dir", str(tmp_path)]
    proc = subprocess.Popen(clipmoe_cmd(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "mcl" / "stage_2" / "train_state.pt"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists(), "the run ended before stage 2 wrote a checkpoint"
    assert not (tmp_path / "mcl" / "stage_2" / "ffn.safetensors").exists(), "killed too late: stage 2 had finished"
    resumed = run(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got, want = run_outputs(tmp_path / "mcl"), dict(mcl_data["outputs"])
    # pipeline.jsonl is an append-only log: a resumed stage logs its cluster summary once more (as for TSV data).
    del got["pipeline.jsonl"], want["pipeline.jsonl"]
    assert_same_outputs(got, want)

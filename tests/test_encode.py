"""`clipmoe encode` (clipmoe.eval.encode): embeddings of a CSV of real image files, a webdataset shard, an image
folder and a captions file equal encode_image / encode_text of the same inputs; bad images are skipped and listed;
a run killed with SIGKILL and started again writes the same files as one run."""
import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipmoe
from clipmoe.cli import main as cli_main
from clipmoe.eval.encode import model_transforms, read_shards
from clipmoe.models import create_model
from tests.tolerances import assert_close, assert_close_lowp

CAPTIONS = ["a red square", "two blue circles", "a small green triangle", "noise", "a photo", "stripes", "a dog",
            "the sea"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(upcycled clipmoe-tiny with distinct experts, its checkpoint folder, preprocess, tokenizer)."""
    torch.manual_seed(0)
    model = create_model("clipmoe-tiny")[0].eval()
    clipmoe.upcycle(model, 4, 2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, clipmoe.MoEFFN):
                m.w1.add_(0.05 * torch.randn_like(m.w1))
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    clipmoe.save_checkpoint(model, folder, architecture="clipmoe-tiny")
    preprocess, tokenizer = model_transforms(model)
    return model, folder, preprocess, tokenizer


def write_images(folder, n, seed=0):
    """n real PNG/JPEG files of different sizes and content."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 256, (20 + 3 * i, 28 + 2 * (i % 4), 3), dtype=np.uint8)
        path = folder / f"img{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def reference(model, preprocess, tokenizer, paths=None, captions=None):
    with torch.no_grad():
        image = None if paths is None else F.normalize(model.encode_image(torch.stack(
            [preprocess(Image.open(p).convert("RGB")) for p in paths])), dim=-1)
        text = None if captions is None else F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
    return image, text


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)


def test_csv_of_images_and_captions(tiny, tmp_path):
    model, ckpt, preprocess, tokenizer = tiny
    paths = write_images(tmp_path / "images", 7)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rows = [[f"images/{p.name}", c] for p, c in zip(paths, CAPTIONS, strict=False)]
    rows.insert(2, ["images/broken.png", "a broken file"])
    rows.insert(5, ["images/missing.png", "a missing file"])
    write_csv(tmp_path / "data.tsv", rows)
    out = tmp_path / "out"
    assert cli_main(["encode", "--checkpoint", str(ckpt), "--data", str(tmp_path / "data.tsv"), "--output", str(out),
                     "--shard-size", "4", "--batch-size", "3", "--workers", "2", "--dtype", "float32",
                     "--device", "cpu"]) == 0
    got = read_shards(out)
    want_image, want_text = reference(model, preprocess, tokenizer, paths, CAPTIONS[:7])
    assert got["image"].dtype == np.float32 and got["image"].shape == (7, 64)
    assert_close(torch.from_numpy(got["image"]), want_image)
    assert_close(torch.from_numpy(got["text"]), want_text)
    assert [row[2] for row in got["metadata"]] == CAPTIONS[:7]  # the same order as the rows
    assert [int(row[0]) for row in got["metadata"]] == [0, 1, 3, 4, 6, 7, 8]  # input positions
    with open(out / "metadata" / "skipped_00000.csv") as f:
        skipped = list(csv.reader(f))[1:]
    with open(out / "metadata" / "skipped_00001.csv") as f:
        skipped += list(csv.reader(f))[1:]
    assert [(int(i), "unreadable" in r or "not found" in r) for i, _, r in skipped] == [(2, True), (5, True)]
    import json
    assert json.loads((out / "encode.json").read_text())["totals"] == {
        "num_shards": 3, "num_encoded_now": 9, "num_skipped": 2, "num_embedded": 7}

    # the default float16 arrays are the same embeddings rounded
    assert cli_main(["encode", "--checkpoint", str(ckpt), "--data", str(tmp_path / "data.tsv"), "--output",
                     str(tmp_path / "fp16"), "--workers", "0", "--device", "cpu", "--format", "safetensors"]) == 0
    half = read_shards(tmp_path / "fp16", fmt="safetensors")
    assert half["image"].dtype == np.float16
    assert_close_lowp(torch.from_numpy(half["image"]), want_image.double(), want_image.half())


def test_webdataset_shard(tiny, tmp_path):
    from clipmoe.data.synthetic import SyntheticShapes
    model, ckpt, preprocess, tokenizer = tiny
    data = SyntheticShapes(6, split="test")
    pattern = data.write_webdataset(tmp_path / "shards", samples_per_shard=4)  # two real tar files
    assert cli_main(["encode", "--checkpoint", str(ckpt), "--data", pattern, "--output", str(tmp_path / "out"),
                     "--workers", "2", "--batch-size", "4", "--dtype", "float32", "--device", "cpu"]) == 0
    got = read_shards(tmp_path / "out")
    with torch.no_grad():
        want_image = F.normalize(model.encode_image(torch.stack([preprocess(data.image(i)) for i in range(6)])), dim=-1)
    assert_close(torch.from_numpy(got["image"]), want_image)
    assert_close(torch.from_numpy(got["text"]), reference(model, preprocess, tokenizer, None, data.captions)[1])
    assert [row[2] for row in got["metadata"]] == list(data.captions)


def test_image_folder_and_captions_file_and_hf_folder(tiny, tmp_path):
    model, ckpt, preprocess, tokenizer = tiny
    paths = write_images(tmp_path / "images" / "sub", 3) + write_images(tmp_path / "images", 2, seed=1)
    paths = sorted(paths)
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS[:4]) + "\n\n")
    assert cli_main(["convert", "--to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    want_image, want_text = reference(model, preprocess, tokenizer, paths, CAPTIONS[:4])
    for source in (ckpt, tmp_path / "hf"):  # the clipmoe checkpoint and the same model as a transformers folder
        out = tmp_path / f"folder-{source.name}"
        assert cli_main(["encode", "--checkpoint", str(source), "--model", "clipmoe-tiny", "--data",
                         str(tmp_path / "images"), "--output", str(out), "--dtype", "float32", "--workers", "0",
                         "--device", "cpu"]) == 0
        got = read_shards(out)
        assert got["text"] == [] and [row[1] for row in got["metadata"]] == [str(p) for p in paths]
        assert_close(torch.from_numpy(got["image"]), want_image)
        out = tmp_path / f"captions-{source.name}"
        assert cli_main(["encode", "--checkpoint", str(source), "--data", str(tmp_path / "captions.txt"),
                         "--output", str(out), "--dtype", "float32", "--workers", "0", "--device", "cpu"]) == 0
        assert_close(torch.from_numpy(read_shards(out)["text"]), want_text)


def test_parquet_metadata(tiny, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    model, ckpt, preprocess, tokenizer = tiny
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    out = tmp_path / "out"
    assert cli_main(["encode", "--checkpoint", str(ckpt), "--data", str(tmp_path / "captions.txt"), "--output",
                     str(out), "--metadata", "parquet", "--shard-size", "5", "--workers", "0", "--device", "cpu"]) == 0
    tables = [pq.read_table(out / "metadata" / f"metadata_{k:05d}.parquet").to_pydict() for k in range(2)]
    assert tables[0]["caption"] + tables[1]["caption"] == CAPTIONS
    assert tables[1]["index"] == [5, 6, 7]
    rows = np.concatenate([np.load(out / "text_emb" / f"text_emb_{k:05d}.npy") for k in range(2)])
    assert rows.shape == (8, 64)


@pytest.mark.gpu
def test_encode_on_cuda_under_autocast(tiny, tmp_path):
    """On CUDA (fp16 autocast, the default backend there): the 2x rule against plain torch in fp16 autocast."""
    import copy
    model, ckpt, preprocess, tokenizer = tiny
    paths = write_images(tmp_path / "images", 12)
    write_csv(tmp_path / "data.tsv", [[f"images/{p.name}", c] for p, c in zip(paths, CAPTIONS * 2, strict=False)])
    out = tmp_path / "out"
    assert cli_main(["encode", "--checkpoint", str(ckpt), "--data", str(tmp_path / "data.tsv"), "--output", str(out),
                     "--dtype", "float32", "--workers", "2", "--device", "cuda"]) == 0
    got = read_shards(out)
    want_image, want_text = reference(model, preprocess, tokenizer, paths, (CAPTIONS * 2)[:12])
    plain = copy.deepcopy(model).cuda()
    for m in plain.modules():
        if isinstance(m, clipmoe.MoEFFN):
            m.backend = "torch"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths]).cuda()
        lowp_image = F.normalize(plain.encode_image(images).float(), dim=-1).half().cpu()
        lowp_text = F.normalize(plain.encode_text(tokenizer((CAPTIONS * 2)[:12]).cuda()).float(), dim=-1).half().cpu()
    assert_close_lowp(torch.from_numpy(got["image"]).half(), want_image.double(), lowp_image)
    assert_close_lowp(torch.from_numpy(got["text"]).half(), want_text.double(), lowp_text)


def _files(folder):
    """{relative path: bytes} of the shard files (not encode.json / args.json, which hold run times)."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(folder) for f in names if f not in ("encode.json", "args.json")}


def test_killed_run_resumes_to_the_same_files(tiny, tmp_path):
    model, ckpt, _, _ = tiny
    paths = write_images(tmp_path / "images", 48)
    write_csv(tmp_path / "data.tsv", [[f"images/{p.name}", f"caption {i}"] for i, p in enumerate(paths)])
    args = ["encode", "--checkpoint", str(ckpt), "--data", str(tmp_path / "data.tsv"), "--shard-size", "2",
            "--batch-size", "1", "--workers", "0", "--device", "cpu"]
    assert cli_main(args + ["--output", str(tmp_path / "once")]) == 0
    once = _files(tmp_path / "once")
    assert len([f for f in once if f.startswith("metadata/metadata_")]) == 24

    killed = tmp_path / "killed"
    code = "import sys; from clipmoe.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args, "--output", str(killed)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        done = list((killed / "metadata").glob("metadata_*")) if (killed / "metadata").is_dir() else []
        if len(done) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed midway: {proc.stderr.read()[-2000:]}"
    partial = [f for f in _files(killed) if f.startswith("metadata/metadata_")]
    assert 3 <= len(partial) < 24
    assert cli_main(args + ["--output", str(killed)]) == 0
    assert _files(killed) == once  # no duplicate, no gap, byte for byte


def test_encode_errors(tiny, tmp_path, capsys):
    _, ckpt, _, _ = tiny
    assert cli_main(["encode", "--data", "x.tsv", "--output", str(tmp_path / "o")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert cli_main(["encode", "--checkpoint", str(ckpt), "--data", str(tmp_path / "nope.tsv"), "--output",
                     str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "c.txt").write_text("a\nb\n")
    base = ["encode", "--checkpoint", str(ckpt), "--data", str(tmp_path / "c.txt"), "--output", str(tmp_path / "o"),
            "--device", "cpu", "--workers", "0"]
    assert cli_main(base) == 0
    assert cli_main(base + ["--shard-size", "1"]) == 2  # another run's folder
    assert "other settings (shard_size" in capsys.readouterr().err

"""What clipmoe refuses, one test per example: input files that would silently lose or alter data, models and
checkpoints that would silently be wrong, and the file-writing guarantees (atomic pairs, no leftovers, modes).

Each test names the example it guards; the error it expects names the file (or module, or tensor) and what was
expected instead.
"""
import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from clipmoe import MoEFFN
from clipmoe.data.datasets import CsvCaptionDataset
from clipmoe.data.eval_sets import KarpathyRetrieval
from clipmoe.fileio import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((4, 4, 3), i % 256, np.uint8)).save(folder / f"{i}.png")
    return [f"img/{i}.png" for i in range(n)]


def _table(path, rows, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        csv.writer(f, delimiter="\t").writerows([("filepath", "title"), *rows])
    return path


def _umask_mode():
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# ---------------------------------------------------------------------------------------------------------------------
# Input files: nothing lost, nothing decoded wrongly
# ---------------------------------------------------------------------------------------------------------------------

def test_csv_caption_opening_a_quote_is_refused_not_swallowing_rows(tmp_path):
    """A caption starting with `"` used to swallow the rows up to the next quote (200 rows -> 21 samples)."""
    paths = _images(tmp_path / "img", 200)
    lines = ["filepath\ttitle"] + [f"{p}\tcaption {i}" for i, p in enumerate(paths)]
    lines[11] = f'{paths[10]}\t"Big" red circle and then a 12" ruler'  # balanced: parsed as CSV quoting
    lines[21] = f'{paths[20]}\t"unclosed quote runs on'
    lines[41] = f'{paths[40]}\ta "quoted" word'
    (tmp_path / "data.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r'data\.tsv: line 22: a field runs over \d+ lines, to line \d+: a field '
                                         r'that starts with a double quote'):
        CsvCaptionDataset(tmp_path / "data.tsv")
    del lines[21]
    (tmp_path / "data.tsv").write_text("\n".join(lines) + "\n")
    dataset = CsvCaptionDataset(tmp_path / "data.tsv")
    assert len(dataset) == 199 and dataset.num_skipped == 0
    assert dataset.captions[39] == 'a "quoted" word'  # a quote inside a field is literal text


def test_csv_with_properly_quoted_captions_parses_every_row(tmp_path):
    paths = _images(tmp_path / "img", 5)
    captions = ['"quoted" start', "tab\tinside", 'ends with "', "plain", 'a 12" ruler']
    _table(tmp_path / "q.tsv", zip(paths, captions, strict=True))  # csv.writer quotes and doubles inner quotes
    assert CsvCaptionDataset(tmp_path / "q.tsv").captions == captions


def test_csv_with_utf8_bom_is_accepted(tmp_path):
    """A UTF-8 byte-order mark (Excel's "CSV UTF-8") used to become part of the first column's name."""
    paths = _images(tmp_path / "img", 3)
    _table(tmp_path / "bom.tsv", [(p, "café") for p in paths], encoding="utf-8-sig")
    assert (tmp_path / "bom.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    dataset = CsvCaptionDataset(tmp_path / "bom.tsv")
    assert len(dataset) == 3 and dataset.captions[0] == "café"


def test_csv_not_utf8_names_the_file_line_and_encoding(tmp_path):
    paths = _images(tmp_path / "img", 3)
    _table(tmp_path / "latin.tsv", [(paths[0], "ok"), (paths[1], "café"), (paths[2], "ok")], encoding="latin-1")
    with pytest.raises(ValueError, match=r"latin\.tsv: not utf-8 text: byte 0xe9 at line 3, column \d+ .*a UTF-8 "
                                         r"byte-order mark is accepted"):
        CsvCaptionDataset(tmp_path / "latin.tsv")
    _table(tmp_path / "utf16.tsv", [(p, "ok") for p in paths], encoding="utf-16")
    with pytest.raises(ValueError, match=r"utf16\.tsv: the file is UTF-16 LE .*reads text files as utf-8"):
        CsvCaptionDataset(tmp_path / "utf16.tsv")


def _karpathy(tmp_path, encoding):
    _images(tmp_path / "img", 2)
    document = {"images": [{"filename": f"{i}.png", "split": "test", "sentences": [{"raw": f"caf\u00e9 {i}"}]}
                           for i in range(2)]}
    path = tmp_path / f"karpathy_{encoding}.json"
    path.write_text(json.dumps(document, ensure_ascii=False), encoding=encoding)
    return path


def test_json_with_utf8_bom_is_accepted_and_latin1_refused(tmp_path):
    data = KarpathyRetrieval(_karpathy(tmp_path, "utf-8-sig"), tmp_path / "img")
    assert data.captions == ["caf\u00e9 0", "caf\u00e9 1"]
    with pytest.raises(ValueError, match=r"karpathy_latin-1\.json: not utf-8 text: byte 0xe9 at line 1"):
        KarpathyRetrieval(_karpathy(tmp_path, "latin-1"), tmp_path / "img")


# ---------------------------------------------------------------------------------------------------------------------
# Writing files
# ---------------------------------------------------------------------------------------------------------------------

def test_temporaries_of_a_killed_write_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "state.bin"
    script = textwrap.dedent(f"""
        import os, signal
        from clipmoe.fileio import atomic_write
        def write(tmp):
            tmp.write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write
        atomic_write({str(target)!r}, write)
    """)
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == -9
    assert len(list(tmp_path.glob(".state.bin.*.tmp"))) == 1 and not target.exists()
    atomic_write(target, lambda tmp: tmp.write_bytes(b"whole"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"] and target.read_bytes() == b"whole"


def test_temporary_of_a_live_writer_is_kept(tmp_path):
    target = tmp_path / "state.bin"

    def write(tmp):  # while this write runs, a second one of the same path must not delete its file
        atomic_write(target, lambda other: other.write_bytes(b"inner"))
        assert tmp.exists()
        tmp.write_bytes(b"outer")

    atomic_write(target, write)
    assert target.read_bytes() == b"outer"


def test_safetensors_files_get_the_umask_mode(tmp_path):
    """safetensors creates private (0600) files; atomic_write promises 0666 & ~umask."""
    from safetensors.torch import save_file
    path = atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, tmp))
    assert path.stat().st_mode & 0o777 == _umask_mode()


# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
def test_backward_through_an_empty_batch(backend, monkeypatch):
    """Backward through zero tokens used to fail on naive/torch ("does not require grad")."""
    if backend == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    moe = MoEFFN(8, 16, num_experts=4, top_k=2, backend=backend)
    for requires_grad in (True, False):  # frozen input with trainable experts (FFN-only training) too
        moe.zero_grad(set_to_none=True)
        x = torch.randn(0, 3, 8, requires_grad=requires_grad)
        y = moe(x)
        assert y.shape == (0, 3, 8)
        y.sum().backward()
        for name in ("w1", "b1", "w2", "b2"):
            grad = getattr(moe, name).grad
            assert grad is not None and grad.shape == getattr(moe, name).shape and not grad.any()
        if requires_grad:
            assert x.grad.shape == (0, 3, 8)


# ---------------------------------------------------------------------------------------------------------------------
# Upcycling: refused rather than silently wrong, and never half done
# ---------------------------------------------------------------------------------------------------------------------

def _tiny_clip(**vision):
    import open_clip
    return open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=2, head_width=16,
                                                        **vision),
                          text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2, layers=2))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    assert not any(isinstance(m, MoEFFN) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_upcycle_refuses_open_clip_mlps_with_scale_fc_layernorm():
    """scale_fc=True puts a LayerNorm inside the MLP; copying only the linears changed the experts by 0.5 rel."""
    from clipmoe import upcycle
    model = _tiny_clip(scale_fc=True)
    before = _state(model)
    with pytest.raises(ValueError, match=r"2 MLP\(s\) hold layers an MoEFFN expert .* e\.g\. "
                                         r"visual\.transformer\.resblocks\.0\.mlp has \['ln'\] .*scale_fc=True"):
        upcycle(model, 2, 1)
    _assert_untouched(model, before)
    model = _tiny_clip(scale_fc=False, scale_attn=True)  # the custom block with ln = Identity is a plain MLP
    upcycle(model, 2, 1)
    assert isinstance(model.visual.transformer.resblocks[0].mlp, MoEFFN)


def test_upcycle_refuses_an_expert_state_dict_holding_several_mlps():
    """A state dict of several MLPs used to give the expert the last matching tensors, silently."""
    from clipmoe import upcycle
    model = _tiny_clip()
    name = "transformer.resblocks.0.mlp"
    tower = model.transformer.state_dict()  # resblocks.0.mlp.c_fc.weight, resblocks.1.mlp.c_fc.weight, ...
    with pytest.raises(ValueError, match=r"experts\['transformer\.resblocks\.0\.mlp'\]\[1\]: mlp_state holds several "
                                         r"MLPs: keys \['resblocks\.0\.mlp\.c_fc\.weight', 'resblocks\.1\.mlp\.c_fc"):
        upcycle(model, 2, 1, experts={name: [model.get_submodule(name).state_dict(), tower]})


def test_failed_upcycle_leaves_the_model_untouched():
    from clipmoe import dense_mlps, upcycle
    model = _tiny_clip()
    before = _state(model)
    last = list(dense_mlps(model))[-1]
    wrong = {"c_fc.weight": torch.zeros(3, 3), "c_fc.bias": torch.zeros(3), "c_proj.weight": torch.zeros(3, 3),
             "c_proj.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match=rf"experts\['{last}'\]\[0\]: mlp_state\['c_fc\.weight'\] has shape"):
        upcycle(model, 1, 1, experts={last: [wrong]})
    _assert_untouched(model, before)


def test_upcycle_of_the_mlp_itself_is_refused():
    """upcycle(block.mlp) used to append a child named "" after c_proj."""
    from clipmoe import upcycle
    mlp = _tiny_clip().transformer.resblocks[0].mlp
    with pytest.raises(ValueError, match="model is itself a dense MLP; upcycle replaces the MLPs inside a model"):
        upcycle(mlp, 2, 1)
    assert [name for name, _ in mlp.named_children()] == ["c_fc", "gelu", "c_proj"]


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: the weights and config pair is atomic, tensors of another dtype are widened exactly or refused
# ---------------------------------------------------------------------------------------------------------------------

TINY_ARCH = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1,
                                             "head_width": 16},
             "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1}}

SAVE_AND_KILL = """
import json, os, signal, sys, torch, open_clip
import clipmoe.checkpoint as checkpoint
from clipmoe import upcycle
arch, out, ref, when = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
def model(seed, top_k):
    torch.manual_seed(seed)
    return upcycle(open_clip.CLIP(**arch), 2, top_k)
checkpoint.save_checkpoint(model(0, 1), out, architecture=arch)        # the old checkpoint: top-1
new = model(1, 2)                                                     # the new one: other weights, top-2
checkpoint.save_checkpoint(new, ref, architecture=arch)
real_write = checkpoint.atomic_write
def write_then_kill(path, write):
    if when == "during weights":
        write(path.with_name("scratch"))
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(path, write)
    os.kill(os.getpid(), signal.SIGKILL)                              # after the weights, before the config
checkpoint.atomic_write = write_then_kill
checkpoint.save_checkpoint(new, out, architecture=arch)
"""


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("when", ["during weights", "between weights and config"])
def test_checkpoint_killed_between_weights_and_config_loads_old_or_new_never_mixed(tmp_path, when, caplog):
    """Weights and config were replaced one after the other: a kill in between paired new weights with the old
    config (here: the new experts silently run top-1)."""
    from clipmoe.checkpoint import load_checkpoint
    out, ref = tmp_path / "ckpt", tmp_path / "reference"
    result = subprocess.run([sys.executable, "-c", SAVE_AND_KILL, json.dumps(TINY_ARCH), str(out), str(ref), when],
                            env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)
    assert result.returncode == -9, result.stderr
    loaded = load_checkpoint(out)
    moe = loaded.transformer.resblocks[0].mlp
    if when == "during weights":  # the old checkpoint, intact
        assert moe.top_k == 1 and not _same_state(loaded, load_checkpoint(ref))
    else:  # the new weights with their own config; the stale JSON is reported
        assert moe.top_k == 2 and _same_state(loaded, load_checkpoint(ref))
        assert "belongs to another save" in caplog.text


def test_checkpoint_whose_config_names_another_save_is_refused(tmp_path):
    """A JSON of this format paired with a weights file that is not its save (copied in from elsewhere)."""
    import open_clip
    from safetensors.torch import load_file, save_file

    from clipmoe import upcycle
    from clipmoe.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    save_checkpoint(upcycle(open_clip.CLIP(**TINY_ARCH), 2, 1), tmp_path / "c", architecture=TINY_ARCH)
    weights = tmp_path / "c" / "clipmoe_model.safetensors"
    save_file(load_file(weights), weights)  # the same tensors without the stored config
    with pytest.raises(CheckpointError, match=r"clipmoe_config\.json names save [0-9a-f]+, but .*"
                                              r"clipmoe_model\.safetensors is a file of another save"):
        load_checkpoint(tmp_path / "c")


def test_checkpoint_tensors_of_16_bit_are_widened_and_integers_refused(tmp_path):
    """fp16/bf16/int tensors used to be assigned as they were, and the model failed later inside torch."""
    import open_clip
    from safetensors import safe_open
    from safetensors.torch import save_file

    from clipmoe import upcycle
    from clipmoe.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    model = upcycle(open_clip.CLIP(**TINY_ARCH), 2, 1).eval()
    for dtype in (torch.float16, torch.bfloat16):
        low = upcycle(open_clip.CLIP(**TINY_ARCH), 2, 1).to(dtype)
        save_checkpoint(low, tmp_path / str(dtype), architecture=TINY_ARCH)
        loaded = load_checkpoint(tmp_path / str(dtype))
        assert {t.dtype for t in loaded.state_dict().values()} == {torch.float32}
        assert all(torch.equal(loaded.state_dict()[k], v.float()) for k, v in low.state_dict().items())
        loaded.encode_image(torch.randn(1, 3, 16, 16))  # runs in fp32
    save_checkpoint(model, tmp_path / "int", architecture=TINY_ARCH)
    weights = tmp_path / "int" / "clipmoe_model.safetensors"
    with safe_open(weights, framework="pt") as f:  # the file with two tensors of other dtypes, config kept
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["transformer.resblocks.0.mlp.b1"] = tensors["transformer.resblocks.0.mlp.b1"].to(torch.int32)
    tensors["visual.proj"] = tensors["visual.proj"].double()
    save_file(tensors, weights, metadata=metadata)
    with pytest.raises(CheckpointError, match=r"int/clipmoe_model\.safetensors .*tensors of a dtype the model "
                                              r"cannot take: .*expected \['torch\.float32'\]") as refused:
        load_checkpoint(tmp_path / "int")
    assert "visual.proj is torch.float64" in str(refused.value)
    assert "transformer.resblocks.0.mlp.b1 is torch.int32" in str(refused.value)


def test_convert_refuses_a_destination_that_is_its_source(tmp_path, capsys):
    """`convert --to-released x.safetensors x.safetensors` used to overwrite the source with a pickle."""
    import open_clip

    from clipmoe import upcycle
    from clipmoe.checkpoint import save_checkpoint
    from clipmoe.cli import main
    arch = {"embed_dim": 16, "quick_gelu": True,  # what the released format holds: heads of width 64, QuickGELU
            "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 64, "layers": 1, "head_width": 64},
            "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 64, "heads": 1, "layers": 1}}
    model = upcycle(open_clip.CLIP(**arch), 2, 1)
    save_checkpoint(model, tmp_path / "m.safetensors", architecture=arch)
    save_checkpoint(model, tmp_path / "folder", architecture=arch)
    before = (tmp_path / "m.safetensors").read_bytes()
    for src, dst in (("m.safetensors", "m.safetensors"), ("m.json", "./m.safetensors"),
                     ("folder", "folder/clipmoe_model.safetensors")):
        assert main(["convert", "--to-released", str(tmp_path / src), str(tmp_path / dst)]) == 2
        assert f"the destination {tmp_path / dst} is (or holds) its source" in capsys.readouterr().err
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert main(["convert", "--to-released", str(tmp_path / "m.safetensors"), str(tmp_path / "m.pt")]) == 0
    assert main(["convert", str(tmp_path / "m.pt"), str(tmp_path / "m.pt")]) == 2
    assert "is (or holds) its source" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# MCL runs: `build` (and a resume) use only the stages the run recorded
# ---------------------------------------------------------------------------------------------------------------------

def _mcl(out, stages, resume=False):
    from torch.utils.data import TensorDataset

    from clipmoe.models import create_model
    from clipmoe.train.distributed import DistInfo
    from clipmoe.train.dmu import run_mcl
    from clipmoe.train.loop import TrainConfig
    torch.manual_seed(0)
    base = create_model("clipmoe-tiny")[0]
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 32, 32, generator=g), torch.randint(1, 49407, (32, 32), generator=g))
    cfg = TrainConfig(lr=1e-3, weight_decay=0.0, warmup_steps=1, batch_size=8, max_steps=1, checkpoint_every=1,
                      seed=stages)  # another seed per run: another stage 1
    run_mcl(base, data, cfg, out, DistInfo(), stages=stages, clusters=2, small_cluster="remainder", resume=resume)


def _build(tmp_path, mcl, *flags):
    from clipmoe.cli import main
    return main(["build", "--model", "clipmoe-tiny", "--mcl-dir", str(mcl), "--output-dir", str(tmp_path / "built"),
                 "--device", "cpu", "--top-k", "1", "--overwrite", *flags])


def _experts_equal_stage_files(tmp_path, mcl, n):
    from safetensors.torch import load_file

    from clipmoe.checkpoint import load_checkpoint
    moe = load_checkpoint(tmp_path / "built" / "clip_moe").transformer.resblocks[0].mlp
    assert moe.num_experts == n
    for j in range(n):
        stage = load_file(mcl / f"stage_{j}" / "ffn.safetensors")
        assert torch.equal(moe.w1[j], stage["transformer.resblocks.0.mlp.c_fc.weight"])


def test_build_uses_only_the_stages_the_mcl_run_recorded(tmp_path, capsys):
    """A 1-stage rerun into the folder of a 2-stage run used to build 3 experts from the stale stage_2; resuming it
    to 2 stages used to take that stale stage_2 too."""
    from clipmoe.train.dmu import ffn_file_run, read_mcl_run
    mcl = tmp_path / "mcl"
    _mcl(mcl, stages=2)
    first = read_mcl_run(mcl)["run_id"]
    _mcl(mcl, stages=1)  # a new run, without resume, into the same folder
    second = read_mcl_run(mcl)["run_id"]
    assert second != first and ffn_file_run(mcl / "stage_2" / "ffn.safetensors") == first  # the stale folder
    assert _build(tmp_path, mcl) == 0
    _experts_equal_stage_files(tmp_path, mcl, 2)
    assert _build(tmp_path, mcl, "--num-experts", "3") == 2
    assert "--num-experts) 3: the MCL run in" in capsys.readouterr().err
    _mcl(mcl, stages=2, resume=True)  # stage 2 is trained again, not taken from the first run
    assert ffn_file_run(mcl / "stage_2" / "ffn.safetensors") == second
    assert _build(tmp_path, mcl, "--num-experts", "2") == 0  # the first N-1 stages of one run (issue 13.5)
    _experts_equal_stage_files(tmp_path, mcl, 2)
    assert _build(tmp_path, mcl) == 0
    _experts_equal_stage_files(tmp_path, mcl, 3)


def test_build_refuses_a_folder_mixing_runs_or_without_a_record(tmp_path, capsys):
    from safetensors.torch import load_file

    from clipmoe.train.dmu import MCL_RUN_FILE, save_ffns
    mcl = tmp_path / "mcl"
    _mcl(mcl, stages=1)
    stage = mcl / "stage_1" / "ffn.safetensors"
    flat = load_file(stage)
    names = sorted({k.rsplit(".", 2)[0] for k in flat})
    save_ffns({n: {k[len(n) + 1:]: v for k, v in flat.items() if k.startswith(n + ".")} for n in names}, stage,
              run_id="another-run")
    assert _build(tmp_path, mcl) == 2
    assert "stage_1/ffn.safetensors was written by another MCL run (run id another-run)" in capsys.readouterr().err
    (mcl / MCL_RUN_FILE).unlink()
    assert _build(tmp_path, mcl) == 2
    assert f"no {MCL_RUN_FILE}, the record of the run that wrote it" in capsys.readouterr().err
    assert _build(tmp_path, tmp_path / "nothing") == 2

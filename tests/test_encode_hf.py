"""`clipmoe encode` (clipmoe.eval.encode.encode_dataset) of an upcycled transformers CLIPModel: needs no open_clip,
so its CUDA cases run in the GPU check on the bare GPU machine (fp16 and bf16 autocast, the triton backend, pinned
DataLoader batches); the CPU case checks the same pipeline in fp32. Rows equal the model's own features of the same
inputs (tests/test_encode.py covers the open_clip models, the input formats and resuming)."""
import copy
import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipmoe
from clipmoe.data.synthetic import WordTokenizer
from clipmoe.eval.encode import encode_dataset, read_items, read_shards
from tests.tolerances import assert_close, assert_close_lowp

transformers = pytest.importorskip("transformers")
pytest.importorskip("clipmoe.hf_model")

SIZE = 32
CAPTIONS = ["a red square", "two blue circles", "a small green triangle", "a photo", "stripes", "a dog", "the sea"]


def preprocess(image):
    """PIL image -> [3, SIZE, SIZE] in [-1, 1] (module level: DataLoader workers pickle it)."""
    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1) * 2 - 1


@pytest.fixture(scope="module")
def upcycled():
    """(upcycled tiny CLIPModel with distinct experts, in fp32 on the CPU, and its tokenizer)."""
    tokenizer = WordTokenizer(context_length=16)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=tokenizer.vocab_size, max_position_embeddings=tokenizer.context_length, pad_token_id=0,
                bos_token_id=tokenizer.sot_id, eos_token_id=tokenizer.eot_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
                  patch_size=8)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                           projection_dim=16))
    clipmoe.upcycle(model, num_experts=4, top_k=2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, clipmoe.MoEFFN):
                m.w1.add_(0.05 * torch.randn_like(m.w1))
    return model.eval(), tokenizer


def write_data(folder):
    """A TSV of real PNG files of different sizes with captions."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    with open(folder / "data.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["filepath", "title"])
        for i, caption in enumerate(CAPTIONS):
            Image.fromarray(rng.integers(0, 256, (20 + 5 * i, 40 - 2 * i, 3), dtype=np.uint8)).save(
                folder / "images" / f"{i}.png")
            writer.writerow([f"images/{i}.png", caption])
    return read_items(str(folder / "data.tsv"))


def features(model, images, tokens, device, amp_dtype=None):
    with torch.no_grad(), torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        image = model.get_image_features(pixel_values=images.to(device))
        text = model.get_text_features(input_ids=tokens.to(device))
    return [F.normalize(getattr(x, "pooler_output", x).float(), dim=-1).cpu() for x in (image, text)]


@pytest.mark.parametrize("device,amp_dtype", [
    ("cpu", None),
    pytest.param("cuda", torch.float16, marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)])
def test_encode_rows_equal_the_model_features(upcycled, tmp_path, device, amp_dtype):
    model, tokenizer = upcycled
    items = write_data(tmp_path)
    images = torch.stack([preprocess(Image.open(item["image"])) for item in items])
    tokens = tokenizer([item["caption"] for item in items])
    want = features(model, images, tokens, "cpu")  # fp32 on the CPU
    on_device = copy.deepcopy(model).to(device)  # backend auto: triton on CUDA, torch on the CPU
    encode_dataset(on_device, items, preprocess, tokenizer, tmp_path / "out", settings={"model": "tiny"},
                   shard_size=4, batch_size=3, num_workers=2, device=device, dtype="float32",
                   amp_dtype=amp_dtype or torch.float16)
    got = read_shards(tmp_path / "out")
    assert [row[2] for row in got["metadata"]] == CAPTIONS  # the rows in input order
    rows = [torch.from_numpy(got[tower]) for tower in ("image", "text")]
    if amp_dtype is None:
        for row, ref in zip(rows, want, strict=True):
            assert_close(row, ref)
        return
    plain = copy.deepcopy(on_device)
    for m in plain.modules():
        if isinstance(m, clipmoe.MoEFFN):
            m.backend = "torch"
    lowp = features(plain, images, tokens, device, amp_dtype)  # plain torch in the same autocast
    for tower, row, ref, ref_lowp in zip(("image", "text"), rows, want, lowp, strict=True):
        assert_close_lowp(row.to(amp_dtype), ref.double(), ref_lowp.to(amp_dtype), tower)

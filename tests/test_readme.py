"""The README's Python examples run as written: every ```python block is listed below, and each one that needs
neither a GPU nor downloaded weights is executed (in a fresh namespace, in a temporary folder). A block the table
does not know fails `test_every_python_block_is_listed`, so a new example cannot go untested by accident.

Shell blocks (make, pip, clipmoe ...) are not run here; the CLI has its own tests.
"""
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


@dataclass(frozen=True)
class Example:
    marker: str              # a line fragment found in this block and no other
    prelude: str = ""        # defines the names the block takes as given (images, x, model, ...)
    replace: tuple = ()      # (old, new) substitutions, each with its reason in `why`
    skip: str = ""           # why the block is not run
    why: str = ""


EXAMPLES = {
    "quick_start": Example(
        marker='open_clip.create_model("ViT-B-32", pretrained="openai")',
        prelude="import torch\nfrom open_clip.loss import ClipLoss\n"
                "images, texts = torch.randn(2, 3, 224, 224), torch.randint(1, 49408, (2, 77))\n"
                "my_clip_loss = ClipLoss()\n",
        replace=(('pretrained="openai"', "pretrained=None"),),
        why="the OpenAI weights cannot be downloaded here: the same code on random weights"),
    "single_layer": Example(
        marker="moe = clipmoe.MoEFFN(d_model=768",
        prelude="import torch\nimport clipmoe\nx = torch.randn(2, 5, 768)\n"),
    "released_checkpoint": Example(
        marker='clipmoe.load_clip_moe_checkpoint("clip_moe_vit_l14.pt")',
        skip="needs a released CLIP-MoE checkpoint (a 4.8 GB download); tests/test_checkpoint.py runs the same calls "
             "on a small file of that format"),
    "own_format": Example(
        marker='clipmoe.save_checkpoint(model, "ckpt/")',
        prelude="import clipmoe\nfrom clipmoe.models import create_model\n"
                "tiny = clipmoe.upcycle(create_model('clipmoe-tiny')[0], num_experts=2, top_k=1)\n"
                "clipmoe.save_checkpoint(tiny, 'tiny/', architecture='clipmoe-tiny')\n"
                "model = clipmoe.load_checkpoint('tiny/')  # a model from a loader knows its architecture\n"),
    "transformers": Example(
        marker='CLIPModel.from_pretrained("openai/clip-vit-base-patch32")',
        skip="downloads weights from the Hugging Face hub; tests/test_hf_compat.py upcycles random-init "
             "CLIPModel, CLIPVisionModel and CLIPTextModel"),
    "hf_round_trip": Example(
        marker='model.save_pretrained("hf_moe/")',
        prelude="import clipmoe\nfrom transformers import CLIPConfig, CLIPModel\n"
                "config = CLIPConfig(text_config={'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 1,"
                " 'num_attention_heads': 2, 'vocab_size': 100, 'max_position_embeddings': 16},"
                " vision_config={'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 1,"
                " 'num_attention_heads': 2, 'image_size': 16, 'patch_size': 8}, projection_dim=16)\n"
                "model = clipmoe.upcycle(CLIPModel(config).eval(), num_experts=2, top_k=1)\n",
        why="the block before it downloads a model: the same calls on a tiny random-init CLIPModel"),
    "api": Example(marker='create_model("clipmoe-tiny")   # clipmoe'),
}


def python_blocks():
    """[(line number, code)] of the ```python blocks of the README."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == "python"]


def block_of(example: Example):
    found = [(line, code) for line, code in python_blocks() if example.marker in code]
    assert len(found) == 1, f"README: {len(found)} python blocks contain {example.marker!r}, expected 1"
    return found[0]


def test_every_python_block_is_listed():
    for line, code in python_blocks():
        names = [name for name, ex in EXAMPLES.items() if ex.marker in code]
        assert len(names) == 1, (f"README.md:{line}: python block matched by {names or 'no entry'}; list it once in "
                                 f"EXAMPLES of tests/test_readme.py (run it, or say why it is skipped)")


@pytest.mark.parametrize("name", EXAMPLES)
def test_readme_example_runs(name, tmp_path, monkeypatch):
    example = EXAMPLES[name]
    line, code = block_of(example)
    if example.skip:
        pytest.skip(f"README.md:{line}: {example.skip}")
    for old, new in example.replace:
        assert old in code, f"README.md:{line}: {old!r} is gone; update EXAMPLES[{name!r}] ({example.why})"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"readme_{name}"}
    exec(compile(example.prelude, f"<prelude of README.md:{line}>", "exec"), namespace)
    exec(compile("\n" * line + code, "README.md", "exec"), namespace)  # tracebacks give README line numbers

"""Loading a model for inference from any of the formats clipmoe reads, and its encode functions.

Formats (`load_model`): a released CLIP-MoE `.pt` file, a clipmoe checkpoint (folder or `.safetensors`), or a
transformers folder (`config.json` with a "model_type", e.g. one written by `CLIPMoEModel.save_pretrained`).
"""
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

RELEASED_SUFFIXES = (".pt", ".pth", ".bin")


def is_hf_folder(path) -> bool:
    """A folder whose config.json is a transformers config (it has "model_type"; clipmoe's own has "format")."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        document = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(document, dict) and "model_type" in document and "format" not in document


def load_model(path, *, top_k: int = 2, backend: str | None = None, device="cpu") -> nn.Module:
    """The model stored at `path`, in eval mode on `device`: a released CLIP-MoE .pt file (read with
    weights_only=True; `top_k` is not stored in it), a transformers folder (offline, safetensors; CLIPMoE models
    through clipmoe.hf_model) or a clipmoe checkpoint. `backend` overrides the MoEFFN backend."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    if path.suffix in RELEASED_SUFFIXES:
        from clipmoe.released import load_clip_moe_checkpoint
        model = load_clip_moe_checkpoint(path, top_k=top_k, backend=backend or "auto")
    elif path.is_dir() and is_hf_folder(path):
        from transformers import AutoModel

        import clipmoe.hf_model  # noqa: F401 - registers the CLIPMoE classes with AutoModel
        model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    else:
        from clipmoe.checkpoint import load_checkpoint
        return load_checkpoint(path, backend=backend, device=device)
    if backend:
        from clipmoe.moe_ffn import MoEFFN
        for m in model.modules():
            if isinstance(m, MoEFFN):
                m.backend = backend
    return model.to(device).eval()


def _pooled(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def encoders(model: nn.Module) -> tuple[Callable | None, Callable | None]:
    """(encode_image, encode_text) of an open_clip-style model (its methods) or a transformers CLIP model
    (get_image_features / get_text_features); None for a tower the model lacks. Outputs are not normalised."""
    image = getattr(model, "encode_image", None)
    text = getattr(model, "encode_text", None)
    if image is None and hasattr(model, "get_image_features"):
        def image(pixel_values):
            return _pooled(model.get_image_features(pixel_values=pixel_values))
    if text is None and hasattr(model, "get_text_features"):
        def text(input_ids):
            return _pooled(model.get_text_features(input_ids=input_ids))
    return image, text

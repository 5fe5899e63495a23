"""Checkpoints in clipmoe's own format (safetensors + JSON), and building a model from an architecture dict.

Own format: `<dir>/model.safetensors` + `<dir>/config.json` (or `X.safetensors` + `X.json`), the JSON holding the
architecture, the MoEConfig, the names of the MoE modules and the text context; both files are written atomically.
"""
import json
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn

from clipmoe.config import MoEConfig
from clipmoe.fileio import atomic_write
from clipmoe.hf_compat import hf_architecture, hf_model_class, is_hf_model
from clipmoe.longclip import LONG_CLIP_SHORT_POSITIONS, long_clip_class
from clipmoe.moe_ffn import MoEFFN
from clipmoe.upcycle import activation_name, dense_mlp_parts

FORMAT_NAME = "clipmoe"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of the expected format, or that does not match its config."""


# ---------------------------------------------------------------------------------------------------------------------
# Building a model from an architecture dict, and loading weights into it
# ---------------------------------------------------------------------------------------------------------------------

# Keyword arguments of open_clip.CLIP / CustomTextCLIP that an open_clip model config may carry.
_OPEN_CLIP_KWARGS = ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
                     "nonscalar_logit_scale")


def build_dense(arch: Mapping) -> nn.Module:
    """The dense model an architecture dict describes, randomly initialised on the CPU."""
    kind = arch.get("model_class")
    if isinstance(kind, str) and kind.startswith("transformers."):
        cls = hf_model_class(kind.partition(".")[2])
        return cls(cls.config_class.from_dict(dict(arch["hf_config"])))
    import open_clip
    classes = {"CLIP": open_clip.CLIP, "CustomTextCLIP": open_clip.CustomTextCLIP, "LongCLIP": long_clip_class()}
    if kind not in classes:
        raise ValueError(f"architecture model_class must be one of {sorted(classes)} or 'transformers.<Class>', "
                         f"got {kind!r}")
    unknown = sorted(set(arch) - set(_OPEN_CLIP_KWARGS) - {"model_class", "short_positions", "custom_text"})
    if unknown:
        raise ValueError(f"architecture has keys clipmoe cannot build with open_clip.{kind}: {unknown}")
    kwargs = {k: arch[k] for k in _OPEN_CLIP_KWARGS if k in arch}
    if kind == "LongCLIP":
        kwargs["short_positions"] = arch.get("short_positions", LONG_CLIP_SHORT_POSITIONS)
    return classes[kind](**kwargs)


def set_moe_layers(model: nn.Module, names, config: MoEConfig, where: str):
    """Replace the dense MLPs `names` of `model` by MoEFFNs allocated on the meta device (weights come from a load
    with assign=True, so the experts are never initialised)."""
    for name in names:
        try:
            mlp = model.get_submodule(name)
        except AttributeError:
            mlp = None
        parts = dense_mlp_parts(mlp) if mlp is not None else None
        if parts is None:
            raise CheckpointError(f"{where}: {name!r} is not a dense MLP of the architecture")
        up = parts[0]
        moe = MoEFFN(up.in_features, up.out_features, num_experts=config.num_experts, top_k=config.top_k,
                     activation=config.activation, dropout=config.dropout, renormalize=config.renormalize,
                     backend=config.backend, device="meta", dtype=up.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, moe)


def _check_state(model: nn.Module, state: Mapping[str, torch.Tensor], where: str, rename=lambda k: k):
    """Raise a CheckpointError listing missing, unexpected and wrongly shaped keys of `state` against `model`."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    missing = [rename(k) for k in expected if k not in state]
    unexpected = [rename(k) for k in state if k not in expected]
    shapes = [f"{rename(k)}: {tuple(v.shape)} in the file, {expected[k]} expected"
              for k, v in state.items() if k in expected and tuple(v.shape) != expected[k]]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
        if items:
            more = f" (and {len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{label}: {'; '.join(items[:5])}{more}")
    if problems:
        raise CheckpointError(f"{where}: " + " | ".join(problems))


def load_assign(model: nn.Module, state: Mapping[str, torch.Tensor], where: str, rename=lambda k: k) -> nn.Module:
    _check_state(model, state, where, rename)
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # a module registering meta parameters outside its state dict; should not happen for CLIP models
        raise CheckpointError(f"{where}: tensors left without values after loading: {left[:5]}")
    return model.eval()


def text_context(model: nn.Module) -> Optional[int]:
    for owner in (model, getattr(model, "text", None)):
        if isinstance(getattr(owner, "context_length", None), int):
            return owner.context_length
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", config)
    return getattr(config, "max_position_embeddings", None)


# ---------------------------------------------------------------------------------------------------------------------
# Own format: safetensors + JSON
# ---------------------------------------------------------------------------------------------------------------------

def _checkpoint_files(path):
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    return path / WEIGHTS_NAME, path / CONFIG_NAME


def _architecture_of(model: nn.Module, architecture) -> dict:
    if architecture is None:
        architecture = getattr(model, "clipmoe_architecture", None)
    if architecture is None and is_hf_model(model):
        architecture = hf_architecture(model)
    if isinstance(architecture, str):
        import open_clip

        from clipmoe.models import register_model_configs
        register_model_configs()
        config = open_clip.get_model_config(architecture)
        if config is None:
            raise ValueError(f"architecture {architecture!r} is not an open_clip model name")
        architecture = config
    if not isinstance(architecture, Mapping):
        raise ValueError("save_checkpoint: the architecture of this model is unknown; pass architecture= (an "
                         "open_clip model name such as 'ViT-B-32', or its model config dict)")
    arch = json.loads(json.dumps(dict(architecture)))  # a JSON-safe copy
    if "model_class" not in arch:
        arch["model_class"] = "CustomTextCLIP" if arch.pop("custom_text", False) else "CLIP"
    if not arch["model_class"].startswith("transformers."):
        activations = [m.activation for m in model.modules() if isinstance(m, MoEFFN)]
        activations += [activation_name(dense_mlp_parts(m)[1], "") for m in model.modules()
                        if dense_mlp_parts(m) is not None]
        if activations:  # open_clip's quick_gelu flag only decides the MLP activation
            arch["quick_gelu"] = activations[0] == "quick_gelu"
    return arch


def _moe_config_of(moes: Mapping[str, MoEFFN], config) -> MoEConfig:
    if isinstance(config, Mapping):
        config = MoEConfig.from_dict(dict(config))
    if config is None:
        if not moes:
            raise ValueError("save_checkpoint: pass config= (the model has no MoEFFN layer to read it from)")
        first = next(iter(moes.values()))
        config = MoEConfig(num_experts=first.num_experts, top_k=first.top_k, activation=first.activation,
                           dropout=first.dropout, renormalize=first.renormalize, backend=first.backend)
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config must be a MoEConfig, a dict of its fields or None, got {type(config).__name__}")
    for name, moe in moes.items():
        got = (moe.num_experts, moe.top_k, moe.activation, moe.renormalize)
        want = (config.num_experts, config.top_k, config.activation, config.renormalize)
        if got != want:
            raise ValueError(f"save_checkpoint: MoEFFN {name} has (num_experts, top_k, activation, renormalize) = "
                             f"{got}, but config says {want}")
    return config


def save_checkpoint(model: nn.Module, path, config: Optional[Union[MoEConfig, dict]] = None, *,
                    architecture=None) -> Path:
    """Save `model` as safetensors weights + a JSON config; `load_checkpoint(path)` rebuilds it in one call.

    Args:
        model: a model from `load_clip_moe_checkpoint` / `load_checkpoint`, an upcycled open_clip CLIP, or an
            upcycled transformers CLIPModel / CLIPVisionModel / CLIPTextModel.
        path: a directory (gets `model.safetensors` + `config.json`) or a `X.safetensors` path (gets `X.json`).
        config: the MoEConfig of the MoE layers (default: read from the model's MoEFFN layers); must agree with them.
        architecture: for open_clip models not built by clipmoe's loaders, the open_clip model name (e.g.
            "ViT-B-32") or model config dict they were created from.
    Each file is written to a temporary file in the same folder and renamed into place. Returns `path`.
    """
    moes = {name: m for name, m in model.named_modules() if isinstance(m, MoEFFN)}
    config = _moe_config_of(moes, config)
    arch = _architecture_of(model, architecture)
    weights_path, config_path = _checkpoint_files(path)
    tensors, seen = {}, set()
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        if value.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage (tied weights)
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    document = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "architecture": arch,
                "moe_cfg": config.to_dict(), "moe_modules": list(moes), "text_context_length": text_context(model)}
    from safetensors.torch import save_file
    atomic_write(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(config_path, lambda tmp: Path(tmp).write_text(json.dumps(document, indent=2) + "\n"))
    return Path(path)


def load_checkpoint(path, *, backend: Optional[str] = None, device="cpu") -> nn.Module:
    """Rebuild a model saved by `save_checkpoint`: the architecture and MoE layers from the JSON config, the weights
    from the safetensors file, every tensor's name and shape checked against the config first. Returns the model in
    eval mode on `device`; `backend` overrides the saved MoEFFN backend. Raises FileNotFoundError for a missing file
    and CheckpointError (a ValueError) naming the file for an unreadable, truncated or mismatching one."""
    weights_path, config_path = _checkpoint_files(path)
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"clipmoe checkpoint {path}: no such file {p}")
    try:
        document = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint config {config_path}: not readable JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise CheckpointError(f"checkpoint config {config_path}: not a clipmoe checkpoint config "
                              f"(no \"format\": \"{FORMAT_NAME}\")")
    if document.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint config {config_path}: format_version {document['format_version']} is "
                              f"newer than this clipmoe reads ({FORMAT_VERSION})")
    try:
        config = MoEConfig.from_dict(document["moe_cfg"], **({"backend": backend} if backend else {}))
        arch, moe_modules = document["architecture"], list(document["moe_modules"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint config {config_path}: {type(exc).__name__}: {exc}") from exc
    where = f"checkpoint {weights_path} (config {config_path})"
    try:
        model = build_dense(arch)
        set_moe_layers(model, moe_modules, config, where)
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise CheckpointError(f"checkpoint config {config_path}: cannot build its architecture: "
                              f"{type(exc).__name__}: {exc}") from exc
    context = document.get("text_context_length")
    if context is not None and text_context(model) != context:
        raise CheckpointError(f"checkpoint config {config_path}: text_context_length {context} disagrees with its "
                              f"architecture ({text_context(model)})")
    from safetensors.torch import load_file
    try:
        state = load_file(weights_path)
    except Exception as exc:  # safetensors' error type moved between versions; any failure here is the file's
        raise CheckpointError(f"checkpoint weights {weights_path}: cannot read them (truncated or corrupt file?): "
                              f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    load_assign(model, state, f"{where} does not match its config")
    if is_hf_model(model):  # a CLIPMoE class, whose save_pretrained keeps the experts
        from clipmoe.hf_model import adopt_moe_class
        adopt_moe_class(model)
    model.clipmoe_architecture = arch
    return model.to(device)


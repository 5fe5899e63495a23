"""Checkpoints in clipmoe's own format (safetensors + JSON), and building a model from an architecture dict.

Own format: `<dir>/clipmoe_model.safetensors` + `<dir>/clipmoe_config.json` (or `X.safetensors` + `X.json`), named
like open_clip's `open_clip_config.json` so that one folder can also hold a Hugging Face model (`config.json` +
`model.safetensors`); folders written by clipmoe <= 0.2 with those HF names still load. The JSON holds the
architecture, the MoEConfig, the names of the MoE modules and the text context.

The pair is atomic: the safetensors file carries a copy of the JSON document in its metadata and is the commit point
(written to a temporary file and renamed into place); the JSON beside it, written next, is the readable copy, and
both hold the same random `save_id`. A save killed between the two renames leaves the new weights with a JSON of
another save (or none): `load_checkpoint` sees the ids differ, warns, and uses the config stored with the weights,
so a load returns the old checkpoint or the new one, never a mixture.
"""
import json
import logging
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from clipmoe.config import MoEConfig
from clipmoe.fileio import atomic_write
from clipmoe.hf_compat import hf_architecture, hf_model_class, is_hf_model
from clipmoe.longclip import LONG_CLIP_SHORT_POSITIONS, long_clip_class
from clipmoe.moe_ffn import MoEFFN
from clipmoe.upcycle import activation_name, dense_mlp_parts

logger = logging.getLogger(__name__)

FORMAT_NAME = "clipmoe"
FORMAT_VERSION = 2  # 2: own file names, save_id, the document also in the weights' metadata
WEIGHTS_NAME = "clipmoe_model.safetensors"
CONFIG_NAME = "clipmoe_config.json"
LEGACY_WEIGHTS_NAME = "model.safetensors"  # format_version 1 (clipmoe <= 0.2), the names HF uses
LEGACY_CONFIG_NAME = "config.json"
METADATA_KEY = "clipmoe_config"  # the JSON document, stored in the safetensors header


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


def _exact_dtypes(model: nn.Module, state: Mapping[str, torch.Tensor], where: str, rename) -> dict:
    """`state` with floating tensors narrower than the model's (fp16/bf16 into fp32) widened, which is exact; raise
    a CheckpointError naming the tensors of any other dtype (integers where weights belong, fp64, complex)."""
    expected = {k: v.dtype for k, v in model.state_dict().items()}
    out, bad = dict(state), []
    for key, value in state.items():
        want = expected[key]
        if value.dtype == want:
            continue
        if value.is_floating_point() and want.is_floating_point and torch.promote_types(value.dtype, want) == want:
            out[key] = value.to(want)
        else:
            bad.append(f"{rename(key)} is {value.dtype}")
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise CheckpointError(f"{where}: tensors of a dtype the model cannot take: {'; '.join(bad[:5])}{more}; "
                              f"expected {sorted({str(expected[k]) for k in expected})} (16-bit floats are widened "
                              f"exactly; cast other tensors before saving)")
    return out


def load_assign(model: nn.Module, state: Mapping[str, torch.Tensor], where: str, rename=lambda k: k) -> nn.Module:
    """Load `state` into `model` (assign=True: meta tensors get the file's storage) after checking every name,
    shape and dtype; errors are CheckpointErrors naming the tensors."""
    _check_state(model, state, where, rename)
    state = _exact_dtypes(model, state, where, rename)
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # a module registering meta parameters outside its state dict; should not happen for CLIP models
        raise CheckpointError(f"{where}: tensors left without values after loading: {left[:5]}")
    return model.eval()


def text_context(model: nn.Module) -> int | None:
    for owner in (model, getattr(model, "text", None)):
        if isinstance(getattr(owner, "context_length", None), int):
            return owner.context_length
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", config)
    return getattr(config, "max_position_embeddings", None)


# ---------------------------------------------------------------------------------------------------------------------
# Own format: safetensors + JSON
# ---------------------------------------------------------------------------------------------------------------------

def checkpoint_files(path, *, for_writing: bool = False):
    """(weights path, config path) of the own-format checkpoint at `path`: `X.safetensors` / `X.json` for a file
    path, else the folder's `clipmoe_model.safetensors` + `clipmoe_config.json` (for reading, a folder without them
    but with the legacy `config.json` of a clipmoe checkpoint gives the legacy names)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    files = path / WEIGHTS_NAME, path / CONFIG_NAME
    if not for_writing and not any(f.exists() for f in files) and _is_legacy_checkpoint(path):
        return path / LEGACY_WEIGHTS_NAME, path / LEGACY_CONFIG_NAME
    return files


def _is_legacy_checkpoint(folder: Path) -> bool:
    """Whether `folder/config.json` is a clipmoe config (format_version 1), not a Hugging Face one."""
    try:
        return json.loads((folder / LEGACY_CONFIG_NAME).read_text(encoding="utf-8")).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


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


def save_checkpoint(model: nn.Module, path, config: MoEConfig | dict | None = None, *,
                    architecture=None) -> Path:
    """Save `model` as safetensors weights + a JSON config; `load_checkpoint(path)` rebuilds it in one call.

    Args:
        model: a model from `load_clip_moe_checkpoint` / `load_checkpoint`, an upcycled open_clip CLIP, or an
            upcycled transformers CLIPModel / CLIPVisionModel / CLIPTextModel.
        path: a directory (gets `clipmoe_model.safetensors` + `clipmoe_config.json`; other files in it, such as a
            Hugging Face model's, are left alone) or a `X.safetensors` path (gets `X.json`).
        config: the MoEConfig of the MoE layers (default: read from the model's MoEFFN layers); must agree with them.
        architecture: for open_clip models not built by clipmoe's loaders, the open_clip model name (e.g.
            "ViT-B-32") or model config dict they were created from.
    Each file is written to a temporary file in the same folder and renamed into place, the weights (which carry
    the config too) first; a kill at any moment leaves a checkpoint that loads as the old or the new one. A legacy
    clipmoe pair (`model.safetensors` + clipmoe `config.json`) in the folder is removed. Returns `path`.
    """
    moes = {name: m for name, m in model.named_modules() if isinstance(m, MoEFFN)}
    config = _moe_config_of(moes, config)
    arch = _architecture_of(model, architecture)
    weights_path, config_path = checkpoint_files(path, for_writing=True)
    tensors, seen = {}, set()
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        if value.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage (tied weights)
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    document = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "save_id": uuid.uuid4().hex,
                "architecture": arch, "moe_cfg": config.to_dict(), "moe_modules": list(moes),
                "text_context_length": text_context(model)}
    text = json.dumps(document, indent=2) + "\n"
    from safetensors.torch import save_file
    # The weights, with the document in their metadata, are the commit point; the JSON is their readable copy.
    atomic_write(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", METADATA_KEY: text}))
    atomic_write(config_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    folder = Path(path)
    if config_path.parent == folder and _is_legacy_checkpoint(folder):  # superseded by the files just written
        (folder / LEGACY_WEIGHTS_NAME).unlink(missing_ok=True)
        (folder / LEGACY_CONFIG_NAME).unlink(missing_ok=True)
    return Path(path)


def _read_json(text: str, where) -> dict:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint config {where}: not readable JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise CheckpointError(f"checkpoint config {where}: not a clipmoe checkpoint config "
                              f"(no \"format\": \"{FORMAT_NAME}\")")
    return document


def _paired_document(path, weights_path: Path, config_path: Path) -> dict:
    """The JSON document that belongs to the weights file: the JSON beside it when their save_ids agree (or for
    format_version 1 files, which have none), else the copy in the weights' metadata (an interrupted save)."""
    if not weights_path.is_file():
        raise FileNotFoundError(f"clipmoe checkpoint {path}: no such file {weights_path}")
    from safetensors import safe_open
    try:
        with safe_open(weights_path, framework="pt") as f:
            embedded = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:  # safetensors' error type moved between versions; any failure here is the file's
        raise CheckpointError(f"checkpoint weights {weights_path}: cannot read them (truncated or corrupt file?): "
                              f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    embedded = _read_json(embedded, f"stored in {weights_path}") if embedded is not None else None
    if not config_path.is_file():
        if embedded is None:
            raise FileNotFoundError(f"clipmoe checkpoint {path}: no such file {config_path}")
        logger.warning("checkpoint %s: %s is missing (a save was interrupted); using the config stored in the "
                       "weights file", path, config_path)
        return embedded
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint config {config_path}: not readable JSON: {exc}") from exc
    document = _read_json(text, config_path)
    if embedded is None:
        if "save_id" in document:
            raise CheckpointError(f"checkpoint {path}: {config_path} names save {document['save_id']}, but "
                                  f"{weights_path} is a file of another save (it has no clipmoe config); the two "
                                  f"files do not belong together")
        return document
    if document.get("save_id") != embedded.get("save_id"):
        logger.warning("checkpoint %s: %s belongs to another save than %s (a save was interrupted between the two "
                       "files); using the config stored in the weights file", path, config_path, weights_path)
        return embedded
    return document


def load_checkpoint(path, *, backend: str | None = None, device="cpu") -> nn.Module:
    """Rebuild a model saved by `save_checkpoint`: the architecture and MoE layers from the JSON config (the one
    that belongs to the weights, see the module docstring), the weights from the safetensors file, every tensor's
    name, shape and dtype checked against the config first (fp16/bf16 tensors are widened to the model's fp32
    exactly; other dtypes are refused). Returns the model in eval mode on `device`; `backend` overrides the saved
    MoEFFN backend. Raises FileNotFoundError for a missing file and CheckpointError (a ValueError) naming the file
    for an unreadable, truncated or mismatching one."""
    weights_path, config_path = checkpoint_files(path)
    document = _paired_document(path, weights_path, config_path)
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


"""Checkpoints: the released CLIP-MoE format (load and export) and clipmoe's own safetensors + JSON format.

Released format (OpenSparseLLMs/CLIP-MoE, `torch.save(model.state_dict())`): a plain state dict with OpenAI CLIP key
names and no config. MoE blocks hold `…resblocks.{i}.gate.weight` [E, D] (router, no bias) and
`…resblocks.{i}.experts.{j}.c_fc.{weight,bias}` / `.c_proj.{weight,bias}` instead of `…mlp…` keys; the text tower
is Long-CLIP style: 248 positions in two tables, `positional_embedding` (used for positions < 20) and
`positional_embedding_res` (positions >= 20). Heads are width // 64 in both towers, experts use QuickGELU, routing
is fp32 softmax -> top-k -> renormalise (the released models: 4 experts, top-2, every block MoE).

Key mapping to the model `load_clip_moe_checkpoint` builds (an open_clip CLIP, or `LongCLIP` below, whose MoE blocks
hold an MoEFFN as `mlp`):
    …resblocks.{i}.gate.weight                   <-> …resblocks.{i}.mlp.router.weight
    …resblocks.{i}.experts.{j}.c_fc.weight/bias  <-> …resblocks.{i}.mlp.w1[j] / b1[j]
    …resblocks.{i}.experts.{j}.c_proj.weight/bias <-> …resblocks.{i}.mlp.w2[j] / b2[j]
    positional_embedding_res                     <-> LongCLIP.positional_embedding_res
and every other key unchanged.

Own format: `<dir>/model.safetensors` + `<dir>/config.json` (or `X.safetensors` + `X.json`), the JSON holding the
architecture, the MoEConfig, the names of the MoE modules and the text context; both files are written atomically.
"""
import json
import math
import re
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipmoe.config import MoEConfig
from clipmoe.fileio import atomic_write
from clipmoe.hf_compat import is_hf_model
from clipmoe.moe_ffn import MoEFFN
from clipmoe.upcycle import _activation_name, _dense_mlp_parts

FORMAT_NAME = "clipmoe"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
LONG_CLIP_SHORT_POSITIONS = 20   # Long-CLIP keeps the first 20 CLIP positions and stretches the rest (77 -> 248)
RELEASED_HEAD_WIDTH = 64         # the official build infers heads = width // 64 in both towers

# Keys of OpenAI CLIP state dicts that hold Python ints rather than weights (dropped on load, as clip.load does).
_OPENAI_INT_KEYS = ("input_resolution", "context_length", "vocab_size")
_GATE = re.compile(r"^(?P<block>(?:visual\.)?transformer\.resblocks\.\d+)\.gate\.weight$")
_EXPERT = re.compile(r"^(?P<block>(?:visual\.)?transformer\.resblocks\.\d+)\.experts\.(?P<j>\d+)\."
                     r"(?P<layer>c_fc|c_proj)\.(?P<param>weight|bias)$")
_EXPERT_SLOTS = {("c_fc", "weight"): "w1", ("c_fc", "bias"): "b1", ("c_proj", "weight"): "w2", ("c_proj", "bias"): "b2"}


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of the expected format, or that does not match its config."""


# ---------------------------------------------------------------------------------------------------------------------
# Long-CLIP text positions
# ---------------------------------------------------------------------------------------------------------------------

_LONG_CLIP_CLASS = None


def _long_clip_class():
    """open_clip.CLIP subclass with Long-CLIP text positions, created on first use so that importing clipmoe never
    imports open_clip; reachable (and picklable) as `clipmoe.checkpoint.LongCLIP`."""
    global _LONG_CLIP_CLASS
    if _LONG_CLIP_CLASS is not None:
        return _LONG_CLIP_CLASS
    import open_clip
    from open_clip.transformer import text_global_pool

    class LongCLIP(open_clip.CLIP):
        """An open_clip CLIP whose text tower adds Long-CLIP positions: position p < short_positions takes row p
        of `positional_embedding`, the others row p of `positional_embedding_res` (both [context_length, width]).

        This is the official masked sum `pe·mask1 + pe_res·mask2` computed as one table; each output row comes from
        one table, so values and gradients are the same. `encode_text` accepts [N, L] token ids with
        L <= context_length (the Long-CLIP tokenizer pads to 248); EOT pooling is at the argmax token id.
        """

        def __init__(self, embed_dim, vision_cfg, text_cfg, quick_gelu: bool = False,
                     short_positions: int = LONG_CLIP_SHORT_POSITIONS, **kwargs):
            super().__init__(embed_dim, vision_cfg, text_cfg, quick_gelu=quick_gelu, **kwargs)
            if not isinstance(short_positions, int) or not 0 <= short_positions <= self.context_length:
                raise ValueError(f"short_positions must be an int in [0, context_length={self.context_length}], "
                                 f"got {short_positions!r}")
            if self.positional_embedding is None or getattr(self, "text_pool_type", "argmax") != "argmax":
                raise ValueError("LongCLIP needs open_clip's learnable text positions and argmax (EOT) pooling")
            self.short_positions = short_positions
            self.positional_embedding_res = nn.Parameter(self.positional_embedding.detach().clone())

        def text_positions(self, length: Optional[int] = None) -> torch.Tensor:
            """[length, width]: the positions added to the first `length` token embeddings."""
            length = self.context_length if length is None else length
            short = min(self.short_positions, length)
            return torch.cat([self.positional_embedding[:short], self.positional_embedding_res[short:length]])

        def encode_text(self, text, normalize: bool = False):
            if text.dim() != 2 or not 1 <= text.shape[1] <= self.context_length:
                raise ValueError(f"text must be token ids [N, L] with 1 <= L <= context_length="
                                 f"{self.context_length}, got shape {tuple(text.shape)}")
            length = text.shape[1]
            cast_dtype = self.transformer.get_cast_dtype()
            x = self.token_embedding(text).to(cast_dtype) + self.text_positions(length).to(cast_dtype)
            x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
            x = text_global_pool(self.ln_final(x), text, "argmax")
            if isinstance(self.text_projection, nn.Linear):
                x = self.text_projection(x)
            elif self.text_projection is not None:
                x = x @ self.text_projection
            return F.normalize(x, dim=-1) if normalize else x

        def forward_intermediates(self, image=None, text=None, **kwargs):
            if text is not None:
                raise NotImplementedError("LongCLIP.forward_intermediates supports images only; use encode_text "
                                          "for texts (open_clip's version would add the wrong positions)")
            return super().forward_intermediates(image=image, **kwargs)

    LongCLIP.__module__, LongCLIP.__qualname__ = __name__, "LongCLIP"
    _LONG_CLIP_CLASS = LongCLIP
    return LongCLIP


def __getattr__(name):
    if name == "LongCLIP":
        return _long_clip_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Building a model from an architecture dict, and loading weights into it
# ---------------------------------------------------------------------------------------------------------------------

# Keyword arguments of open_clip.CLIP / CustomTextCLIP that an open_clip model config may carry.
_OPEN_CLIP_KWARGS = ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
                     "nonscalar_logit_scale")


def _build_dense(arch: Mapping) -> nn.Module:
    """The dense model an architecture dict describes, randomly initialised on the CPU."""
    kind = arch.get("model_class")
    if isinstance(kind, str) and kind.startswith("transformers."):
        import transformers
        cls = getattr(transformers, kind.partition(".")[2], None)
        if cls is None:
            raise ValueError(f"architecture model_class {kind!r} is not a class of transformers "
                             f"{transformers.__version__}")
        return cls(cls.config_class.from_dict(dict(arch["hf_config"])))
    import open_clip
    classes = {"CLIP": open_clip.CLIP, "CustomTextCLIP": open_clip.CustomTextCLIP, "LongCLIP": _long_clip_class()}
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


def _set_moe_layers(model: nn.Module, names, config: MoEConfig, where: str):
    """Replace the dense MLPs `names` of `model` by MoEFFNs allocated on the meta device (weights come from a load
    with assign=True, so the experts are never initialised)."""
    for name in names:
        try:
            mlp = model.get_submodule(name)
        except AttributeError:
            mlp = None
        parts = _dense_mlp_parts(mlp) if mlp is not None else None
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


def _load_assign(model: nn.Module, state: Mapping[str, torch.Tensor], where: str, rename=lambda k: k) -> nn.Module:
    _check_state(model, state, where, rename)
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # a module registering meta parameters outside its state dict; should not happen for CLIP models
        raise CheckpointError(f"{where}: tensors left without values after loading: {left[:5]}")
    return model.eval()


def _text_context(model: nn.Module) -> Optional[int]:
    for owner in (model, getattr(model, "text", None)):
        if isinstance(getattr(owner, "context_length", None), int):
            return owner.context_length
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", config)
    return getattr(config, "max_position_embeddings", None)


# ---------------------------------------------------------------------------------------------------------------------
# The released CLIP-MoE format
# ---------------------------------------------------------------------------------------------------------------------

def _read_torch_state(path, where: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle garbage, non-tensor objects refused by weights_only, ...
        raise CheckpointError(f"{where}: cannot read it as a torch state dict (truncated or corrupt file?): "
                              f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    return state


def _released_state(checkpoint, where: str) -> dict:
    if isinstance(checkpoint, (str, Path)):
        checkpoint = _read_torch_state(checkpoint, where)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{where}: expected a state dict (a mapping of names to tensors), "
                              f"got {type(checkpoint).__name__}")
    state = {k: v for k, v in checkpoint.items() if k not in _OPENAI_INT_KEYS}
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{where}: not a state dict of tensors; entries such as {bad[:3]} are not tensors")
    return state


def _tower_layers(state, prefix: str, where: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    found = {int(m.group(1)) for k in state for m in [pattern.match(k)] if m}
    if not found or found != set(range(len(found))):
        raise CheckpointError(f"{where}: the {'vision' if prefix else 'text'} tower's blocks "
                              f"'{prefix}transformer.resblocks.{{i}}.' are missing or not numbered 0..n-1: "
                              f"{sorted(found)[:8]}")
    return len(found)


def _released_mlp_width(state, block: str, width: int, where: str) -> int:
    for key in (f"{block}.experts.0.c_fc.weight", f"{block}.mlp.c_fc.weight"):
        if key in state:
            w = state[key]
            if w.dim() != 2 or w.shape[1] != width:
                raise CheckpointError(f"{where}: {key} has shape {tuple(w.shape)}, expected [hidden, {width}]")
            return w.shape[0]
    raise CheckpointError(f"{where}: block {block} has neither experts.0.c_fc.weight nor mlp.c_fc.weight")


def _heads(width: int, key: str, where: str) -> int:
    if width % RELEASED_HEAD_WIDTH:
        raise CheckpointError(f"{where}: {key} gives width {width}, which is not a multiple of "
                              f"{RELEASED_HEAD_WIDTH} (the released format has heads = width // 64)")
    return width // RELEASED_HEAD_WIDTH


def _released_architecture(state, where: str) -> dict:
    """open_clip architecture dict of a released-format state dict, inferred from its keys and shapes."""
    required = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
                "visual.ln_post.weight", "token_embedding.weight", "positional_embedding", "ln_final.weight",
                "text_projection", "logit_scale")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{where}: not an OpenAI-CLIP-style CLIP-MoE state dict; missing keys {missing}")
    conv = state["visual.conv1.weight"]
    if conv.dim() != 4 or conv.shape[1] != 3 or conv.shape[2] != conv.shape[3]:
        raise CheckpointError(f"{where}: visual.conv1.weight has shape {tuple(conv.shape)}, expected [width, 3, p, p]")
    vision_width, patch = conv.shape[0], conv.shape[2]
    n_pos = state["visual.positional_embedding"].shape[0]
    grid = math.isqrt(max(n_pos - 1, 0))
    if grid * grid + 1 != n_pos:
        raise CheckpointError(f"{where}: visual.positional_embedding has {n_pos} rows, not a square grid + 1")
    text_width = state["ln_final.weight"].shape[0]
    context, embed_dim = state["positional_embedding"].shape[0], state["text_projection"].shape[-1]
    vision_layers, text_layers = _tower_layers(state, "visual.", where), _tower_layers(state, "", where)
    vision_mlp = _released_mlp_width(state, "visual.transformer.resblocks.0", vision_width, where)
    text_mlp = _released_mlp_width(state, "transformer.resblocks.0", text_width, where)
    arch = {
        "model_class": "LongCLIP" if "positional_embedding_res" in state else "CLIP",
        "embed_dim": int(embed_dim),
        "quick_gelu": True,
        "vision_cfg": {"image_size": int(grid * patch), "patch_size": int(patch), "width": int(vision_width),
                       "layers": vision_layers, "head_width": RELEASED_HEAD_WIDTH,
                       "mlp_ratio": vision_mlp / vision_width},
        "text_cfg": {"context_length": int(context), "vocab_size": int(state["token_embedding.weight"].shape[0]),
                     "width": int(text_width), "heads": _heads(text_width, "ln_final.weight", where),
                     "layers": text_layers, "mlp_ratio": text_mlp / text_width},
    }
    _heads(vision_width, "visual.conv1.weight", where)
    if arch["model_class"] == "LongCLIP":
        arch["short_positions"] = min(LONG_CLIP_SHORT_POSITIONS, int(context))
    return arch


def _released_to_clipmoe(state, where: str):
    """(our state dict, {MoE block: E}, {our key: released key}) of a released-format state dict. Empties `state`
    as it goes, so that each block's expert tensors are freed once stacked (peak memory ~ one file, not two)."""
    ours, rename, experts, gates = {}, {}, {}, {}
    for key in list(state):
        value = state.pop(key)
        gate, expert = _GATE.match(key), _EXPERT.match(key)
        if gate:
            gates[gate["block"]] = value
            ours[f"{gate['block']}.mlp.router.weight"] = value
            rename[f"{gate['block']}.mlp.router.weight"] = key
        elif expert:
            experts.setdefault(expert["block"], {}).setdefault(int(expert["j"]), {})[
                (expert["layer"], expert["param"])] = value
        else:
            ours[key] = value
            rename[key] = key
    if not gates:
        raise CheckpointError(f"{where}: not a CLIP-MoE checkpoint: no '…resblocks.{{i}}.gate.weight' keys "
                              f"(a dense CLIP state dict?)")
    if set(experts) != set(gates):
        odd = sorted(set(experts) ^ set(gates))
        raise CheckpointError(f"{where}: blocks {odd[:4]} have a gate without experts or experts without a gate")
    num_experts = {}
    for block in list(experts):
        by_index = experts.pop(block)
        if sorted(by_index) != list(range(len(by_index))):
            raise CheckpointError(f"{where}: {block} has experts {sorted(by_index)}, expected 0..E-1")
        gate = gates[block]
        if gate.dim() != 2 or gate.shape[0] != len(by_index):
            raise CheckpointError(f"{where}: {block}.gate.weight has shape {tuple(gate.shape)}, expected "
                                  f"[{len(by_index)} experts, width]")
        reference = by_index[0]
        for j, params in by_index.items():
            for (layer, param), slot in _EXPERT_SLOTS.items():
                name = f"{block}.experts.{j}.{layer}.{param}"
                if (layer, param) not in params:
                    raise CheckpointError(f"{where}: missing key {name}")
                if (layer, param) not in reference or params[(layer, param)].shape != reference[(layer, param)].shape:
                    raise CheckpointError(f"{where}: {name} has shape {tuple(params[(layer, param)].shape)}, "
                                          f"expert 0 has {tuple(reference[(layer, param)].shape)}")
        for (layer, param), slot in _EXPERT_SLOTS.items():
            ours[f"{block}.mlp.{slot}"] = torch.stack([by_index[j][(layer, param)] for j in range(len(by_index))])
            rename[f"{block}.mlp.{slot}"] = f"{block}.experts.{{j}}.{layer}.{param}"
        num_experts[block] = len(by_index)
    return ours, num_experts, rename


def load_clip_moe_checkpoint(path, *, top_k: int = 2, dropout: float = 0.0, backend: str = "auto") -> nn.Module:
    """Load a released CLIP-MoE checkpoint into an open_clip model with MoEFFN blocks, ready for inference.

    Args:
        path: the .pt file (a plain state dict saved with torch.save; read with weights_only=True), or a state dict
            already in memory.
        top_k: experts per token (not stored in the file; the released models use top-2).
        dropout: expert dropout in training mode (the official MoE training used 0.1).
        backend: MoEFFN backend.
    Returns an eval-mode `LongCLIP` (an open_clip CLIP with Long-CLIP text positions; a plain open_clip CLIP when the
    file has no `positional_embedding_res`) with quick_gelu, heads = width // 64, image size and patch size from the
    vision keys, the text context (248) from `positional_embedding`; blocks with `gate`/`experts` keys hold an
    MoEFFN, blocks with `mlp` keys stay dense. Weights are loaded exactly (fp32 stays fp32): the official loader
    rounds most weights through fp16, which moves its CPU outputs by about 3e-4 relative.
    Raises FileNotFoundError for a missing file and CheckpointError (a ValueError) naming the file for anything that
    is not such a checkpoint (unreadable or truncated file, no gate/experts keys, missing keys, wrong shapes).
    """
    where = f"CLIP-MoE checkpoint {path}" if isinstance(path, (str, Path)) else "CLIP-MoE state dict"
    state = _released_state(path, where)
    arch = _released_architecture(state, where)
    ours, num_experts, rename = _released_to_clipmoe(state, where)
    sizes = set(num_experts.values())
    if len(sizes) != 1:
        raise CheckpointError(f"{where}: MoE blocks differ in their number of experts: {sorted(sizes)}")
    (num,) = sizes
    if not isinstance(top_k, int) or not 1 <= top_k <= num:
        raise ValueError(f"top_k must be an int in [1, {num}] for {where} ({num} experts), got {top_k!r}")
    config = MoEConfig(num_experts=num, top_k=top_k, activation="quick_gelu", dropout=dropout, renormalize=True,
                       backend=backend)
    model = _build_dense(arch)
    moe_modules = sorted((f"{block}.mlp" for block in num_experts), key=_natural_key)
    _set_moe_layers(model, moe_modules, config, where)
    _load_assign(model, ours, where, rename=lambda k: rename.get(k, k))
    model.clipmoe_architecture = arch
    return model


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def released_state_dict(model: nn.Module) -> dict:
    """The state dict of an open_clip CLIP-MoE model in the released key format (CPU tensors, one storage each)."""
    moes = {name: m for name, m in model.named_modules() if isinstance(m, MoEFFN)}
    if not moes:
        raise ValueError("model has no MoEFFN layer; the released format is for CLIP-MoE models")
    for name, moe in moes.items():
        if not re.fullmatch(r"(visual\.)?transformer\.resblocks\.\d+\.mlp", name):
            raise ValueError(f"MoEFFN {name!r} is not the mlp of an open_clip resblock; the released format only "
                             f"has OpenAI-CLIP key names")
        if moe.activation != "quick_gelu" or not moe.renormalize:
            raise ValueError(f"{name}: the released format means QuickGELU experts with renormalised top-k weights; "
                             f"this layer has activation={moe.activation!r}, renormalize={moe.renormalize}")
    state = model.state_dict()
    out = {}
    for key, value in state.items():
        owner = next((name for name in moes if key.startswith(name + ".")), None)
        if owner is None:
            out[key] = value.detach().cpu()
            continue
        block, slot = owner[:-len(".mlp")], key[len(owner) + 1:]
        if slot == "router.weight":
            out[f"{block}.gate.weight"] = value.detach().cpu()
            continue
        layer, param = next(lp for lp, s in _EXPERT_SLOTS.items() if s == slot)
        for j in range(value.shape[0]):
            out[f"{block}.experts.{j}.{layer}.{param}"] = value[j].detach().cpu().clone()
    return out


def export_clip_moe_checkpoint(model: nn.Module, path) -> Path:
    """Write `model` (from `load_clip_moe_checkpoint`, or any open_clip native CLIP with MoEFFN blocks) as a released
    CLIP-MoE checkpoint: a torch.save'd plain state dict with OpenAI-CLIP key names, written atomically. Load then
    export reproduces the original tensors bit for bit. The official loader expects the Long-CLIP text tower
    (`positional_embedding_res`, 248 positions); a plain open_clip model is written without it."""
    state = released_state_dict(model)
    _released_architecture(state, f"export of {type(model).__name__}")  # only loadable files are written
    path = Path(path)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


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
        architecture = {"model_class": f"transformers.{type(model).__name__}", "hf_config": model.config.to_dict()}
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
        activations += [_activation_name(_dense_mlp_parts(m)[1], "") for m in model.modules()
                        if _dense_mlp_parts(m) is not None]
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
                "moe_cfg": config.to_dict(), "moe_modules": list(moes), "text_context_length": _text_context(model)}
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
        model = _build_dense(arch)
        _set_moe_layers(model, moe_modules, config, where)
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise CheckpointError(f"checkpoint config {config_path}: cannot build its architecture: "
                              f"{type(exc).__name__}: {exc}") from exc
    context = document.get("text_context_length")
    if context is not None and _text_context(model) != context:
        raise CheckpointError(f"checkpoint config {config_path}: text_context_length {context} disagrees with its "
                              f"architecture ({_text_context(model)})")
    from safetensors.torch import load_file
    try:
        state = load_file(weights_path)
    except Exception as exc:  # safetensors' error type moved between versions; any failure here is the file's
        raise CheckpointError(f"checkpoint weights {weights_path}: cannot read them (truncated or corrupt file?): "
                              f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    _load_assign(model, state, f"{where} does not match its config")
    model.clipmoe_architecture = arch
    return model.to(device)

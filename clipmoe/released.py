"""The released CLIP-MoE checkpoint format: load and export.

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
"""
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from clipmoe.checkpoint import CheckpointError, build_dense, load_assign, set_moe_layers
from clipmoe.config import MoEConfig
from clipmoe.fileio import atomic_write
from clipmoe.longclip import LONG_CLIP_SHORT_POSITIONS
from clipmoe.moe_ffn import MoEFFN

RELEASED_HEAD_WIDTH = 64         # the official build infers heads = width // 64 in both towers

# Keys of OpenAI CLIP state dicts that hold Python ints rather than weights (dropped on load, as clip.load does).
_OPENAI_INT_KEYS = ("input_resolution", "context_length", "vocab_size")
_GATE = re.compile(r"^(?P<block>(?:visual\.)?transformer\.resblocks\.\d+)\.gate\.weight$")
_EXPERT = re.compile(r"^(?P<block>(?:visual\.)?transformer\.resblocks\.\d+)\.experts\.(?P<j>\d+)\."
                     r"(?P<layer>c_fc|c_proj)\.(?P<param>weight|bias)$")
_EXPERT_SLOTS = {("c_fc", "weight"): "w1", ("c_fc", "bias"): "b1", ("c_proj", "weight"): "w2", ("c_proj", "bias"): "b2"}


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
            for layer, param in _EXPERT_SLOTS:
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
    model = build_dense(arch)
    moe_modules = sorted((f"{block}.mlp" for block in num_experts), key=_natural_key)
    set_moe_layers(model, moe_modules, config, where)
    load_assign(model, ours, where, rename=lambda k: rename.get(k, k))
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



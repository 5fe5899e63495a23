"""Upcycling: replace the dense MLP of every transformer block of a CLIP model by an MoEFFN.

Recognised MLPs: open_clip's native `Sequential(c_fc, gelu, c_proj)` (both towers of the native CLIP models),
timm's `Mlp(fc1, act, fc2)` (timm vision trunks) and Hugging Face transformers' `CLIPMLP(fc1, activation_fn, fc2)`
(`CLIPModel`, `CLIPVisionModel`, `CLIPTextModel`; see clipmoe.hf_compat). Gated (SwiGLU) and convolutional MLPs are
left alone; MLPs with an inner norm (open_clip's scale_fc=True, timm's Mlp(norm_layer=...)) are refused, since an
expert (linear, activation, linear) cannot represent them.
"""
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from clipmoe.config import MoEConfig
from clipmoe.hf_compat import hf_activation_name, hf_mlp_parts, is_hf_model
from clipmoe.moe_ffn import MoEFFN


def activation_name(act: nn.Module, where: str) -> str:
    kind = type(act).__name__
    if kind == "QuickGELU":
        return "quick_gelu"
    if kind == "GELUTanh" or (kind == "GELU" and getattr(act, "approximate", "none") == "tanh"):
        return "gelu_tanh"
    if kind == "GELU":
        return "gelu"
    if hf_activation_name(act) is not None:
        return hf_activation_name(act)
    raise ValueError(f"{where}: unsupported MLP activation {kind}; MoEFFN supports QuickGELU, GELU and GELU(tanh)")


# Children of open_clip's MLP Sequential that upcycling maps to an expert (`ln` only as an Identity).
_OPEN_CLIP_MLP_CHILDREN = ("c_fc", "gelu", "ln", "c_proj")


def _is_open_clip_mlp(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and hasattr(module, "c_fc") and hasattr(module, "c_proj")


def _inner_layers(module: nn.Module) -> list:
    """Names of the layers of an open_clip / timm MLP that an MoEFFN expert (two linears and an activation) has no
    place for: open_clip's `ln` of scale_fc=True, timm's `norm`, anything else inside the Sequential."""
    if _is_open_clip_mlp(module):
        return [name for name, child in module.named_children()
                if name not in _OPEN_CLIP_MLP_CHILDREN or (name == "ln" and not isinstance(child, nn.Identity))]
    if type(module).__name__ == "Mlp" and isinstance(getattr(module, "fc1", None), nn.Linear):
        return [] if isinstance(getattr(module, "norm", nn.Identity()), nn.Identity) else ["norm"]
    return []


def dense_mlp_parts(module: nn.Module):
    """(up Linear, activation, down Linear, dropout p) of a recognised dense MLP, else None (also for MLPs with an
    inner norm, which `unsupported_mlps` lists)."""
    if _inner_layers(module):
        return None
    if _is_open_clip_mlp(module):
        act = getattr(module, "gelu", None)
        if isinstance(module.c_fc, nn.Linear) and isinstance(module.c_proj, nn.Linear) and act is not None:
            return module.c_fc, act, module.c_proj, 0.0
    if type(module).__name__ == "Mlp" and isinstance(getattr(module, "fc1", None), nn.Linear) \
            and isinstance(getattr(module, "fc2", None), nn.Linear):
        drop = getattr(module, "drop1", None)
        return module.fc1, module.act, module.fc2, drop.p if isinstance(drop, nn.Dropout) else 0.0
    return hf_mlp_parts(module)


def unsupported_mlps(model: nn.Module) -> dict:
    """{module name: [inner layers]} of the open_clip / timm MLPs of `model` that hold a layer an MoEFFN expert
    cannot represent (e.g. the LayerNorm of open_clip's scale_fc=True): `upcycle` refuses such models."""
    return {name: inner for name, m in model.named_modules() for inner in [_inner_layers(m)] if inner}


def dense_mlps(model: nn.Module) -> dict:
    """{module name: module} of the dense MLPs that `upcycle` would replace, in model order."""
    return {name: m for name, m in model.named_modules() if dense_mlp_parts(m) is not None}


def _parent(model: nn.Module, name: str):
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def upcycle(model: nn.Module, num_experts: int = 4, top_k: int = 2,
            experts: Mapping[str, Sequence[Mapping[str, torch.Tensor]]] | None = None, *,
            activation: str | None = None, dropout: float | None = None, renormalize: bool = True,
            backend: str = "auto") -> nn.Module:
    """Replace, in place, every dense MLP of `model` (both towers) by an MoEFFN; returns `model`.

    Args:
        model: an open_clip model, a transformers CLIPModel / CLIPVisionModel / CLIPTextModel, or any module
            holding open_clip / timm / transformers CLIP MLPs.
        num_experts, top_k: E and k of every MoE layer.
        experts: {MLP module name (as in `dense_mlps(model)`, e.g. "visual.transformer.resblocks.0.mlp"):
            [state dict of expert 0, ..., of expert E-1]}, each a dense MLP state dict (c_fc/c_proj or fc1/fc2 keys).
            Blocks not named are initialised with E copies of their own MLP (the default for all blocks).
        activation: override the activation; by default it is read from each MLP (QuickGELU for OpenAI models).
        dropout: expert dropout; by default that of the MLP (0 for open_clip's native MLP).
        renormalize, backend: as in MoEFFN.
    A transformers CLIPModel / CLIPVisionModel / CLIPTextModel becomes, in place, clipmoe.hf_model's CLIPMoEModel /
    CLIPMoEVisionModel / CLIPMoETextModel (a subclass), so `save_pretrained` keeps the experts.
    Routers are randomly initialised (nn.Linear init). With all experts equal to the dense MLP and renormalize=True,
    the upcycled model computes the same function as the dense one (up to rounding).
    """
    unsupported = unsupported_mlps(model)
    if unsupported:
        name, inner = next(iter(unsupported.items()))
        raise ValueError(f"{len(unsupported)} MLP(s) hold layers an MoEFFN expert (linear, activation, linear) has no "
                         f"place for, e.g. {name or 'the model'} has {inner} (open_clip's scale_fc=True adds the "
                         f"LayerNorm 'ln'); copying only the linears would change the model, so it is not upcycled")
    mlps = dense_mlps(model)
    if not mlps:
        raise ValueError("model has no open_clip, timm or transformers CLIP dense MLP to upcycle (already upcycled?)")
    if "" in mlps:
        raise ValueError("model is itself a dense MLP; upcycle replaces the MLPs inside a model in place, so pass the "
                         "model (or block) that holds it, or build an MoEFFN and fill it with MoEFFN.load_expert")
    experts = dict(experts or {})
    unknown = sorted(set(experts) - set(mlps))
    if unknown:
        raise ValueError(f"experts names modules that are not dense MLPs of the model: {unknown[:3]}; "
                         f"expected names such as {list(mlps)[:2]}")
    # Every MoEFFN is built and filled before the first one replaces its MLP: an error leaves the model untouched.
    moes = {}
    for name, mlp in mlps.items():
        up, act, down, mlp_dropout = dense_mlp_parts(mlp)
        if up.bias is None or down.bias is None:
            raise ValueError(f"{name}: MoEFFN experts have biases; this MLP has a Linear without bias")
        states = experts.get(name, [mlp.state_dict()] * num_experts)
        if len(states) != num_experts:
            raise ValueError(f"experts[{name!r}] holds {len(states)} state dicts, expected num_experts={num_experts}")
        moe = MoEFFN(up.in_features, up.out_features, num_experts=num_experts, top_k=top_k,
                     activation=activation or activation_name(act, name),
                     dropout=mlp_dropout if dropout is None else dropout, renormalize=renormalize,
                     backend=backend, device=up.weight.device, dtype=up.weight.dtype)
        for j, state in enumerate(states):
            try:
                moe.load_expert(j, state)
            except ValueError as exc:
                raise ValueError(f"experts[{name!r}][{j}]: {exc}") from None
        moes[name] = moe.train(mlp.training)
    for name, moe in moes.items():
        parent, child = _parent(model, name)
        setattr(parent, child, moe)
    if is_hf_model(model):  # its CLIPMoE class, so that save_pretrained keeps the experts (clipmoe.hf_model)
        from clipmoe.hf_model import adopt_moe_class
        adopt_moe_class(model)
    return model


def upcycle_from_config(model: nn.Module, config: MoEConfig, experts=None) -> nn.Module:
    """`upcycle` with the hyperparameters of a MoEConfig."""
    return upcycle(model, config.num_experts, config.top_k, experts, activation=config.activation,
                   dropout=config.dropout, renormalize=config.renormalize, backend=config.backend)

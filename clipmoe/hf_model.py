"""CLIP-MoE as transformers models: `CLIPMoEConfig` / `CLIPMoEModel` (and the one-tower `CLIPMoEVisionModel`,
`CLIPMoETextModel`), registered with AutoConfig / AutoModel, plus conversion to and from open_clip CLIP(-MoE) models.

A CLIPMoE model is the transformers CLIP class with MoEFFN layers in place of the `CLIPMLP`s its config names
(`moe_layers`, e.g. "vision_model.encoder.layers.0.mlp"; `moe`: the MoEConfig fields), so `save_pretrained` writes a
`config.json` with `"model_type": "clipmoe"` and a `model.safetensors`, and `CLIPMoEModel.from_pretrained` (or
`AutoModel.from_pretrained` once clipmoe.hf_model is imported) rebuilds it offline; no file runs code. `upcycle` of a
transformers CLIPModel / CLIPVisionModel / CLIPTextModel turns it into the matching CLIPMoE class in place (it stays
an instance of the transformers class), so its plain `save_pretrained` keeps the experts.

Long-CLIP text positions (the released CLIP-MoE models): the released file keeps two full [248, D] tables, of which
the model uses rows < 20 of `positional_embedding` and rows >= 20 of `positional_embedding_res`. transformers has one
table, so `position_embedding` holds the used rows and the buffer `embeddings.long_clip_unused_positions` the other
ones (rows < 20 of `_res`, rows >= 20 of the first table): the conversion back gives both tables bit for bit.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from huggingface_hub.dataclasses import strict
from transformers import (
    AutoConfig,
    AutoModel,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)
from transformers.activations import ACT2FN

from clipmoe.checkpoint import CheckpointError, build_dense, load_assign, set_moe_layers
from clipmoe.config import MoEConfig
from clipmoe.hf_compat import hf_activation_name
from clipmoe.moe_ffn import MoEFFN
from clipmoe.upcycle import activation_name, dense_mlp_parts

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"clipmoe.hf_model needs transformers >= 5 (its dataclass configs); found "
                      f"{transformers.__version__}: pip install 'clipmoe[hf]'")

UNUSED_POSITIONS = "long_clip_unused_positions"
# open_clip activation names <-> transformers hidden_act values with the same function
_HIDDEN_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


@strict
class CLIPMoEConfig(CLIPConfig):
    """CLIPConfig plus `moe` (MoEConfig fields; activation None: each layer's from its tower's hidden_act),
    `moe_layers` (module names of the MoEFFN layers) and `long_clip_short_positions` (Long-CLIP text positions)."""
    model_type = "clipmoe"
    moe: dict | None = None
    moe_layers: list | None = None
    long_clip_short_positions: int | None = None


@strict
class CLIPMoEVisionConfig(CLIPVisionConfig):
    """CLIPVisionConfig plus `moe` and `moe_layers` (as in CLIPMoEConfig)."""
    model_type = "clipmoe_vision_model"
    moe: dict | None = None
    moe_layers: list | None = None


@strict
class CLIPMoETextConfig(CLIPTextConfig):
    """CLIPTextConfig plus `moe`, `moe_layers` and `long_clip_short_positions` (as in CLIPMoEConfig)."""
    model_type = "clipmoe_text_model"
    moe: dict | None = None
    moe_layers: list | None = None
    long_clip_short_positions: int | None = None


def _features(output) -> torch.Tensor:
    """get_*_features give a tensor (transformers 4) or an output whose pooler_output is it (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class _MoELayers:
    """What the three CLIPMoE classes share: MoEFFN layers installed from the config, Long-CLIP spare rows."""

    def _install_moe_layers(self, text_embeddings: nn.Module | None):
        config = self.config
        if getattr(config, "long_clip_short_positions", None) is not None and text_embeddings is not None:
            table = text_embeddings.position_embedding.weight
            text_embeddings.register_buffer(UNUSED_POSITIONS, torch.zeros_like(table.detach()))
        fields = dict(config.moe or {})
        for name in config.moe_layers or []:
            try:
                mlp = self.get_submodule(name)
            except AttributeError:
                mlp = None
            parts = dense_mlp_parts(mlp) if mlp is not None else None
            if parts is None:
                raise ValueError(f"{type(config).__name__}.moe_layers names {name!r}, which is not a CLIPMLP of "
                                 f"{type(self).__name__}")
            up, act, _, _ = parts
            moe_cfg = MoEConfig.from_dict({**fields, "activation": fields.get("activation")
                                           or activation_name(act, name)})
            moe = MoEFFN(up.in_features, up.out_features, num_experts=moe_cfg.num_experts, top_k=moe_cfg.top_k,
                         activation=moe_cfg.activation, dropout=moe_cfg.dropout, renormalize=moe_cfg.renormalize,
                         backend=moe_cfg.backend, device=up.weight.device, dtype=up.weight.dtype)
            for j in range(moe.num_experts):  # copied experts until weights are loaded
                moe.load_expert(j, mlp.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent) if parent else self, child, moe)


class CLIPMoEModel(_MoELayers, CLIPModel):
    """transformers CLIPModel with MoEFFN layers (config: CLIPMoEConfig). `get_image_features` /
    `get_text_features` as in CLIPModel; `encode_image` / `encode_text` (open_clip style, optionally L2-normalised)
    give the features as tensors, so clipmoe.eval runs on it unchanged."""
    config_class = CLIPMoEConfig
    config: CLIPMoEConfig

    def __init__(self, config: CLIPMoEConfig):
        super().__init__(config)
        self._install_moe_layers(self.text_model.embeddings)

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = _features(self.get_image_features(pixel_values=pixel_values))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = _features(self.get_text_features(input_ids=input_ids))
        return F.normalize(x, dim=-1) if normalize else x


class CLIPMoEVisionModel(_MoELayers, CLIPVisionModel):
    """transformers CLIPVisionModel with MoEFFN layers (config: CLIPMoEVisionConfig)."""
    config_class = CLIPMoEVisionConfig
    config: CLIPMoEVisionConfig

    def __init__(self, config: CLIPMoEVisionConfig):
        super().__init__(config)
        self._install_moe_layers(None)


class CLIPMoETextModel(_MoELayers, CLIPTextModel):
    """transformers CLIPTextModel with MoEFFN layers (config: CLIPMoETextConfig)."""
    config_class = CLIPMoETextConfig
    config: CLIPMoETextConfig

    def __init__(self, config: CLIPMoETextConfig):
        super().__init__(config)
        self._install_moe_layers(self.embeddings)


MOE_CLASSES = {CLIPModel: CLIPMoEModel, CLIPVisionModel: CLIPMoEVisionModel, CLIPTextModel: CLIPMoETextModel}

for _model in MOE_CLASSES.values():
    AutoConfig.register(_model.config_class.model_type, _model.config_class, exist_ok=True)
    AutoModel.register(_model.config_class, _model, exist_ok=True)


# ------------------------------------------------------------------------------------------ upcycled transformers
def _moe_fields(model: nn.Module, moes: dict) -> dict:
    """The `moe` config entry of a model's MoEFFN layers (which must agree); activation None when every layer uses
    its tower's hidden_act."""
    first = next(iter(moes.values()))
    shared = (first.num_experts, first.top_k, first.dropout, first.renormalize, first.backend)
    for name, moe in moes.items():
        if (moe.num_experts, moe.top_k, moe.dropout, moe.renormalize, moe.backend) != shared:
            raise ValueError(f"{name}: the MoE layers differ in (num_experts, top_k, dropout, renormalize, backend); "
                             f"a CLIPMoE config holds one setting for all of them")
    activations = {moe.activation for moe in moes.values()}
    natural = all(moe.activation == _tower_activation(model, name) for name, moe in moes.items())
    if not natural and len(activations) > 1:
        raise ValueError(f"the MoE layers use activations {sorted(activations)} that differ from their towers' "
                         f"hidden_act; a CLIPMoE config holds one activation")
    fields = MoEConfig(num_experts=first.num_experts, top_k=first.top_k, activation=first.activation,
                       dropout=first.dropout, renormalize=first.renormalize, backend=first.backend).to_dict()
    fields["activation"] = None if natural else first.activation
    return fields


def _tower_activation(model: nn.Module, name: str) -> str | None:
    config = model.config
    if hasattr(config, "vision_config"):
        config = config.vision_config if name.startswith("vision_model.") else config.text_config
    return hf_activation_name(ACT2FN[config.hidden_act])


def adopt_moe_class(model: nn.Module) -> nn.Module:
    """Turn a transformers CLIPModel / CLIPVisionModel / CLIPTextModel holding MoEFFN layers (after `upcycle`, or
    loaded from clipmoe's own format) into the matching CLIPMoE class, in place: its config becomes a CLIPMoE config
    naming the layers, so `save_pretrained` keeps the experts. Other transformers classes holding MoEFFN layers get
    a `save_pretrained` that raises (they cannot store them). Returns `model`."""
    moes = {name: m for name, m in model.named_modules() if isinstance(m, MoEFFN)}
    cls = type(model)
    if cls not in MOE_CLASSES.values():
        if cls not in MOE_CLASSES:
            model.__class__ = _refusing_class(cls)
            return model
        config_class = MOE_CLASSES[cls].config_class
        old = model.config
        new = config_class.from_dict({k: v for k, v in old.to_dict().items() if k != "model_type"})
        for sub in ("text_config", "vision_config"):  # keep the towers' config objects (the submodules hold them)
            if hasattr(old, sub):
                setattr(new, sub, getattr(old, sub))
        model.__class__, model.config = MOE_CLASSES[cls], new
    model.config.moe = _moe_fields(model, moes) if moes else None
    model.config.moe_layers = list(moes)
    return model


_REFUSING = {}


def _refusing_class(cls):
    """`cls` with a save_pretrained that raises: transformers would reload its MoEFFN layers as dense MLPs."""
    if cls not in _REFUSING:
        def save_pretrained(self, *args, **kwargs):
            raise ValueError(f"{cls.__name__} holds clipmoe MoEFFN layers, which transformers cannot store in a "
                             f"{cls.__name__} (from_pretrained would rebuild dense MLPs). Save it with "
                             f"clipmoe.save_checkpoint, or upcycle a CLIPModel / CLIPVisionModel / CLIPTextModel, "
                             f"which save_pretrained as clipmoe.hf_model.CLIPMoEModel / CLIPMoEVisionModel / "
                             f"CLIPMoETextModel")
        _REFUSING[cls] = type(cls.__name__, (cls,), {"save_pretrained": save_pretrained,
                                                     "__module__": cls.__module__})
    return _REFUSING[cls]


# --------------------------------------------------------------------------------------- open_clip <-> transformers
_TOP_KEYS = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK = re.compile(r"^(?P<tower>visual\.)?transformer\.resblocks\.(?P<i>\d+)\.(?P<rest>.+)$")
_BLOCK_PARTS = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
                "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
_TEXT_POSITIONS = "text_model.embeddings.position_embedding.weight"


def hf_layer_name(open_clip_name: str) -> str:
    """open_clip block module name -> transformers CLIPModel name ("visual.transformer.resblocks.0.mlp" ->
    "vision_model.encoder.layers.0.mlp")."""
    m = _BLOCK.match(open_clip_name + ".")
    if m is None:
        raise ValueError(f"{open_clip_name!r} is not inside an open_clip resblock")
    tower = "vision_model" if m["tower"] else "text_model"
    return f"{tower}.encoder.layers.{m['i']}.{m['rest']}"[:-1]


def _key_pairs(open_clip_keys, short: int | None):
    """(open_clip keys, transformers keys, op) for every tensor; op: "same", "transpose", "qkv" or "positions"."""
    pairs, keys = [], set(open_clip_keys)
    for key in open_clip_keys:
        if key in _TOP_KEYS:
            pairs.append(((key,), (_TOP_KEYS[key],), "same"))
        elif key in _TRANSPOSED:
            pairs.append(((key,), (_TRANSPOSED[key],), "transpose"))
        elif key == "positional_embedding":
            if short is None:
                pairs.append(((key,), (_TEXT_POSITIONS,), "same"))
            else:
                pairs.append(((key, "positional_embedding_res"),
                              (_TEXT_POSITIONS, f"text_model.embeddings.{UNUSED_POSITIONS}"), "positions"))
        elif key == "positional_embedding_res" and short is not None:
            continue
        elif (m := _BLOCK.match(key)) is not None:
            prefix = f"{'vision_model' if m['tower'] else 'text_model'}.encoder.layers.{m['i']}."
            rest = m["rest"]
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                param = rest.rpartition("_")[2]
                pairs.append(((key,), tuple(f"{prefix}self_attn.{p}_proj.{param}" for p in "qkv"), "qkv"))
                continue
            part = next((p for p in _BLOCK_PARTS if rest.startswith(p)), None)
            if part is not None:
                pairs.append(((key,), (prefix + _BLOCK_PARTS[part] + rest[len(part):],), "same"))
            elif rest.startswith("mlp.") and rest.rpartition(".")[2] in ("w1", "b1", "w2", "b2") \
                    or rest == "mlp.router.weight":
                pairs.append(((key,), (prefix + rest,), "same"))  # MoEFFN tensors keep their names
            else:
                raise ValueError(f"open_clip tensor {key!r} has no transformers CLIP counterpart")
        else:
            raise ValueError(f"open_clip tensor {key!r} has no transformers CLIP counterpart")
    missing = {"positional_embedding", "visual.proj", "text_projection"} - keys
    if missing:
        raise ValueError(f"the model lacks {sorted(missing)}: not an open_clip CLIP with OpenAI-style towers")
    return pairs


def _to_hf(op, values, short):
    (x, *rest) = values
    if op == "same":
        return (x,)
    if op == "transpose":
        return (x.T.contiguous(),)
    if op == "qkv":
        return tuple(t.clone() for t in x.chunk(3, dim=0))
    res = rest[0]  # Long-CLIP: the used rows, and the unused ones
    return torch.cat([x[:short], res[short:]]), torch.cat([res[:short], x[short:]])


def _from_hf(op, values, short):
    if op == "same":
        return (values[0],)
    if op == "transpose":
        return (values[0].T.contiguous(),)
    if op == "qkv":
        return (torch.cat(values, dim=0),)
    used, unused = values
    return torch.cat([used[:short], unused[short:]]), torch.cat([unused[:short], used[short:]])


def _check_open_clip(model: nn.Module) -> None:
    """Raise unless `model` is an open_clip CLIP whose towers transformers' CLIPModel computes exactly."""
    import open_clip
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    problems = []
    if not isinstance(model, open_clip.CLIP) or not isinstance(visual, VisionTransformer):
        problems.append(f"{type(model).__name__} with a {type(visual).__name__} vision tower (an open_clip CLIP "
                        f"with a ViT is needed)")
    else:
        if visual.attn_pool is not None or getattr(visual, "pool_type", "tok") != "tok" or visual.final_ln_after_pool:
            problems.append("the vision tower does not pool the class token before ln_post")
        if not isinstance(visual.ln_pre, nn.LayerNorm) or not isinstance(visual.proj, nn.Parameter):
            problems.append("the vision tower has no ln_pre or no projection matrix")
        if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
            problems.append(f"non-square images or patches ({visual.image_size}, {visual.patch_size})")
        if getattr(model, "text_pool_type", "argmax") != "argmax" or not isinstance(model.text_projection,
                                                                                     nn.Parameter):
            problems.append("the text tower does not pool at the argmax token into a projection matrix")
        if getattr(model, "logit_bias", None) is not None or model.attn_mask is None:
            problems.append("a logit bias or a text tower without causal mask")
        blocks = list(visual.transformer.resblocks) + list(model.transformer.resblocks)
        if any(not isinstance(getattr(b, "ls_1", nn.Identity()), nn.Identity) for b in blocks) or \
                any(not isinstance(getattr(b, "ln_attn", nn.Identity()), nn.Identity) for b in blocks):
            problems.append("layer scale or extra attention norms in the blocks")
    if problems:
        raise ValueError(f"cannot convert to transformers CLIP: {'; '.join(problems)}")


def _tower_config(blocks):
    """(layers, heads, intermediate size, hidden_act, layer-norm eps) of an open_clip tower's blocks."""
    acts, hidden = set(), set()
    for block in blocks:
        parts = dense_mlp_parts(block.mlp)
        if parts is not None:
            hidden.add(parts[0].out_features)
            acts.add(activation_name(parts[1], "mlp"))
        elif isinstance(block.mlp, MoEFFN):
            hidden.add(block.mlp.hidden_dim)
            acts.add(block.mlp.activation)
        else:
            raise ValueError(f"cannot convert to transformers CLIP: a block MLP is a {type(block.mlp).__name__}")
    if len(acts) != 1 or not acts <= set(_HIDDEN_ACT) or len(hidden) != 1:
        raise ValueError(f"cannot convert to transformers CLIP: the blocks of a tower need one activation among "
                         f"{sorted(_HIDDEN_ACT)} and one MLP width, got {sorted(acts)} and {sorted(hidden)}")
    return len(blocks), blocks[0].attn.num_heads, hidden.pop(), _HIDDEN_ACT[acts.pop()], blocks[0].ln_1.eps


def open_clip_to_hf(model: nn.Module) -> CLIPModel:
    """The transformers model of an open_clip CLIP (a CLIPMoEModel when it holds MoEFFN layers, with the same
    experts and routers; LongCLIP's two position tables as described in the module docstring). Text pooling
    follows open_clip (the argmax token: eos_token_id=2, transformers' argmax rule)."""
    _check_open_clip(model)
    visual = model.visual
    short = getattr(model, "short_positions", None) if hasattr(model, "positional_embedding_res") else None
    v_layers, v_heads, v_hidden, v_act, v_eps = _tower_config(list(visual.transformer.resblocks))
    t_layers, t_heads, t_hidden, t_act, t_eps = _tower_config(list(model.transformer.resblocks))
    moes = {name: m for name, m in model.named_modules() if isinstance(m, MoEFFN)}
    vocab, width = model.token_embedding.weight.shape
    text_config = {"vocab_size": vocab, "hidden_size": width, "intermediate_size": t_hidden,
                   "num_hidden_layers": t_layers, "num_attention_heads": t_heads, "hidden_act": t_act,
                   "max_position_embeddings": model.positional_embedding.shape[0], "layer_norm_eps": t_eps,
                   "projection_dim": model.text_projection.shape[1], "eos_token_id": 2,
                   "bos_token_id": min(49406, vocab - 2), "pad_token_id": 1}
    vision_config = {"hidden_size": visual.conv1.weight.shape[0], "intermediate_size": v_hidden,
                     "num_hidden_layers": v_layers, "num_attention_heads": v_heads, "hidden_act": v_act,
                     "image_size": visual.image_size[0], "patch_size": visual.patch_size[0],
                     "layer_norm_eps": v_eps, "projection_dim": visual.proj.shape[1]}
    config = CLIPMoEConfig(text_config=text_config, vision_config=vision_config,
                           projection_dim=model.text_projection.shape[1],
                           logit_scale_init_value=float(model.logit_scale.detach()), long_clip_short_positions=short)
    hf = CLIPMoEModel(config)
    state = model.state_dict()
    ours = {}
    for src, dst, op in _key_pairs(list(state), short):
        ours.update(zip(dst, _to_hf(op, [state[k].detach().cpu() for k in src], short), strict=True))
    # install MoEFFN layers where open_clip has them, then take every tensor
    hf_moes = {hf_layer_name(name): m for name, m in moes.items()}
    for name, moe in hf_moes.items():
        parent, _, child = name.rpartition(".")
        fresh = MoEFFN(moe.d_model, moe.hidden_dim, num_experts=moe.num_experts, top_k=moe.top_k,
                       activation=moe.activation, dropout=moe.dropout, renormalize=moe.renormalize,
                       backend=moe.backend, device="meta")
        setattr(hf.get_submodule(parent), child, fresh)
    load_assign(hf, ours, f"conversion of {type(model).__name__} to transformers")
    hf.train(model.training)
    return adopt_moe_class(hf) if hf_moes else hf


def open_clip_architecture(config: CLIPConfig) -> dict:
    """The open_clip architecture dict (clipmoe.checkpoint.build_dense) of a transformers CLIP config."""
    v, t = config.vision_config, config.text_config
    if v.hidden_act != t.hidden_act or v.hidden_act not in ("quick_gelu", "gelu"):
        raise ValueError(f"cannot convert to open_clip: hidden_act {v.hidden_act!r} (vision) and {t.hidden_act!r} "
                         f"(text); open_clip's CLIP has one activation, QuickGELU or GELU")
    if v.layer_norm_eps != 1e-5 or t.layer_norm_eps != 1e-5:
        raise ValueError("cannot convert to open_clip: layer_norm_eps must be 1e-5 (open_clip's LayerNorm)")
    if t.eos_token_id not in (2, t.vocab_size - 1):
        raise ValueError(f"cannot convert to open_clip: text eos_token_id {t.eos_token_id} pools at the first "
                         f"such token; open_clip pools at the highest token id (eos_token_id {t.vocab_size - 1} or "
                         f"2 agree with it)")
    short = getattr(config, "long_clip_short_positions", None)
    arch = {"model_class": "CLIP" if short is None else "LongCLIP", "embed_dim": config.projection_dim,
            "quick_gelu": v.hidden_act == "quick_gelu",
            "vision_cfg": {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.hidden_size,
                           "layers": v.num_hidden_layers, "head_width": v.hidden_size // v.num_attention_heads,
                           "mlp_ratio": v.intermediate_size / v.hidden_size},
            "text_cfg": {"context_length": t.max_position_embeddings, "vocab_size": t.vocab_size,
                         "width": t.hidden_size, "heads": t.num_attention_heads, "layers": t.num_hidden_layers,
                         "mlp_ratio": t.intermediate_size / t.hidden_size}}
    if short is not None:
        arch["short_positions"] = short
    return arch


def hf_to_open_clip(model: CLIPModel, *, backend: str | None = None) -> nn.Module:
    """The open_clip CLIP (LongCLIP with Long-CLIP positions) of a transformers CLIPModel / CLIPMoEModel: every
    tensor back under its open_clip name, MoEFFN layers where the transformers model has them."""
    if not isinstance(model, CLIPModel):
        raise ValueError(f"cannot convert a {type(model).__name__} to open_clip: only a CLIPModel / CLIPMoEModel "
                         f"(both towers) has an open_clip counterpart")
    arch = open_clip_architecture(model.config)
    short = arch.get("short_positions")
    target = build_dense(arch)
    moes = {name: m for name, m in model.named_modules() if isinstance(m, MoEFFN)}
    names = {hf_layer_name(n): n for n, m in target.named_modules() if dense_mlp_parts(m) is not None}
    unknown = sorted(set(moes) - set(names))
    if unknown:
        raise ValueError(f"MoE layers {unknown[:3]} are not block MLPs of an open_clip CLIP")
    if moes:
        first = next(iter(moes.values()))
        config = MoEConfig(num_experts=first.num_experts, top_k=first.top_k, activation=first.activation,
                           dropout=first.dropout, renormalize=first.renormalize, backend=backend or first.backend)
        set_moe_layers(target, [names[n] for n in moes], config, f"conversion of {type(model).__name__}")
    hf_state = model.state_dict()
    state, used = {}, set()
    for src, dst, op in _key_pairs(list(target.state_dict()), short):
        missing = [k for k in dst if k not in hf_state]
        if missing:
            raise CheckpointError(f"{type(model).__name__} lacks {missing[:3]} for open_clip's {list(src)}")
        state.update(zip(src, _from_hf(op, [hf_state[k].detach().cpu() for k in dst], short), strict=True))
        used.update(dst)
    left = sorted(set(hf_state) - used)
    if left:
        raise CheckpointError(f"{type(model).__name__} has tensors open_clip's CLIP has no place for: {left[:3]}")
    load_assign(target, state, f"conversion of {type(model).__name__} to open_clip")
    target.clipmoe_architecture = arch
    return target.train(model.training)

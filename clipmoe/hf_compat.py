"""Hugging Face `transformers` CLIP support for `clipmoe.upcycle`: recognising `CLIPMLP` and its activations.

`CLIPModel`, `CLIPVisionModel` and `CLIPTextModel` hold one `CLIPMLP(fc1, activation_fn, fc2)` per encoder layer,
called as `mlp(hidden_states)` on the layer_norm2 output with (N, L, D) input; MoEFFN accepts any leading shape, so it
drops in as `layer.mlp`. Everything here works on class names: importing this module never imports transformers,
which stays an optional extra (`pip install clipmoe[hf]`).
"""

import torch.nn as nn

# Dense MLP classes of transformers with the CLIPMLP layout (fc1 -> activation_fn -> fc2, both Linear with bias, no
# dropout inside the MLP).
HF_MLP_CLASSES = ("CLIPMLP",)

# transformers activation classes (ACT2CLS in transformers/activations.py) -> MoEFFN activation names. The four tanh
# forms (GELUTanh, formerly PytorchGELUTanh; NewGELU; FastGELU; AccurateGELU) compute the same function and differ
# only in rounding; ClippedGELU ("gelu_10") clips its output and is not mapped.
HF_ACTIVATIONS = {
    "QuickGELUActivation": "quick_gelu",    # hidden_act="quick_gelu", OpenAI CLIP configs
    "GELUActivation": "gelu",               # "gelu" and "gelu_python" (erf)
    "GELUTanh": "gelu_tanh",                # "gelu_pytorch_tanh", "gelu_python_tanh"
    "PytorchGELUTanh": "gelu_tanh",         # the same class under its name before transformers 4.5x
    "NewGELUActivation": "gelu_tanh",       # "gelu_new"
    "FastGELUActivation": "gelu_tanh",      # "gelu_fast"
    "AccurateGELUActivation": "gelu_tanh",  # "gelu_accurate"
}


def hf_activation_name(act: nn.Module) -> str | None:
    """MoEFFN's name for a transformers activation module, or None when it is not one MoEFFN computes."""
    return HF_ACTIVATIONS.get(type(act).__name__)


def hf_mlp_parts(module: nn.Module):
    """(fc1, activation_fn, fc2, dropout p = 0) of a transformers CLIPMLP, else None."""
    if type(module).__name__ not in HF_MLP_CLASSES:
        return None
    fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
    act = getattr(module, "activation_fn", None)
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and isinstance(act, nn.Module)):
        return None
    return fc1, act, fc2, 0.0


def is_hf_model(model: nn.Module) -> bool:
    """Whether `model` is a transformers PreTrainedModel (by its config attribute and class hierarchy names)."""
    return any(cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__)


# Fields of clipmoe.hf_model's CLIPMoE configs that name the MoE layers (installed by set_moe_layers on loading).
HF_MOE_LAYER_FIELDS = ("moe", "moe_layers")


def hf_architecture(model: nn.Module) -> dict:
    """clipmoe's architecture dict of a transformers model: its class (clipmoe.hf_model's CLIPMoE classes by their
    own name) and its config without the MoE layers, which the checkpoint names itself."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in HF_MOE_LAYER_FIELDS}
    return {"model_class": f"transformers.{type(model).__name__}", "hf_config": config}


def hf_model_class(name: str):
    """A transformers model class by name, or one of clipmoe.hf_model's CLIPMoE classes."""
    import transformers

    from clipmoe import hf_model
    cls = getattr(transformers, name, None) or getattr(hf_model, name, None)
    if not isinstance(cls, type):
        raise ValueError(f"architecture model_class 'transformers.{name}' is not a class of transformers "
                         f"{transformers.__version__} or of clipmoe.hf_model")
    return cls

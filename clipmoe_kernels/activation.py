"""The expert activations of CLIP models, in plain torch (the references of the fused epilogues).

quick_gelu: x·sigmoid(1.702x), OpenAI CLIP and CLIP-MoE; gelu: exact (erf) GELU, open_clip's default;
gelu_tanh: the tanh approximation (timm's GELUTanh, nn.GELU(approximate="tanh")).
"""
import torch
import torch.nn.functional as F


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu, "gelu_tanh": gelu_tanh}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]

"""MoEConfig: the hyperparameters of a CLIP-MoE FFN layer (saved with checkpoints as the "moe_cfg" JSON section)."""
from dataclasses import asdict, dataclass, fields


@dataclass
class MoEConfig:
    num_experts: int = 4          # E; CLIP-MoE uses 4 (expert 0 = the base FFN, experts 1..3 from MCL stages)
    top_k: int = 2                # experts per token; CLIP-MoE uses top-2
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP), "gelu" (erf) or "gelu_tanh"
    dropout: float = 0.0          # between activation and the second linear; CLIP-MoE trains with 0.1
    renormalize: bool = True      # divide the k routing weights by their sum, as CLIP-MoE does
    backend: str = "auto"         # "auto", "torch" or "naive" (CLIPMOE_BACKEND overrides "auto")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "MoEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known) + sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"moe_cfg has unknown keys {unknown}; known: {sorted(known)}")
        return cls(**{**d, **overrides})

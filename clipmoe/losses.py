"""Router auxiliary losses, plain torch.

balance_loss, form "paper" (CLIP-MoE eqs. 6-9, Switch Transformer): E · Σ_e f_e · P_e, f_e = share of tokens whose
top-1 expert is e, P_e = mean router probability of e; 1 at perfect balance, E when all tokens pick one expert.
form "topk" (the official CLIP-MoE code): E · Σ_{j,e} f[j, e] · P_e with f[j, e] = share of tokens whose j-th choice
is e; k at perfect balance. router_z_loss (ST-MoE): mean over tokens of logsumexp(logits)².

Both come in two forms: from the router's outputs (probs, ids, logits: balance_loss, router_z_loss) and from the
statistics the fused router kernel already produces (per-expert counts and probability sums, the per-token
logsumexp: balance_loss_from_counts, z_loss_from_logsumexp), which cost a few ops on [E] and [T] vectors.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BALANCE_FORMS = ("paper", "topk")


def balance_loss(probs: torch.Tensor, topk_ids: torch.Tensor, form: str = "paper") -> torch.Tensor:
    """probs [T, E] (router softmax), topk_ids [T, k] sorted by decreasing probability -> scalar (0 when T = 0)."""
    if form not in BALANCE_FORMS:
        raise ValueError(f"form must be one of {BALANCE_FORMS}, got {form!r}")
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum()
    mean_prob = probs.mean(dim=0)
    chosen = topk_ids[:, :1] if form == "paper" else topk_ids
    token_share = F.one_hot(chosen.long(), num_experts).to(probs.dtype).mean(dim=0)  # [1 or k, E]
    return num_experts * (token_share * mean_prob).sum()


def balance_loss_from_counts(expert_counts: torch.Tensor, prob_sums: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """E · Σ_e (counts[e] / T) · (prob_sums[e] / T): the paper form from top-1 counts, the "topk" form from counts over
    all k choices. expert_counts [E] (any dtype), prob_sums [E] = Σ_t probs[t, e] -> fp32 scalar (0 when T = 0)."""
    if num_tokens == 0:
        return prob_sums.sum()
    num_experts = prob_sums.shape[0]
    return (num_experts / (num_tokens * num_tokens)) * (expert_counts.to(prob_sums.dtype) * prob_sums).sum()


def z_loss_from_logsumexp(logsumexp: torch.Tensor) -> torch.Tensor:
    """Router z-loss from the per-token logsumexp of the logits [T] (0 when T = 0)."""
    if logsumexp.shape[0] == 0:
        return logsumexp.sum()
    return logsumexp.square().mean()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    if router_logits.shape[0] == 0:
        return router_logits.float().sum()
    return torch.logsumexp(router_logits.float(), dim=-1).square().mean()


@dataclass
class AuxLosses:
    balance: torch.Tensor                 # mean over MoE layers of their balance loss
    z_loss: torch.Tensor                  # mean over MoE layers of their router z-loss
    per_layer: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> balance loss

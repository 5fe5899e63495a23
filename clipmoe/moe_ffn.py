"""MoEFFN: a drop-in Mixture-of-Experts replacement for the MLP of a CLIP transformer block."""
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from clipmoe.losses import AuxLosses, balance_loss, balance_loss_from_counts, router_z_loss, z_loss_from_logsumexp
from clipmoe_kernels import (
    check_backend,
    expert_ffn_naive,
    expert_ffn_torch,
    get_activation,
    moe_ffn_triton,
    select_backend,
    topk_routing_ref,
)

_EXPERT_FFNS = {"naive": expert_ffn_naive, "torch": expert_ffn_torch}  # triton: its own call in forward


@dataclass(eq=False)
class MoEAux:
    """What one forward of an MoEFFN leaves behind for auxiliary losses and routing analysis.

    The losses are computed on first access (then kept): a forward whose losses nobody asks for (evaluation,
    inference, a stage without a balance term) runs no aux-loss op. With the triton backend and a gradient they come
    from the statistics of the fused router kernel (`router_stats`: per-expert counts, probability sums, per-token
    logsumexp), a few ops on [E] and [T] vectors; without a gradient that kernel skips them (router_stats None) and,
    as with the torch backends, a loss asked for is computed from the probabilities, ids and logits."""
    router_logits: torch.Tensor      # [T, E] as produced by the router (input dtype)
    router_probs: torch.Tensor       # [T, E] fp32 softmax
    topk_ids: torch.Tensor           # [T, k] decreasing probability; int64 (int32 from the triton router)
    topk_weights: torch.Tensor       # [T, k] fp32, renormalised when the module renormalises
    router_stats: Any | None = None  # clipmoe_kernels.router.RouterOutput of the fused router, else None
    # computed on first access (a plain dict, not functools.cached_property, whose lock torch.compile cannot trace)
    _losses: dict = field(default_factory=dict, init=False, repr=False)

    def _loss(self, name, compute):
        if name not in self._losses:
            self._losses[name] = compute()
        return self._losses[name]

    @property
    def balance_loss(self) -> torch.Tensor:
        """Scalar, paper form (top-1 share); 1 at perfect balance."""
        stats, num_tokens = self.router_stats, self.topk_ids.shape[0]
        if stats is None:
            return self._loss("paper", lambda: balance_loss(self.router_probs, self.topk_ids, "paper"))
        return self._loss("paper", lambda: balance_loss_from_counts(stats.expert_counts, stats.prob_sums, num_tokens))

    @property
    def balance_loss_topk(self) -> torch.Tensor:
        """Scalar, official-code form (all k choices); k at perfect balance."""
        stats, num_tokens = self.router_stats, self.topk_ids.shape[0]
        if stats is None:
            return self._loss("topk", lambda: balance_loss(self.router_probs, self.topk_ids, "topk"))
        return self._loss("topk", lambda: balance_loss_from_counts(stats.topk_counts, stats.prob_sums, num_tokens))

    @property
    def z_loss(self) -> torch.Tensor:
        """Scalar router z-loss."""
        if self.router_stats is None:
            return self._loss("z", lambda: router_z_loss(self.router_logits))
        return self._loss("z", lambda: z_loss_from_logsumexp(self.router_stats.logsumexp))


class _WeightView:
    """Lets open_clip read `block.mlp.c_fc.weight.dtype` (ResidualAttentionBlock.get_weight_dtype)."""

    def __init__(self, weight):
        self.weight = weight


class MoEFFN(nn.Module):
    """Top-k Mixture of Experts FFN: y = Σ_j w_j · expert_{e_j}(x), with a linear router.

    Router: Linear(d_model, E, bias=False) → fp32 softmax over all E → top-k → renormalise the k weights (switchable).
    Expert e: act(x W1[e]ᵀ + b1[e]) → dropout → W2[e]ᵀ + b2[e], stored stacked in nn.Linear orientation:
    w1 [E, F, D], b1 [E, F], w2 [E, D, F], b2 [E, D].

    Args:
        d_model: D, the width of the block.  hidden_dim: F, the width of each expert (4·D in CLIP).
        num_experts: E >= 1.  top_k: k in [1, E].
        activation: "quick_gelu" (OpenAI CLIP), "gelu" (erf) or "gelu_tanh".
        dropout: probability between activation and the second linear, in training mode (CLIP-MoE: 0.1).
        renormalize: divide the top-k weights by their sum.
        backend: "auto" (CLIPMOE_BACKEND, else triton for CUDA tensors and torch on CPU), "triton" (fused
            kernels; CPU tensors only under TRITON_INTERPRET=1), "torch" (sorted segments) or "naive" (the official
            per-expert loop).
    Input x of any leading shape [..., D] ((L, N, D) and (N, L, D) alike); output of the same shape. After each
    forward, `self.aux` holds a MoEAux (router logits and probabilities, balance and z losses); what forward returns
    is unchanged. Tokens whose router logits are NaN or +inf get NaN outputs (see topk_routing_ref).
    """

    def __init__(self, d_model: int, hidden_dim: int, num_experts: int = 4, top_k: int = 2,
                 activation: str = "quick_gelu", dropout: float = 0.0, renormalize: bool = True,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        for name, value in (("d_model", d_model), ("hidden_dim", hidden_dim), ("num_experts", num_experts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        get_activation(activation)
        check_backend(backend)
        self.d_model, self.hidden_dim = d_model, hidden_dim
        self.num_experts, self.top_k = num_experts, top_k
        self.activation, self.dropout, self.renormalize, self.backend = activation, dropout, renormalize, backend
        factory = {"device": device, "dtype": dtype}
        self.router = nn.Linear(d_model, num_experts, bias=False, **factory)
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, d_model, **factory))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim, **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, hidden_dim, **factory))
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model, **factory))
        self.aux: MoEAux | None = None
        self.reset_parameters()

    def reset_parameters(self):
        """Each expert initialised like a pair of nn.Linear layers; the router like nn.Linear."""
        self.router.reset_parameters()
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(w.shape[-1])
            for e in range(self.num_experts):
                nn.init.kaiming_uniform_(w[e], a=math.sqrt(5))
            nn.init.uniform_(b, -bound, bound)

    @property
    def c_fc(self):
        return _WeightView(self.w1)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, activation={self.activation!r}, dropout={self.dropout}, "
                f"renormalize={self.renormalize}, backend={self.backend!r}")

    @torch.no_grad()
    def load_expert(self, index: int, mlp_state: Mapping[str, torch.Tensor]):
        """Copy a dense MLP's weights into expert `index`. Accepts open_clip (c_fc/c_proj), timm and HF (fc1/fc2)
        key names; keys may carry a module prefix ('mlp.c_fc.weight' works like 'c_fc.weight')."""
        if not 0 <= index < self.num_experts:
            raise ValueError(f"index must be in [0, num_experts={self.num_experts}), got {index}")
        names, keys = {}, {}
        for key, value in mlp_state.items():
            layer, _, param = key.rpartition(".")
            layer = layer.rpartition(".")[2]
            names[(layer, param)] = value
            keys.setdefault((layer, param), []).append(key)
        for up, down in (("c_fc", "c_proj"), ("fc1", "fc2")):  # noqa: B007 (down is used after the loop)
            if (up, "weight") in names:
                break
        else:
            raise ValueError(f"mlp_state has no 'c_fc.weight' or 'fc1.weight' key; got keys {sorted(mlp_state)}")
        targets = {(up, "weight"): self.w1, (up, "bias"): self.b1, (down, "weight"): self.w2, (down, "bias"): self.b2}
        for (layer, param), target in targets.items():
            if len(keys.get((layer, param), ())) > 1:  # e.g. the state dict of a tower: which MLP is meant?
                raise ValueError(f"mlp_state holds several MLPs: keys {keys[(layer, param)][:3]} all give "
                                 f"'{layer}.{param}'; pass the state dict of one MLP")
            if (layer, param) not in names:
                raise ValueError(f"mlp_state lacks '{layer}.{param}' (an MoEFFN expert needs both linears with biases)")
            value = names[(layer, param)]
            if tuple(value.shape) != tuple(target.shape[1:]):
                raise ValueError(f"mlp_state['{layer}.{param}'] has shape {tuple(value.shape)}, expected "
                                 f"{tuple(target.shape[1:])} for d_model={self.d_model}, hidden_dim={self.hidden_dim}")
            target[index].copy_(value)

    def _weights(self):
        """(w1, b1, w2, b2) from the module's parameter dict: `self.w1` first fails over to nn.Module.__getattr__,
        which costs about 0.5 µs per lookup (an AttributeError is built and dropped), a few % of a batch-1 forward.
        A weight that is no longer a registered parameter (a parametrisation) is looked up as an attribute."""
        params = self._parameters
        try:
            return params["w1"], params["b1"], params["w2"], params["b2"]
        except KeyError:
            return self.w1, self.b1, self.w2, self.b2

    def _check_input(self, x: torch.Tensor, w1: torch.Tensor):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dimension d_model={self.d_model}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.device != w1.device:
            raise ValueError(f"x is on {x.device} but the MoEFFN weights are on {w1.device}")
        if x.dtype != w1.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the MoEFFN weights are {w1.dtype} "
                            f"(cast one of them, or run under torch.autocast)")

    def _check_weights(self, w1, b1, w2, b2):
        """Refuses (w1, b1, w2, b2) if they no longer have the module's shapes, one dtype and one device (a
        replaced parameter or `.data`), or if top_k left [1, num_experts]: the fused kernels, called without their
        own checks, would read out of bounds or pick an expert twice."""
        E, F, D = self.num_experts, self.hidden_dim, self.d_model
        if not (isinstance(self.top_k, int) and 1 <= self.top_k <= E):
            raise ValueError(f"MoEFFN.top_k must be an int in [1, num_experts={E}], got {self.top_k!r}")
        if w1.shape != (E, F, D) or b1.shape != (E, F) or w2.shape != (E, D, F) or b2.shape != (E, D):
            raise ValueError(f"MoEFFN weights must be w1 {(E, F, D)}, b1 {(E, F)}, w2 {(E, D, F)}, b2 {(E, D)} "
                             f"(num_experts, hidden_dim, d_model), got {tuple(w1.shape)}, {tuple(b1.shape)}, "
                             f"{tuple(w2.shape)}, {tuple(b2.shape)}")
        device = w1.device
        if not (w1.dtype == b1.dtype == w2.dtype == b2.dtype) or b1.device != device or w2.device != device \
                or b2.device != device:
            raise TypeError(f"MoEFFN weights must share one dtype and device, got "
                            f"{[(str(w.dtype), str(w.device)) for w in (w1, b1, w2, b2)]}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = self._weights()
        self._check_input(x, w1)
        tokens = x.reshape(-1, self.d_model)
        logits = self._modules["router"](tokens)  # not self.router: see _weights
        backend = select_backend(self.backend, x.device)
        if backend == "triton":
            # Router kernel and expert GEMMs in one autograd node (moe_ffn_triton), with the aux-loss statistics
            # when a loss can train (without a gradient the kernel skips them; a loss asked for then is computed
            # from the probabilities and ids, as for the torch backends). The kernels' own argument checks are
            # skipped: x is checked above, the router's outputs are valid by construction, and the module checks
            # its weights and top_k (a few µs at batch 1).
            self._check_weights(w1, b1, w2, b2)
            with_stats = logits.requires_grad and torch.is_grad_enabled()
            y, routed = moe_ffn_triton(tokens, logits, w1, b1, w2, b2, self.top_k, self.renormalize,
                                       self.activation, self.dropout, self.training, with_stats)
            probs, topk_weights, topk_ids = routed[:3]
            stats = routed if with_stats else None
        else:
            stats = None
            probs, topk_weights, topk_ids = topk_routing_ref(logits, self.top_k, self.renormalize)
            y = _EXPERT_FFNS[backend](tokens, topk_ids, topk_weights, w1, b1, w2, b2,
                                      activation=self.activation, dropout_p=self.dropout, training=self.training)
        # object.__setattr__: nn.Module's own __setattr__ checks parameter/buffer/module dicts (about 1 µs per call)
        object.__setattr__(self, "aux", MoEAux(logits, probs, topk_ids, topk_weights, stats))
        # y is a fresh contiguous [T, D]; x's last dimension is d_model (checked). view_as parses no size argument
        # (7.7k instructions against 10.5k for view(*x.shape), 24k for view(x.shape); callgrind)
        return y.view_as(x)


def collect_aux_losses(model: nn.Module, form: str = "paper") -> AuxLosses:
    """Mean over the MoEFFN layers of `model` of the balance loss (form "paper" or "topk") and of the router z-loss,
    from their last forward. CLIP-MoE's objective is L_clip + 0.01 · balance (paper eq. 9)."""
    if form not in ("paper", "topk"):
        raise ValueError(f"form must be 'paper' or 'topk', got {form!r}")
    per_layer, z = {}, []
    for name, module in model.named_modules():
        if isinstance(module, MoEFFN) and module.aux is not None:
            per_layer[name] = module.aux.balance_loss if form == "paper" else module.aux.balance_loss_topk
            z.append(module.aux.z_loss)
    if not per_layer:
        raise ValueError("model has no MoEFFN layer that has run a forward; call the model first")
    return AuxLosses(torch.stack(list(per_layer.values())).mean(), torch.stack(z).mean(), per_layer)

"""Shared test data and references of the MoE tests: random routings, expert weights, the per-token loop references
and a forward-and-gradients runner. One copy here instead of one per test module."""
import torch

from clipmoe_kernels import ACTIVATIONS

# Gradient names in the order `run_with_grads` returns them.
GRAD_NAMES = ["x", "topk_weights", "w1", "b1", "w2", "b2"]


def routing(T, E, k, case="random", generator=None, device=None):
    """topk_ids [T, k] (distinct experts per token, like a real top-k) and fp32 weights summing to 1 per token.

    case: "random"; "all_to_one" (every slot on expert E-1; k = 1 keeps a token's slots distinct); "empty_expert"
    (expert 1 never chosen); "top1_to_one" (slot 0 always expert 0, slot 1 always expert E-1, k = 2);
    "two_experts" (only experts 0 and 2, k <= 2)."""
    if case == "random":
        ids = torch.rand(T, E, generator=generator).argsort(dim=1)[:, :k]
    elif case == "all_to_one":
        ids = torch.full((T, k), E - 1)
    elif case == "empty_expert":
        used = torch.tensor([e for e in range(E) if e != 1])
        ids = used[torch.rand(T, len(used), generator=generator).argsort(dim=1)[:, :k]]
    elif case == "top1_to_one":
        ids = torch.tensor([[0, E - 1]]).repeat(T, 1)
    elif case == "two_experts":
        ids = torch.tensor([[0, 2]]).repeat(T, 1)[:, :k]
    else:
        raise ValueError(case)
    w = torch.rand(T, k, generator=generator) + 0.1
    return ids.to(device), (w / w.sum(-1, keepdim=True)).to(device)


def expert_weights(D, F, E, dtype=torch.float32, device=None):
    """[w1 [E, F, D], b1 [E, F], w2 [E, D, F], b2 [E, D]] scaled like nn.Linear (outputs O(1))."""
    tensors = [torch.randn(E, F, D) / D**0.5, torch.randn(E, F) * 0.1, torch.randn(E, D, F) / F**0.5,
               torch.randn(E, D) * 0.1]
    return [t.to(device=device, dtype=dtype) for t in tensors]


def run_with_grads(fn, x, ids, w, params, activation, g, **kwargs):
    """y = fn(x, ids, w, *params, activation=...) and the gradients of (x, topk_weights, w1, b1, w2, b2) for
    upstream gradient g (leaves are fresh clones, so the inputs are untouched)."""
    leaves = [t.detach().clone().requires_grad_() for t in [x, w] + list(params)]
    xl, wl, w1, b1, w2, b2 = leaves
    y = fn(xl, ids, wl, w1, b1, w2, b2, activation=activation, **kwargs)
    grads = torch.autograd.grad(y, leaves, g.to(y.dtype))
    return y, list(grads)


def per_token_reference(x, router_w, w1, b1, w2, b2, top_k, activation, renormalize=True):
    """Readable oracle of a whole MoE layer: route each token on its own, then sum its k experts one by one."""
    act = ACTIVATIONS[activation]
    ys = []
    for t in range(x.shape[0]):
        probs = torch.softmax(x[t] @ router_w.T, dim=-1)
        weights, ids = torch.topk(probs, top_k)
        if renormalize:
            weights = weights / weights.sum()
        y = torch.zeros_like(x[t])
        for w, e in zip(weights, ids.tolist(), strict=True):
            y = y + w * (act(x[t] @ w1[e].T + b1[e]) @ w2[e].T + b2[e])
        ys.append(y)
    return torch.stack(ys) if ys else x.new_zeros(x.shape)


def expert_reference(x, topk_ids, topk_weights, w1, b1, w2, b2, activation, keep=None):
    """Per-(token, slot) loop with a given routing, in the dtype of its inputs. keep: optional [T, k, F] 0/1 dropout
    keep mask (already divided by the keep probability), applied between the activation and W2."""
    act = ACTIVATIONS[activation]
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros_like(x[t])
        for j, e in enumerate(topk_ids[t].tolist()):
            a = act(x[t] @ w1[e].T + b1[e])
            if keep is not None:
                a = a * keep[t, j].to(a.dtype)
            y = y + topk_weights[t, j].to(x.dtype) * (a @ w2[e].T + b2[e])
        rows.append(y)
    return torch.stack(rows)

"""Routing analysis of the MoE layers of a model.

Routing analysis, `collect_routing` / `routing_statistics` / `plot_routing_heatmap`: per tower ("visual" for modules
whose name starts with "visual." or "vision_model.", else "text"), per MoE layer (module name) and per expert, the
share of the routed tokens whose j-th choice is that expert (j = 1..k: first choice, second choice, ...), the mean
router probability, and the balance losses of the layer (docs/method.md, section 4) over the same tokens. Every token
that passes a layer counts, padding tokens and the ViT class token included (the model routes them too).
"""
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn as nn

from clipmoe.moe_ffn import MoEFFN


def tower_of(module_name: str) -> str:
    """"visual" for the image tower (open_clip "visual.", transformers "vision_model."), else "text"."""
    return "visual" if module_name.startswith(("visual.", "vision_model.")) else "text"


class RoutingCollector:
    """Routing counts of MoEFFN layers, accumulated over forwards (see `collect_routing`).

    Per layer: tokens seen, forwards, counts [k, E] of tokens whose j-th choice is expert e, and the sum of the
    router probabilities [E] (float64). `statistics()` turns them into `routing_statistics`' dict.
    """

    def __init__(self, source: str = "collected"):
        self.source = source
        self.layers: dict[str, dict] = {}

    def add(self, name: str, module: MoEFFN) -> None:
        """Add the routing of `module`'s last forward (its `aux`) under layer `name`."""
        aux = module.aux
        if aux is None or aux.topk_ids.shape[0] == 0:
            return
        ids = aux.topk_ids.detach().long()
        num_tokens, top_k = ids.shape
        num_experts = aux.router_probs.shape[1]
        slots = ids + torch.arange(top_k, device=ids.device) * num_experts  # (choice j, expert e) -> j·E + e
        counts = torch.bincount(slots.flatten(), minlength=top_k * num_experts).view(top_k, num_experts)
        prob_sum = aux.router_probs.detach().sum(dim=0, dtype=torch.float64)
        layer = self.layers.get(name)
        if layer is None:
            self.layers[name] = {"tokens": num_tokens, "forwards": 1, "counts": counts, "prob_sum": prob_sum}
        else:
            layer["tokens"] += num_tokens
            layer["forwards"] += 1
            layer["counts"] = layer["counts"] + counts.to(layer["counts"].device)
            layer["prob_sum"] = layer["prob_sum"] + prob_sum.to(layer["prob_sum"].device)

    def statistics(self) -> dict:
        """The routing statistics of everything added so far (format: `routing_statistics`)."""
        if not self.layers:
            raise ValueError("no MoEFFN forward was recorded (does the model have MoE layers, and did it run "
                             "inside collect_routing?)")
        towers: dict[str, dict] = {}
        for name, layer in self.layers.items():
            counts = layer["counts"].double().cpu()
            share = counts / layer["tokens"]                       # [k, E]; each row sums to 1
            mean_prob = (layer["prob_sum"].cpu() / layer["tokens"])  # [E]
            num_experts = share.shape[1]
            stats = {
                "num_tokens": layer["tokens"], "num_forwards": layer["forwards"],
                "num_experts": num_experts, "top_k": share.shape[0],
                "choice_share": share.tolist(),
                "first_choice_share": share[0].tolist(),
                "mean_router_prob": mean_prob.tolist(),
                # the balance losses of clipmoe.losses.balance_loss, over all the tokens counted here
                "balance_loss": (num_experts * (share[0] * mean_prob).sum()).item(),
                "balance_loss_topk": (num_experts * (share * mean_prob).sum()).item(),
            }
            if share.shape[0] >= 2:
                stats["second_choice_share"] = share[1].tolist()
            towers.setdefault(tower_of(name), {"layers": {}})["layers"][name] = stats
        for tower in towers.values():
            losses = [s["balance_loss"] for s in tower["layers"].values()]
            tower["num_layers"] = len(losses)
            tower["mean_balance_loss"] = sum(losses) / len(losses)
        ordered = {t: towers[t] for t in ("visual", "text") if t in towers}
        return {"source": self.source, "towers": ordered}


@contextmanager
def collect_routing(model: nn.Module) -> Iterator[RoutingCollector]:
    """Accumulate the routing of every MoEFFN of `model` over all forwards run inside the block:

        with collect_routing(model) as routing:
            evaluate_synthetic(model, data, tokenizer)
        stats = routing_statistics(model, routing)

    Forward hooks read each layer's `aux` after every forward; they are removed when the block ends, and the
    counts stay readable. A model without MoEFFN layers records nothing (statistics() then raises).
    """
    collector = RoutingCollector()
    handles = [module.register_forward_hook(lambda m, args, out, name=name: collector.add(name, m))
               for name, module in model.named_modules() if isinstance(module, MoEFFN)]
    try:
        yield collector
    finally:
        for handle in handles:
            handle.remove()


def routing_statistics(model: nn.Module, collector: RoutingCollector | None = None) -> dict:
    """Per tower, MoE layer and expert: the share of tokens routed to the expert as j-th choice, and per layer the
    balance losses. JSON-serialisable.

    With a `collector` (from `collect_routing`): over every forward it recorded, e.g. a whole eval set. Without:
    from each MoEFFN's last forward only (call it right after running the model on eval data; with separate image
    and text forwards, each tower reflects its own last batch).

    Returns {"source": "collected" | "last_forward", "towers": {"visual" | "text": {"num_layers", "mean_balance_loss",
    "layers": {module name: {"num_tokens", "num_forwards", "num_experts", "top_k", "choice_share" [k][E] (each row
    sums to 1), "first_choice_share" [E], "second_choice_share" [E] (k >= 2), "mean_router_prob" [E],
    "balance_loss" (paper form: E·Σ_e f_e·P_e with first choices; 1 at perfect balance), "balance_loss_topk"
    (official-code form over all k choices; k at perfect balance)}}}}}.
    """
    if collector is None:
        collector = RoutingCollector(source="last_forward")
        moes = [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFFN)]
        if not moes:
            raise ValueError("the model has no MoEFFN layer")
        for name, module in moes:
            collector.add(name, module)
        if not collector.layers:
            raise ValueError("no MoEFFN layer of the model has run a forward; run the model on eval data first")
    return collector.statistics()


def _layer_label(name: str, tower: str) -> str:
    prefix = {"visual": ("visual.", "vision_model."), "text": ()}[tower]
    for p in prefix:
        if name.startswith(p):
            name = name[len(p):]
    for suffix in (".mlp", ".moe"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.replace("transformer.resblocks.", "block ").replace("encoder.layers.", "block ")


def plot_routing_heatmap(stats: Mapping, path, *, choices: int | None = None, title: str | None = None):
    """Heatmaps of `routing_statistics` (like the CLIP-MoE paper's routing figure): one column of panels per tower,
    one row per routing choice (first choice, second choice, ... up to `choices`, default all k); each panel is
    layers x experts, the cell the share of the layer's tokens whose j-th choice is that expert. Writes a PNG (Agg,
    no pyplot state) and returns `path`."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    towers = stats.get("towers") if isinstance(stats, Mapping) else None
    if not towers:
        raise ValueError("stats has no towers; pass the dict returned by routing_statistics")
    top_k = max(layer["top_k"] for t in towers.values() for layer in t["layers"].values())
    rows = top_k if choices is None else max(1, min(choices, top_k))
    max_layers = max(len(t["layers"]) for t in towers.values())
    max_experts = max(layer["num_experts"] for t in towers.values() for layer in t["layers"].values())
    width = 1.5 + len(towers) * (2.2 + 0.4 * max_experts)
    height = 0.8 + rows * (1.0 + 0.3 * max_layers)
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, len(towers), squeeze=False)
    vmax = max(max(layer["choice_share"][j]) for t in towers.values() for layer in t["layers"].values()
               for j in range(min(rows, layer["top_k"])))
    ordinal = ["first", "second", "third"] + [f"{j + 1}th" for j in range(3, rows)]
    image = None
    for col, (tower, data) in enumerate(towers.items()):
        names = list(data["layers"])
        grid = np.full((rows, len(names), max_experts), np.nan)
        for i, name in enumerate(names):
            layer = data["layers"][name]
            for j in range(min(rows, layer["top_k"])):
                grid[j, i, : layer["num_experts"]] = layer["choice_share"][j]
        for j in range(rows):
            ax = axes[j][col]
            image = ax.imshow(grid[j], aspect="auto", cmap="viridis", vmin=0.0, vmax=max(vmax, 1e-9))
            ax.set_title(f"{tower}: {ordinal[j]} choice", fontsize=9)
            ax.set_xticks(range(max_experts), [str(e) for e in range(max_experts)], fontsize=7)
            ax.set_yticks(range(len(names)), [_layer_label(n, tower) for n in names], fontsize=7)
            ax.set_xlabel("expert", fontsize=8)
            if len(names) * max_experts <= 512:
                for (i, e), value in np.ndenumerate(grid[j]):
                    if not np.isnan(value):
                        ax.text(e, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=6,
                                color="white" if value < 0.6 * vmax else "black")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="share of tokens")
    fig.suptitle(title or f"routing ({stats.get('source', '')}); cell = % of the layer's tokens", fontsize=9)
    from clipmoe.fileio import atomic_write
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return os.fspath(path)

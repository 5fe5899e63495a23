"""The runner of `clipmoe demo`: CLIP-MoE's comparison in miniature, as a set of tasks per seed run on a small
process pool (one torch thread each, so the numbers do not depend on how many run at once).

The setting (clipmoe.data.synthetic.ShiftShapes): a tiny CLIP is pre-trained from scratch on short captions that
name three easy attributes (the web alt-text analogue); every method then fine-tunes it on NEW samples whose
captions name all six attributes (the re-caption analogue), and is evaluated on held-out images: full-caption
retrieval, per-attribute zero-shot accuracy and the pre-training task (short-caption retrieval, for forgetting).

One recipe for every step: label smoothing `DemoScale.label_smoothing` everywhere; pre-training learns the logit
scale, fine-tuning keeps it fixed at the base's learned value (CLIP-MoE fixes OpenAI CLIP's learned 100).

Budgets, in fine-tuning steps of one batch (F = finetune_steps, R = router_steps):
- "stage" (as in the paper): every MCL stage is as long as a direct fine-tune (F), router training R; DMU and its
  control cost 3F + R, "w/o MCL" F + R (it reuses the direct fine-tune as its second expert).
- "compute": every fine-tuned model gets F in all: MCL stages (F − R) / 3 each + R router steps; "w/o MCL" F − R + R.
Control: the same multiplet with random negatives (clusters = 1: every stage samples random batches).
"""
import contextlib
import copy
import io
import json
import math
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

ZS_EASY = ("colour", "size", "position")


@dataclass(frozen=True)
class DemoScale:
    pretrain_samples: int = 8192
    finetune_samples: int = 4096
    test_samples: int = 1024
    batch_size: int = 64
    pretrain_steps: int = 400
    pretrain_lr: float = 2e-3
    finetune_steps: int = 320        # F
    router_steps: int = 40           # R
    ffn_lr: float = 2e-3
    router_lr: float = 1e-3          # routers start random: higher than the paper's 1e-6 for so few steps
    num_experts: int = 4             # main table: 3 MCL stages + the base FFN
    top_k: int = 2
    clusters: int = 3                # per modality and stage (CLIP-MoE: 3); 3 values per attribute
    expert_dropout: float = 0.1
    label_smoothing: float = 0.0     # pre-training and fine-tuning alike
    width: int = 64                  # both towers; 2 blocks each; 12-px patches on 36-px images (one per cell)
    layers: int = 2
    seeds: int = 3
    sweep_experts: tuple[int, ...] = (2, 4, 8)
    sweep_top_k: tuple[int, ...] = (1, 2, 3)
    bootstrap: int = 1000
    collapse_ratio: float = 0.9      # pre-training collapsed when its final loss > ratio * ln(batch)


SCALES = {
    "cpu": DemoScale(),
    # tiny keeps the demo's model and halves the pre-training lr: on the 12-px-patch images a 1-block or 32-wide
    # model, or lr 2e-3 for 60 steps, collapses in pre-training (loss = ln batch) for seed 0 or 1
    "tiny": DemoScale(pretrain_samples=512, finetune_samples=256, test_samples=128, batch_size=32,
                      pretrain_steps=60, pretrain_lr=1e-3, finetune_steps=12, router_steps=3, seeds=2,
                      sweep_experts=(2, 4), sweep_top_k=(1, 2), bootstrap=200),
}


def set_threads():
    """One intra-op thread per process: the same numbers however many processes share the machine."""
    torch.set_num_threads(1)


def build_model(scale: DemoScale, seed: int):
    import open_clip

    from clipmoe.data.synthetic import SHIFT_CANVAS, SHIFT_CELL, SHIFT_CONTEXT, SHIFT_VOCAB, WordTokenizer
    torch.manual_seed(seed)
    return open_clip.CLIP(
        embed_dim=64, quick_gelu=True,
        vision_cfg=dict(image_size=SHIFT_CANVAS, layers=scale.layers, width=scale.width, head_width=32,
                        patch_size=SHIFT_CELL),
        text_cfg=dict(context_length=SHIFT_CONTEXT, vocab_size=WordTokenizer(SHIFT_VOCAB).vocab_size,
                      width=scale.width, heads=max(1, scale.width // 32), layers=scale.layers))


def datasets(scale: DemoScale):
    from clipmoe.data.synthetic import ShiftShapes
    return (ShiftShapes(scale.pretrain_samples, source="pretrain"), ShiftShapes(scale.finetune_samples),
            ShiftShapes(scale.test_samples, source="test"))


def check_pretraining(losses: list[float], batch_size: int, ratio: float = 0.9, tail: int = 20) -> float:
    """Mean loss of the last `tail` steps; ValueError when it stays above ratio * ln(batch) (the loss of uniform
    similarities: the towers learned nothing that matches images to captions)."""
    if not losses:
        raise ValueError("pre-training logged no loss")
    final = float(np.mean(losses[-tail:]))
    if final > ratio * math.log(batch_size):
        raise ValueError(f"pre-training collapsed: its final loss {final:.3f} stays near ln(batch) = "
                         f"{math.log(batch_size):.3f} (uniform similarities); every fine-tune would start from a "
                         f"model that matches nothing, so the demo stops here (lower DemoScale.pretrain_lr)")
    return final


def _cfg(scale: DemoScale, steps: int, lr: float, seed: int, logit_scale: float | None, wd: float = 0.2):
    from clipmoe.train.loop import TrainConfig
    return TrainConfig(lr=lr, weight_decay=wd, warmup_steps=max(1, steps // 10), max_steps=steps,
                       batch_size=scale.batch_size, checkpoint_every=steps, seed=seed,
                       label_smoothing=scale.label_smoothing, logit_scale=logit_scale)


# --------------------------------------------------------------------------------------------------- evaluation
def parameter_counts(model) -> dict:
    """Total parameters, and those active for one token (top-k of E experts in each MoE layer)."""
    from clipmoe.moe_ffn import MoEFFN
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoEFFN):
            per_expert = (m.w1.numel() + m.b1.numel() + m.w2.numel() + m.b2.numel()) // m.num_experts
            inactive += (m.num_experts - m.top_k) * per_expert
    return {"total": total, "active": total - inactive}


@torch.no_grad()
def evaluate(model, test) -> dict:
    """Per-sample outcomes on the held-out split (bool arrays; their mean x 100 is the metric in %), routing
    shares of an MoE model, and the summary metrics."""
    from clipmoe.eval import class_embeddings, collect_routing, embed_images, embed_texts, routing_statistics
    from clipmoe.eval.stats import retrieval_hits, zero_shot_hits
    from clipmoe.moe_ffn import MoEFFN

    model.eval()
    is_moe = any(isinstance(m, MoEFFN) for m in model.modules())
    with collect_routing(model) as routing:
        images = embed_images(model, test, progress=False)
        full = embed_texts(model, test.tokenizer(test.full_captions), progress=False)
        short = embed_texts(model, test.tokenizer(test.short_captions), progress=False)
        hits = {f"full_{k}": v for k, v in retrieval_hits(images, full, test.full_captions).items()}
        hits.update({f"short_{k}": v for k, v in retrieval_hits(images, short, test.short_captions).items()})
        for j, attribute in enumerate(test.attributes):
            classifier = class_embeddings(model, test.tokenizer, test.zero_shot_prompts(attribute), progress=False)
            hits[f"zs_{attribute}"] = zero_shot_hits(images, classifier, test.labels[:, j])
    out = {"hits": {k: v.astype(bool) for k, v in hits.items()}, "parameters": parameter_counts(model)}
    if is_moe:
        stats = routing_statistics(model, routing)
        out["routing"] = {tower: np.mean([layer["first_choice_share"] for layer in t["layers"].values()],
                                         axis=0).tolist() for tower, t in stats["towers"].items()}
    return out


def summary(hits: dict[str, np.ndarray], attributes) -> dict[str, float]:
    out = {k: 100.0 * float(np.mean(v)) for k, v in hits.items()}
    hard = [a for a in attributes if a not in ZS_EASY]
    out["zs_mean"] = float(np.mean([out[f"zs_{a}"] for a in attributes]))
    out["zs_easy"] = float(np.mean([out[f"zs_{a}"] for a in ZS_EASY]))
    out["zs_hard"] = float(np.mean([out[f"zs_{a}"] for a in hard]))
    return out


# -------------------------------------------------------------------------------------------------------- tasks
def _quiet():
    """Workers log to a buffer: train()'s progress bars and stage lines would interleave on the terminal."""
    buffer = io.StringIO()
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(buffer))
    stack.enter_context(contextlib.redirect_stderr(buffer))
    return stack, buffer


def _load_base(scale: DemoScale, seed: int, out: Path):
    model = build_model(scale, seed)
    model.load_state_dict(torch.load(out / f"seed{seed}" / "base.pt", weights_only=True))
    return model


def task_pretrain(scale: DemoScale, seed: int, out: Path) -> dict:
    from clipmoe.data.sampler import ClusterBatchSampler
    from clipmoe.train.contrastive import ContrastiveLoss
    from clipmoe.train.distributed import DistInfo
    from clipmoe.train.loop import train

    pretrain_data, _, test = datasets(scale)
    model = build_model(scale, seed)
    run_dir = out / f"seed{seed}" / "pretrain"
    sampler = ClusterBatchSampler(None, scale.batch_size, num_samples=len(pretrain_data), world_size=1, rank=0,
                                  seed=seed)
    cfg = _cfg(scale, scale.pretrain_steps, scale.pretrain_lr, seed, None, wd=0.1)
    train(model, pretrain_data, sampler, ContrastiveLoss(label_smoothing=scale.label_smoothing), cfg, run_dir,
          trainable="all", info=DistInfo(device=torch.device("cpu")), desc=f"pre-train seed {seed}")
    losses = [json.loads(line)["clip_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    try:
        final = check_pretraining(losses, scale.batch_size, scale.collapse_ratio)
    except ValueError as exc:
        raise ValueError(f"seed {seed}: {exc}") from None
    torch.save(model.state_dict(), out / f"seed{seed}" / "base.pt")
    return {"models": {"base": evaluate(model, test)}, "pretrain_final_loss": final,
            "logit_scale": float(model.logit_scale.detach().exp())}


def _ffn_run(scale, seed, out, name, steps, clusters, stages):
    from clipmoe.train.distributed import DistInfo
    from clipmoe.train.dmu import run_mcl
    _, finetune, _ = datasets(scale)
    base = _load_base(scale, seed, out)
    cfg = _cfg(scale, steps, scale.ffn_lr, seed, float(base.logit_scale.detach().exp()))
    ffns = run_mcl(base, finetune, cfg, out / f"seed{seed}" / name / "mcl", DistInfo(device=torch.device("cpu")),
                   stages=stages, clusters=clusters, small_cluster="remainder")
    return base, finetune, ffns


def _router(scale, seed, base, ffns, top_k, finetune, run_dir):
    from clipmoe.train.distributed import DistInfo
    from clipmoe.train.dmu import build_clip_moe, train_router
    torch.manual_seed(seed)  # router initialisation independent of what this process ran before
    model = build_clip_moe(base, ffns, top_k=top_k, dropout=scale.expert_dropout)
    cfg = _cfg(scale, scale.router_steps, scale.router_lr, seed, float(base.logit_scale.detach().exp()), wd=0.01)
    train_router(model, finetune, cfg, run_dir, DistInfo(device=torch.device("cpu")))
    return model


def cluster_diagnostics(run_dir: Path, stages: int, k: int, labels: torch.Tensor, attributes) -> list:
    """Per clustering s (on stage s's model): ARI with clustering s − 1 (joint labels) and the NMI of its image
    and text clusters with every attribute, and the number of accumulated clusters."""
    from clipmoe.eval.stats import adjusted_rand_index, normalized_mutual_info
    from clipmoe.train.cluster import decode_labels
    accumulated = torch.load(run_dir / f"labels_{stages - 1}.pt", weights_only=True)
    joint = decode_labels(accumulated, k * k, stages).numpy()
    rows = []
    for s in range(stages):
        image, text = joint[:, s] % k, joint[:, s] // k
        acc = torch.load(run_dir / f"labels_{s}.pt", weights_only=True).numpy()
        row = {"clustering": s, "accumulated_clusters": int(len(np.unique(acc))),
               "ari_previous": adjusted_rand_index(joint[:, s - 1], joint[:, s]) if s else None,
               "nmi_image": {a: normalized_mutual_info(image, labels[:, j].numpy()) for j, a in enumerate(attributes)},
               "nmi_text": {a: normalized_mutual_info(text, labels[:, j].numpy()) for j, a in enumerate(attributes)}}
        rows.append(row)
    return rows


def task_mcl(scale: DemoScale, seed: int, out: Path, budget: str, clusters: int, stages: int) -> dict:
    """MCL stages (clusters 1: the random-negative control) and router training at `budget`; for the main run
    also each stage model alone (per-expert table) and the clustering diagnostics."""
    from clipmoe.upcycle import dense_mlps
    f, r = scale.finetune_steps, scale.router_steps
    main = scale.num_experts - 1
    steps = f if budget == "stage" else (f - r) // main
    name = f"{'dmu' if clusters > 1 else 'control'}_{budget}"
    base, finetune, ffns = _ffn_run(scale, seed, out, name, steps, clusters, stages)
    _, _, test = datasets(scale)
    model = _router(scale, seed, base, ffns[:scale.num_experts], scale.top_k, finetune,
                    out / f"seed{seed}" / name / "router")
    result = {"models": {name: evaluate(model, test)}}
    if clusters > 1 and budget == "stage":
        for s in range(1, main + 1):
            stage_model = copy.deepcopy(base)
            for mlp_name, mlp in dense_mlps(stage_model).items():
                mlp.load_state_dict(ffns[s][mlp_name])
            result["models"][f"stage{s}"] = evaluate(stage_model, test)
        result["clusters"] = cluster_diagnostics(out / f"seed{seed}" / name / "mcl", stages, clusters,
                                                 finetune.labels, finetune.attributes)
    return result


def task_baselines(scale: DemoScale, seed: int, out: Path) -> dict:
    from clipmoe.train.distributed import DistInfo
    from clipmoe.train.dmu import ffn_state_dicts, finetune_baseline
    _, finetune, test = datasets(scale)
    base = _load_base(scale, seed, out)
    info = DistInfo(device=torch.device("cpu"))
    scale_t = float(base.logit_scale.detach().exp())
    f, r = scale.finetune_steps, scale.router_steps
    cfg = _cfg(scale, f, scale.ffn_lr, seed, scale_t)
    router_cfg = _cfg(scale, r, scale.router_lr, seed, scale_t, wd=0.01)
    run = out / f"seed{seed}"
    models = {}
    direct = finetune_baseline("direct", base, finetune, cfg, run / "direct", info)
    models["direct"] = evaluate(direct, test)
    models["wo_mcl_stage"] = evaluate(_router(scale, seed, base, [ffn_state_dicts(base), ffn_state_dicts(direct)],
                                              scale.top_k, finetune, run / "wo_mcl_stage"), test)
    torch.manual_seed(seed)
    models["wo_mcl_compute"] = evaluate(finetune_baseline(
        "wo_mcl", base, finetune, replace(cfg, max_steps=f - r, warmup_steps=max(1, (f - r) // 10)),
        run / "wo_mcl_compute", info, top_k=scale.top_k, router_cfg=router_cfg,
        expert_dropout=scale.expert_dropout), test)
    models["sparse_upcycling"] = evaluate(finetune_baseline(
        "sparse_upcycling", base, finetune, cfg, run / "sparse_upcycling", info, num_experts=scale.num_experts,
        top_k=scale.top_k, expert_dropout=scale.expert_dropout), test)
    return {"models": models}


def task_sweep(scale: DemoScale, seed: int, out: Path, experts: int) -> dict:
    """Routers for `experts` experts = the first experts − 1 MCL stages of the stage-budget run, every top-k."""
    from clipmoe.train.dmu import FFN_FILE, load_ffns
    _, finetune, test = datasets(scale)
    base = _load_base(scale, seed, out)
    mcl_dir = out / f"seed{seed}" / "dmu_stage" / "mcl"
    ffns = [load_ffns(mcl_dir / f"stage_{s}" / FFN_FILE, base) for s in range(experts)]
    models = {}
    for k in scale.sweep_top_k:
        if k > experts or (experts == scale.num_experts and k == scale.top_k):
            continue  # k > E does not exist; (E, k) of the main run is the main DMU model
        model = _router(scale, seed, base, ffns, k, finetune, out / f"seed{seed}" / f"sweep_e{experts}_k{k}")
        models[f"sweep_e{experts}_k{k}"] = evaluate(model, test)
    return {"models": models}


TASKS = {"pretrain": task_pretrain, "baselines": task_baselines, "mcl": task_mcl, "sweep": task_sweep}


def run_task(kind: str, args: tuple) -> tuple[dict, float, str]:
    set_threads()
    start = time.time()
    stack, buffer = _quiet()
    with stack:
        result = TASKS[kind](*args)
    return result, time.time() - start, buffer.getvalue()


# ------------------------------------------------------------------------------------------------------ schedule
def plan(scale: DemoScale, out: Path) -> dict[str, tuple[str, tuple, list[str], float]]:
    """name -> (task kind, args, names it depends on, estimated cost in dense steps: larger ones start first)."""
    f, r, main = scale.finetune_steps, scale.router_steps, scale.num_experts - 1
    sweep_stages = max(max(scale.sweep_experts) - 1, main)
    tasks = {}
    for seed in range(scale.seeds):
        pre = f"pretrain{seed}"
        stages = sweep_stages if seed == 0 else main
        tasks[pre] = ("pretrain", (scale, seed, out), [], 1.2 * scale.pretrain_steps)
        tasks[f"baselines{seed}"] = ("baselines", (scale, seed, out), [pre], 3.6 * f + 2 * r)
        for clusters, label in ((scale.clusters, "dmu"), (1, "control")):
            tasks[f"{label}_stage{seed}"] = ("mcl", (scale, seed, out, "stage", clusters,
                                                     stages if label == "dmu" else main), [pre],
                                             (stages if label == "dmu" else main) * f + r)
            tasks[f"{label}_compute{seed}"] = ("mcl", (scale, seed, out, "compute", clusters, main), [pre], f)
    for experts in scale.sweep_experts:
        tasks[f"sweep_e{experts}"] = ("sweep", (scale, 0, out, experts), ["dmu_stage0"],
                                      len(scale.sweep_top_k) * r * (1 + experts / 4))
    return tasks


def save_task(path: Path, result: dict, seconds: float, scale: DemoScale):
    """A finished task as path.json (everything but the per-sample outcomes) and path.npz (those), written last:
    its presence marks the task done (for --resume)."""
    arrays = {f"{model}/{k}": v for model, r in result["models"].items() for k, v in r["hits"].items()}
    light = {**result, "models": {m: {k: v for k, v in r.items() if k != "hits"} for m, r in result["models"].items()}}
    path.with_suffix(".json").write_text(json.dumps({"scale": asdict(scale), "seconds": seconds, "result": light}))
    np.savez_compressed(path.with_suffix(".tmp.npz"), **arrays)
    path.with_suffix(".tmp.npz").replace(path.with_suffix(".npz"))


def load_task(path: Path, scale: DemoScale) -> tuple[dict, float] | None:
    """(result, seconds) of a task saved by save_task with the same scale, else None."""
    if not (path.with_suffix(".npz").exists() and path.with_suffix(".json").exists()):
        return None
    saved = json.loads(path.with_suffix(".json").read_text())
    if saved["scale"] != json.loads(json.dumps(asdict(scale))):
        return None
    result = saved["result"]
    with np.load(path.with_suffix(".npz")) as arrays:
        for key in arrays.files:
            model, metric = key.split("/", 1)
            result["models"][model].setdefault("hits", {})[metric] = arrays[key]
    return result, saved["seconds"]


def run_all(scale: DemoScale, out, jobs: int = 2, log=print, resume: bool = False) -> dict:
    """Run every task (in-process when jobs <= 1) and return {"models": {seed: {model: outcomes}}, ...}. Each
    finished task is saved under out/tasks; resume=True loads those saved with the same scale instead of rerunning.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in range(scale.seeds):
        (out / f"seed{seed}").mkdir(exist_ok=True)
    tasks = plan(scale, out)
    done: dict[str, dict] = {}
    seconds: dict[str, float] = {}

    def ready():
        return sorted((n for n, (_, _, deps, _) in tasks.items()
                       if n not in done and n not in running.values() and all(d in done for d in deps)),
                      key=lambda n: -tasks[n][3])

    def finish(name, result, took, text):
        done[name], seconds[name] = result, took
        (out / "logs").mkdir(exist_ok=True)
        (out / "logs" / f"{name}.log").write_text(text)
        save_task(out / "tasks" / name, result, took, scale)
        log(f"  done {name} ({took:.0f} s; {len(done)}/{len(tasks)} tasks)")

    (out / "tasks").mkdir(exist_ok=True)
    for name in tasks if resume else ():
        saved = load_task(out / "tasks" / name, scale)
        if saved is not None:
            done[name], seconds[name] = saved
            log(f"  loaded {name} (saved by an earlier run)")
    running: dict[object, str] = {}
    if jobs <= 1:
        while len(done) < len(tasks):
            name = ready()[0]
            finish(name, *run_task(tasks[name][0], tasks[name][1]))
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=set_threads) as pool:
            while len(done) < len(tasks):
                for name in ready()[: max(0, jobs - len(running))]:
                    running[pool.submit(run_task, tasks[name][0], tasks[name][1])] = name
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    finish(running.pop(future), *future.result())
    results = {"scale": asdict(scale), "seconds": seconds, "models": {}, "clusters": {}, "pretrain": {}}
    for name, result in sorted(done.items(), key=lambda item: list(tasks).index(item[0])):
        seed = tasks[name][1][1]
        results["models"].setdefault(seed, {}).update(result["models"])
        results["models"][seed] = dict(sorted(results["models"][seed].items()))  # the same order however run
        if "clusters" in result:
            results["clusters"][seed] = result["clusters"]
        if "logit_scale" in result:
            results["pretrain"][seed] = {"final_loss": result["pretrain_final_loss"],
                                         "logit_scale": result["logit_scale"]}
    return results

"""Timing helpers shared by the benchmarks: synchronised rounds and the peak memory of the timed region."""
import torch

# Rounds per provider: enough for a stable median on a noisy machine while the CPU selection stays within minutes.
ROUNDS = {"cpu": 5, "cpu_heavy": 3, "cuda": 20}


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def capture_cuda_graph(fn, warmups: int = 2):
    """(graph, outputs): `fn` run `warmups` times on a side stream (autotune, lazy allocations), then captured in a
    CUDA graph; `outputs` are the captured call's return value, which every graph.replay() overwrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def relative_error(got, want) -> float:
    return ((got.double().cpu() - want.double().cpu()).norm() / want.double().cpu().norm().clamp_min(1e-30)).item()


def time_provider(benchmark, run, device: str, heavy: bool = False):
    """benchmark.pedantic over synchronised calls of `run`; records peak CUDA memory (bytes) in extra_info.
    CPU peak memory is not recorded: torch's CPU allocator has no per-region peak counter."""
    def synced():
        run()
        synchronize(device)

    if device == "cuda":
        synced()  # first call outside the timed region: Triton autotune, cuBLAS heuristics
        torch.cuda.reset_peak_memory_stats()
    rounds = ROUNDS["cuda"] if device == "cuda" else ROUNDS["cpu_heavy" if heavy else "cpu"]
    benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated() if device == "cuda" else None


def clip_train_step(model, images, texts, loss_fn, autocast, moe: bool):
    """The timed closure of an end-to-end training step: contrastive loss (+ 0.01 · balance for a CLIP-MoE), backward,
    SGD step at lr 0 (it costs what a real step does but leaves the weights as checked). `autocast()`: the context."""
    import clipmoe
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def run():
        with autocast():
            image_features, text_features, logit_scale = model(images, texts)[:3]
            loss = loss_fn(image_features, text_features, logit_scale)
            if moe:
                loss = loss + 0.01 * clipmoe.collect_aux_losses(model).balance
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run

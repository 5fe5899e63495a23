"""Tool commands of `clipmoe`: check-upcycle (upcycle with copied experts, compare and time the backends) and
convert (released CLIP-MoE .pt, clipmoe checkpoint, transformers folder)."""
import json
import os
import statistics
import time
from pathlib import Path

import torch

import clipmoe
from clipmoe.cli.common import UsageError, device_arg, positive_int
from clipmoe_kernels import BACKENDS


def _median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_upcycle(args) -> dict:
    """Upcycle an open_clip model with copied experts; report embedding agreement with the dense model and the
    median forward time of each backend (images and texts of one batch, measured side by side in this run)."""
    import open_clip

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = open_clip.create_model(args.model, pretrained=args.pretrained, device=device).eval()
    images = torch.randn(args.batch_size, 3, *open_clip.get_model_preprocess_cfg(model)["size"], device=device)
    texts = torch.randint(1, model.vocab_size, (args.batch_size, model.context_length), device=device)

    def embed():
        with torch.no_grad():
            return model.encode_image(images), model.encode_text(texts)

    dense_image, dense_text = embed()
    report = {"model": args.model, "num_experts": args.num_experts, "top_k": args.top_k, "device": str(device),
              "batch_size": args.batch_size, "available_ops": clipmoe.available_ops(),
              "dense_seconds": _median_seconds(embed, args.repeats), "backends": {}}
    clipmoe.upcycle(model, num_experts=args.num_experts, top_k=args.top_k)
    moes = [m for m in model.modules() if isinstance(m, clipmoe.MoEFFN)]
    backends = [b for b in BACKENDS if b != "auto" and (b != "triton" or device.type == "cuda")]
    for backend in backends:
        for m in moes:
            m.backend = backend
        image, text = embed()
        rel = {name: ((got - want).norm() / want.norm()).item()
               for name, got, want in (("image", image, dense_image), ("text", text, dense_text))}
        report["backends"][backend] = {"image_rel_err": rel["image"], "text_rel_err": rel["text"],
                                       "seconds": _median_seconds(embed, args.repeats)}

    print(f"{args.model} upcycled to {args.num_experts} experts (top-{args.top_k}), {len(moes)} MoE layers, "
          f"batch {args.batch_size} images + {args.batch_size} texts on {device}; compiled ops: "
          f"{ {k: v for k, v in report['available_ops'].items() if k != 'extension_error'} }")
    print(f"{'backend':<8} {'image rel err':>14} {'text rel err':>13} {'median s':>9} {'vs dense':>9}")
    print(f"{'dense':<8} {'-':>14} {'-':>13} {report['dense_seconds']:>9.3f} {1.0:>8.2f}x")
    for backend, r in report["backends"].items():
        print(f"{backend:<8} {r['image_rel_err']:>14.2e} {r['text_rel_err']:>13.2e} {r['seconds']:>9.3f} "
              f"{r['seconds'] / report['dense_seconds']:>8.2f}x")
    return report


def convert(args) -> int:
    """A released CLIP-MoE .pt, a clipmoe checkpoint or a transformers folder (read by its kind) -> a clipmoe
    checkpoint, or with --to-released a released .pt, or with --to-hf a transformers folder (save_pretrained)."""
    from clipmoe.checkpoint import save_checkpoint
    from clipmoe.hf_compat import is_hf_model
    from clipmoe.inference import load_model
    from clipmoe.released import export_clip_moe_checkpoint
    if args.to_released and args.to_hf:
        raise UsageError("pass --to-released or --to-hf, not both")
    check_not_own_source(Path(args.src), Path(args.dst), own_format_out=not (args.to_hf or args.to_released))
    model = load_model(args.src, top_k=args.top_k)
    if args.to_hf or args.to_released:
        from clipmoe import hf_model  # only these directions need transformers
    if args.to_hf:
        model = model if is_hf_model(model) else hf_model.open_clip_to_hf(model)
        model.save_pretrained(args.dst)
        out = args.dst
    elif args.to_released:
        model = hf_model.hf_to_open_clip(model) if is_hf_model(model) else model
        out = export_clip_moe_checkpoint(model, args.dst)
    else:
        out = save_checkpoint(model, args.dst)
    moes = [m for m in model.modules() if isinstance(m, clipmoe.MoEFFN)]
    experts = f"{moes[0].num_experts} experts, top-{moes[0].top_k}" if moes else "dense"
    print(f"wrote {out} ({type(model).__name__}, {len(moes)} MoE layers, {experts})")
    return 0


def check_not_own_source(src: Path, dst: Path, *, own_format_out: bool) -> None:
    """Refuse a destination that is or holds its source (a clipmoe checkpoint is a pair of files; a folder holds
    files): writing it would destroy the file being converted."""
    from clipmoe.checkpoint import checkpoint_files
    sources = [src, *(sorted(src.iterdir()) if src.is_dir() else ()),
               *(checkpoint_files(src) if src.suffix in (".safetensors", ".json") or src.is_dir() else ())]
    targets = [dst, *(checkpoint_files(dst, for_writing=True) if own_format_out else ()),
               *(sorted(dst.iterdir()) if dst.is_dir() else ())]
    if any(_same_file(t, s) for t in targets for s in sources):
        raise ValueError(f"convert: the destination {dst} is (or holds) its source {src}; writing it would destroy "
                         f"the file being converted: choose another destination")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file or folder (after resolving links; hard links count too)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def write_check_upcycle(args) -> int:
    report = check_upcycle(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def add_commands(sub):
    p = sub.add_parser("check-upcycle", help="upcycle an open_clip model with copied experts, compare embeddings "
                                             "with the dense model and time the backends")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint path (unset: random "
                                                      "init)")
    p.add_argument("--num-experts", type=positive_int, default=4, help="experts per MoE layer")
    p.add_argument("--top-k", type=positive_int, default=2, help="experts per token")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images and texts per timed forward")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed forwards per backend; the median is "
                                                                   "reported")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and the model")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    p.set_defaults(func=write_check_upcycle)
    p = sub.add_parser("convert", help="convert a released CLIP-MoE .pt checkpoint to clipmoe's safetensors + JSON "
                                       "format, or back with --to-released")
    p.add_argument("src", help="released .pt file (with --to-released: a clipmoe checkpoint folder or .safetensors)")
    p.add_argument("dst", help="output folder or X.safetensors (or, with --to-released, the .pt file to write)")
    p.add_argument("--to-released", action="store_true", help="write the released OpenAI-CLIP key format")
    p.add_argument("--to-hf", action="store_true", help="write a transformers folder (CLIPMoEModel.save_pretrained)")
    p.add_argument("--top-k", type=positive_int, default=2, help="top-k to record for a released file (not stored "
                                                                 "in it)")
    p.set_defaults(func=convert)

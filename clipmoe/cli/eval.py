"""`clipmoe eval`: zero-shot retrieval and classification of an open_clip model or a clipmoe checkpoint, and the
routing statistics of its MoE layers; results as JSON, routing as a PNG heatmap (metrics: clipmoe.eval.retrieval)."""
import csv
import json
import os
import time
from pathlib import Path

import torch

from clipmoe.data.eval_sets import ImageFiles, dedup_images, group_captions, retrieval_json
from clipmoe.eval import (
    PROTOCOLS,
    ZERO_SHOT_TEMPLATES,
    class_embeddings,
    collect_routing,
    embed_captions,
    embed_images,
    evaluate_synthetic,
    plot_routing_heatmap,
    protocol_metrics,
    routing_statistics,
)
from clipmoe.moe_ffn import MoEFFN

SYNTHETIC_EVAL_SIZE = 1024


def add_commands(sub):
    p = sub.add_parser("eval", help="zero-shot retrieval / classification and routing statistics of a model",
                       description=__doc__)
    p.add_argument("--checkpoint", default=None,
                   help="clipmoe checkpoint folder (or .safetensors), a released CLIP-MoE .pt file, or a "
                        "transformers folder (e.g. from clipmoe convert --to-hf)")
    p.add_argument("--model", default=None,
                   help="open_clip model name (or clipmoe-tiny) to evaluate; with --checkpoint, only the name whose "
                        "transforms and tokenizer to use (default: read from the checkpoint's architecture)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint path for --model")
    p.add_argument("--data", required=True,
                   help="'synthetic[:N]' (the test split of clipmoe's synthetic data; N default "
                        f"{SYNTHETIC_EVAL_SIZE}), a CSV/TSV file, webdataset shards ('d/{{000..009}}.tar'), a "
                        "Karpathy-style COCO/Flickr30k JSON or a COCO captions file such as captions_val2017.json "
                        "(with --image-root)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic dataset (0)")
    p.add_argument("--csv-img-key", default="filepath", help="CSV column of image paths (rows sharing a path are "
                                                             "one image with several captions)")
    p.add_argument("--csv-caption-key", default="title", help="CSV column of captions (retrieval)")
    p.add_argument("--csv-label-key", default=None, help="CSV column of class names: zero-shot classification of "
                                                         "the images over the distinct names")
    p.add_argument("--csv-separator", default="\t", help="CSV separator (default: tab)")
    p.add_argument("--image-root", default=None, help="folder of the images of a Karpathy JSON (and, for a CSV, "
                                                      "of relative paths; default: the CSV's folder)")
    p.add_argument("--split", default="test", help="Karpathy split ('test', 'val', ... or 'all'); default test")
    p.add_argument("--max-captions", type=int, default=None,
                   help="first N captions per image (COCO 5k protocol: 5); default: all for a Karpathy JSON, 5 for "
                        "a COCO captions file")
    p.add_argument("--protocol", choices=PROTOCOLS, default="clipmoe",
                   help="clipmoe: exact score ties count against the model, percent; clip_benchmark: sorting breaks "
                        "ties, clip_benchmark's metric names and fractions, mean per-class recall")
    p.add_argument("--template", action="append", default=None,
                   help="zero-shot prompt template with {} for the class name (repeatable; default: "
                        f"{len(ZERO_SHOT_TEMPLATES)} OpenAI-style photo templates)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the images")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--output", default=None, help="write the results JSON here")
    p.add_argument("--routing-plot", default=None,
                   help="write the routing heatmap PNG here (models with MoE layers; the routing statistics are "
                        "in the results JSON either way)")
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="progress bars even when stderr is not a terminal")
    progress.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_eval)


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available here")
    return device


def load_eval_model(args, device):
    """(model on device, eval preprocess, tokenizer, description) from --checkpoint or --model/--pretrained."""
    from clipmoe.eval.encode import model_transforms
    from clipmoe.inference import load_model
    from clipmoe.models import create_model

    if args.checkpoint:
        if args.pretrained:
            raise ValueError("pass --checkpoint or --pretrained, not both")
        path = Path(args.checkpoint)
        model = load_model(path, device=device)  # released .pt, clipmoe checkpoint or transformers folder
        preprocess, tokenizer = model_transforms(model, args.model)
        description = {"checkpoint": str(path)}
    elif args.model:
        model, _, preprocess, tokenizer = create_model(args.model, args.pretrained, device=device)
        description = {"model": args.model, "pretrained": args.pretrained}
    else:
        raise ValueError("pass --checkpoint (a clipmoe checkpoint) or --model (an open_clip model name)")
    moes = [m for m in model.modules() if isinstance(m, MoEFFN)]
    description.update({"parameters": sum(p.numel() for p in model.parameters()), "moe_layers": len(moes)})
    if moes:
        description.update({"num_experts": moes[0].num_experts, "top_k": moes[0].top_k})
    return model.eval(), preprocess, tokenizer, description


def read_csv_eval(path, img_key: str, caption_key: str, label_key=None, sep: str = "\t", root=None) -> dict:
    """A CSV/TSV for evaluation -> {"paths": unique image paths (first-seen order), "captions", "text_to_image",
    "labels": per image its label string or None}. Rows sharing an image path are one image with several captions;
    rows with an empty caption add no caption. With label_key, rows of one image must agree on its label."""
    path = os.fspath(path)
    root = os.path.dirname(os.path.abspath(path)) if root is None else os.fspath(root)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=sep)
        header = [h.strip() for h in next(reader, [])]
        needed = [(img_key, "--csv-img-key")] + ([(label_key, "--csv-label-key")] if label_key else [])
        if caption_key in header or not label_key:
            needed.append((caption_key, "--csv-caption-key"))
        for key, flag in needed:
            if key not in header:
                hint = f"; the separator {sep!r} may be wrong" if len(header) <= 1 else ""
                raise ValueError(f"{path}: no column {key!r} ({flag}); the header has columns {header}{hint}")
        col = {key: header.index(key) for key, _ in needed}
        rows = []
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            cell = {key: (row[i].strip() if i < len(row) else "") for key, i in col.items()}
            if not cell[img_key]:
                raise ValueError(f"{path}: line {line} has an empty image path (column {img_key!r})")
            rows.append((os.path.join(root, os.path.expanduser(cell[img_key])), cell.get(caption_key, ""),
                         cell.get(label_key, "") if label_key else None, line))
    if not rows:
        raise ValueError(f"{path}: no data rows after the header")
    paths, _ = group_captions([r[0] for r in rows], [r[1] for r in rows])
    index = {p: i for i, p in enumerate(paths)}
    labels = [None] * len(paths)
    for image, _, label, line in rows:
        i = index[image]
        if label:
            if labels[i] is not None and labels[i] != label:
                raise ValueError(f"{path}: line {line} gives image {image} the label {label!r}, an earlier row "
                                 f"{labels[i]!r}")
            labels[i] = label
    with_caption = [r for r in rows if r[1]]
    return {"paths": paths, "captions": [r[1] for r in with_caption],
            "text_to_image": torch.tensor([index[r[0]] for r in with_caption], dtype=torch.long), "labels": labels}


def _retrieval_on_subset(image_features, text_features, text_to_image, protocol):
    """The protocol's retrieval metrics over the images that have at least one caption."""
    has_caption = torch.bincount(text_to_image, minlength=image_features.shape[0]) > 0
    new_index = torch.cumsum(has_caption.long(), 0) - 1
    return protocol_metrics(protocol)[0](image_features[has_caption], text_features, new_index[text_to_image])


def _evaluate_files(model, images: ImageFiles, captions, text_to_image, labels, args, tokenizer, device) -> dict:
    result = {"num_images": len(images), "num_texts": len(captions)}
    image_features = embed_images(model, images, device, args.batch_size, args.workers, progress=args.progress)
    if captions:
        text_features = embed_captions(model, tokenizer, captions, device, args.batch_size, args.progress)
        result["retrieval"] = _retrieval_on_subset(image_features, text_features, text_to_image, args.protocol)
    if labels is not None:
        labelled = [i for i, label in enumerate(labels) if label]
        if not labelled:
            raise ValueError(f"--csv-label-key {args.csv_label_key}: every label is empty")
        names = sorted({labels[i] for i in labelled})
        templates = args.template or ZERO_SHOT_TEMPLATES
        for t in templates:
            if "{}" not in t:
                raise ValueError(f"--template {t!r} has no {{}} for the class name")
        classifier = class_embeddings(model, tokenizer, [[t.format(n) for t in templates] for n in names], device,
                                      args.batch_size, progress=args.progress)
        targets = torch.tensor([names.index(labels[i]) for i in labelled])
        result["zero_shot"] = {args.csv_label_key: {
            **protocol_metrics(args.protocol)[1](image_features[labelled], classifier, targets),
            "num_classes": len(names),
            "num_images": len(labelled), "num_templates": len(templates)}}
    return result


def run_eval(args, model, preprocess, tokenizer, device) -> dict:
    """The metrics of --data (dispatch on its kind)."""
    spec = args.data
    if spec == "synthetic" or spec.startswith("synthetic:"):
        from clipmoe.data.synthetic import SyntheticShapes
        n = int(spec.partition(":")[2] or SYNTHETIC_EVAL_SIZE)
        data = SyntheticShapes(n, split="test", seed=args.data_seed, preprocess=preprocess, tokenizer=tokenizer)
        result = evaluate_synthetic(model, data, tokenizer, device, args.batch_size, progress=args.progress,
                                    protocol=args.protocol)
        result["num_images"] = result["num_texts"] = result.pop("num_samples")
        return result
    if ".tar" in spec:
        from clipmoe.data.webdataset import WebDatasetCaptions
        samples = WebDatasetCaptions(spec).to_indexed()
        unique, text_to_image = dedup_images(samples.images, samples.captions)
        images = ImageFiles(unique, preprocess, names=[f"{spec} image {i}" for i in range(len(unique))])
        return _evaluate_files(model, images, samples.captions, text_to_image, None, args, tokenizer, device)
    if not Path(spec).is_file():
        raise FileNotFoundError(f"--data {spec}: no such file (expected 'synthetic[:N]', a CSV/TSV file, .tar shards "
                                f"or a Karpathy JSON)")
    if spec.endswith(".json"):
        if not args.image_root:
            raise ValueError("--data is a JSON annotation file: pass --image-root (the folder of its images)")
        data = retrieval_json(spec, args.image_root, split=args.split, preprocess=preprocess,
                              max_captions=args.max_captions)
        return _evaluate_files(model, data, data.captions, data.text_to_image, None, args, tokenizer, device)
    table = read_csv_eval(spec, args.csv_img_key, args.csv_caption_key, args.csv_label_key, args.csv_separator,
                          args.image_root)
    images = ImageFiles(table["paths"], preprocess)
    labels = table["labels"] if args.csv_label_key else None
    return _evaluate_files(model, images, table["captions"], table["text_to_image"], labels, args, tokenizer, device)


def _print_summary(results: dict):
    print(f"{results['data']}: {results['num_images']} images, {results['num_texts']} captions")
    if "retrieval" in results:
        r = results["retrieval"]
        if results.get("protocol") == "clip_benchmark":  # printed in clipmoe's names, in percent
            r = {f"{'i2t' if key.startswith('text') else 't2i'}_R@{key.rpartition('@')[2]}": 100 * value
                 for key, value in r.items()}
        for direction in ("i2t", "t2i"):
            cells = "  ".join(f"{key.split('_')[1]} {value:6.2f}" for key, value in r.items()
                              if key.startswith(direction))
            print(f"  {'image->text' if direction == 'i2t' else 'text->image'}  {cells}")
        if results.get("num_shared_captions") and results.get("protocol") != "clip_benchmark":
            ceiling = 100 * (1 - results["num_shared_captions"] / results["num_images"])
            print(f"  ({results['num_shared_captions']} images share their caption with another image: their "
                  f"image->text R@1 is a tie, counted as a miss; R@1 ceiling {ceiling:.2f})")
    for name, z in results.get("zero_shot", {}).items():
        if "acc1" in z:
            print(f"  zero-shot {name:<10} acc1 {z['acc1']:.4f}  acc5 {z['acc5']:.4f}  mean per-class recall "
                  f"{z['mean_per_class_recall']:.4f}")
            continue
        print(f"  zero-shot {name:<10} top-1 {z['top1']:6.2f}  top-5 {z['top5']:6.2f}")
    if "zero_shot_mean_top1" in results:
        mean = results["zero_shot_mean_top1"]
        print(f"  zero-shot mean top-1 {mean:.4f}" if results.get("protocol") == "clip_benchmark" else
              f"  zero-shot mean top-1 {mean:.2f}")
    for tower, data in results.get("routing", {}).get("towers", {}).items():
        low = min(min(layer["first_choice_share"]) for layer in data["layers"].values())
        print(f"  routing {tower}: {data['num_layers']} MoE layers, mean balance loss "
              f"{data['mean_balance_loss']:.3f}, smallest first-choice share {100 * low:.1f}%")


def cmd_eval(args) -> int:
    start = time.perf_counter()
    device = _device(args.device)
    model, preprocess, tokenizer, description = load_eval_model(args, device)
    has_moe = description["moe_layers"] > 0
    if args.routing_plot and not has_moe:
        raise ValueError("--routing-plot: the model has no MoE layer")
    with collect_routing(model) as routing:
        results = {"model": description, "data": args.data, "device": str(device), "protocol": args.protocol}
        results.update(run_eval(args, model, preprocess, tokenizer, device))
    if has_moe:
        results["routing"] = routing_statistics(model, routing)
    results["seconds"] = round(time.perf_counter() - start, 3)
    _print_summary(results)
    if args.output:
        from clipmoe.fileio import atomic_write
        atomic_write(args.output, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2) + "\n"))
        print(f"wrote {args.output}")
    if args.routing_plot:
        print(f"wrote {plot_routing_heatmap(results['routing'], args.routing_plot)}")
    return 0

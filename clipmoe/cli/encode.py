"""`clipmoe encode`: embed a dataset's images and captions into shards of embeddings plus a metadata table, in the
same order, resumable by shard (library: clipmoe.eval.encode)."""
import argparse
import time
from pathlib import Path

import torch

from clipmoe.cli.common import UsageError, logger, positive_int, progress_enabled, write_args_json


def add_commands(sub):
    p = sub.add_parser("encode", help="embed the images and captions of a dataset into .npy / safetensors shards",
                       description=__doc__)
    p.add_argument("--checkpoint", default=None, help="released CLIP-MoE .pt, clipmoe checkpoint, or transformers "
                                                      "folder (config.json + model.safetensors)")
    p.add_argument("--model", default=None, help="open_clip model name (with --checkpoint: only the name whose "
                                                 "transforms and tokenizer to use)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint path for --model")
    p.add_argument("--data", required=True, help="CSV/TSV file, local webdataset shards ('d/{000..009}.tar'), a "
                                                 "folder of images, or a captions .txt (one per line)")
    p.add_argument("--output", required=True, help="output folder (an existing run there is resumed)")
    p.add_argument("--csv-img-key", default="filepath", help="CSV column of image paths")
    p.add_argument("--csv-caption-key", default="title", help="CSV column of captions")
    p.add_argument("--csv-separator", default="\t", help="CSV separator")
    p.add_argument("--shard-size", type=positive_int, default=10000, help="items per output shard")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (0: in the main process)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="L2-normalise the embeddings")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="dtype of the stored arrays")
    p.add_argument("--format", choices=("npy", "safetensors"), default="npy", help="embedding file format")
    p.add_argument("--metadata", choices=("csv", "parquet"), default="csv", help="metadata table format "
                                                                                  "(parquet needs pyarrow)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-autocast", dest="autocast", action="store_false", help="run in fp32 on CUDA too")
    p.add_argument("--compile", action="store_true", help="torch.compile the encode functions")
    p.add_argument("--top-k", type=positive_int, default=2, help="top-k of a released .pt (not stored in it)")
    p.add_argument("--backend", default=None, help="override the MoEFFN backend (auto, triton, torch, naive)")
    p.set_defaults(func=cmd_encode)


def cmd_encode(args) -> int:
    from clipmoe.eval.encode import encode_dataset, model_transforms, read_items
    from clipmoe.inference import load_model

    start = time.perf_counter()
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.checkpoint:
        if args.pretrained:
            raise UsageError("pass --checkpoint or --pretrained, not both")
        model = load_model(args.checkpoint, top_k=args.top_k, backend=args.backend, device=device)
        described = {"checkpoint": str(Path(args.checkpoint).resolve())}
    elif args.model:
        from clipmoe.models import create_model
        model = create_model(args.model, args.pretrained, device=device)[0].eval()
        described = {"model": args.model, "pretrained": args.pretrained}
    else:
        raise UsageError("pass --checkpoint (a checkpoint or transformers folder) or --model (an open_clip name)")
    preprocess, tokenizer = model_transforms(model, args.model)
    items = read_items(args.data, img_key=args.csv_img_key, caption_key=args.csv_caption_key, sep=args.csv_separator)
    settings = {**described, "data": str(args.data), "top_k": args.top_k if args.checkpoint else None}
    totals = encode_dataset(model, items, preprocess, tokenizer, args.output, settings=settings,
                            shard_size=args.shard_size, batch_size=args.batch_size, num_workers=args.workers,
                            normalize=args.normalize, dtype=args.dtype, fmt=args.format,
                            metadata_format=args.metadata, device=device, autocast=args.autocast,
                            compile=args.compile, progress=progress_enabled())
    write_args_json(args.output, args)
    seconds = time.perf_counter() - start
    logger.info("encoded %d items now (%d embedded in all, %d skipped) into %d shards in %.1f s",
                totals["num_encoded_now"], totals["num_embedded"], totals["num_skipped"], totals["num_shards"],
                seconds)
    print(f"wrote {args.output}: {totals['num_embedded']} embedded, {totals['num_skipped']} skipped, "
          f"{totals['num_shards']} shards")
    return 0

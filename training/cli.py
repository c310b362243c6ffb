"""`python -m training {zoo,train,eval,clips,samples,experiment-depth,experiment-transfer,imagenet-val}`.

Errors end with one clear line and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path


def _train(args: argparse.Namespace) -> None:
    from training import distributed
    from training.models import list_models
    from training.recipe import RecipeError, load_recipe
    from training.train import train

    overrides = {"arch": args.arch, "dataset": args.dataset, "epochs": args.epochs, "data_root": args.data_root,
                 "batch_size": args.batch_size, "lr": args.lr, "limit": args.limit, "seed": args.seed,
                 "img_size": args.img_size, "init_from": args.init_from,
                 "pretrained_weights": args.pretrained_weights, "freeze": args.freeze}
    recipe = load_recipe(args.recipe or "default", overrides)
    if recipe.arch not in list_models():
        raise RecipeError(f"unknown arch {recipe.arch!r}; known: {', '.join(list_models())}")
    out = Path(args.out or f"checkpoints/{recipe.arch}-{recipe.dataset}.pt")
    log_dir = None if args.no_tensorboard else (args.log_dir or f"runs/{out.stem}")
    ckpt = train(recipe, out, log_dir=log_dir, resume=args.resume, progress=not args.quiet,
                 stop_after_epoch=args.stop_after_epoch)
    m = ckpt["metrics"]
    if recipe.task == "segmentation":
        scores = {k: m.get(k) for k in ("test_miou", "test_ap50", "val_miou")}
    else:
        both = {f"{k}_{w}": m.get(f"{k}_{w}") for k in ("test_acc", "val_acc") for w in ("raw", "ema")}
        scores = {"test_acc": m.get("test_acc"), "val_acc": m.get("val_acc"), "weights": m.get("weights"),
                  **{k: v for k, v in both.items() if v is not None}}
    if distributed.rank() == 0:
        print(json.dumps({"checkpoint": str(out), "arch": recipe.arch, **scores, "steps": m.get("steps"),
                          "train_time_s": round(m["train_time_s"], 1), "hardware": m["hardware"],
                          "tensorboard": log_dir, "warnings": m.get("warnings", [])}))
    distributed.shutdown()


def _eval(args: argparse.Namespace) -> None:
    from training.checkpoint import CheckpointError
    from training.commands import train_command
    from training.evaluate import run_eval

    if not Path(args.checkpoint).is_file():
        raise CheckpointError(f"checkpoint not found: {args.checkpoint}; train it: {train_command(args.checkpoint)}")
    out_dir = args.out_dir or f"reports/eval/{Path(args.checkpoint).stem}"
    r = run_eval(args.checkpoint, out_dir, data_root=args.data_root, limit=args.limit, clips_dir=args.clips)
    if r.get("task") == "segmentation":
        from training.seg_eval import summary_lines

        print("\n".join(summary_lines(r)))
        print(f"wrote {out_dir}/metrics.json, overlays.png")
        return
    print(f"{r['arch']}: test accuracy {r['test_acc']:.4f} on {r['n']} images")
    for name, acc in r["per_class_acc"].items():
        print(f"  {name:<14} {acc:.4f}")
    print(f"wrote {out_dir}/metrics.json, confusion.png, samples.png (the most confident mistakes)")


def _clips(args: argparse.Namespace) -> None:
    from training.clips import make_config, write_clips

    size = tuple(args.size) if len(args.size) == 2 else args.size[0]
    cfg = make_config({"noise": args.noise} if args.noise is not None else {})
    paths = write_clips(args.out_dir, args.n, args.split, args.frames, size, args.fps, args.seed, cfg, args.data_root)
    print(f"wrote {len(paths)} {args.split}-split clips ({args.frames} frames, {args.fps:g} fps) with ground truth "
          f"to {args.out_dir}")


def _zoo(args: argparse.Namespace) -> None:
    from training.zoo import main as zoo_main

    zoo_main(args.rest)


def _depth(args: argparse.Namespace) -> None:
    from training.experiments import depth_experiment

    depth_experiment(args.out_dir, epochs=args.epochs, limit=args.limit, data_root=args.data_root)


def _transfer(args: argparse.Namespace) -> None:
    from training.transfer import run_experiment, summarize, verdict, write_docs

    results = run_experiment(args.out_dir, data_root=args.data_root, quick=args.quick,
                             serve_checkpoint=args.checkpoint_out, full=args.full,
                             train_missing=not args.report_only)
    summary = summarize(results)
    (Path(args.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.docs:
        write_docs(summary, args.docs)
    for cell in summary["cells"].values():
        print(f"{cell['shots']:>3} images/class  {cell['method']:<13} {100 * cell['mean']:5.1f} ± "
              f"{100 * cell['std']:.1f} % (n={cell['n']})")
    print(verdict(summary))
    print(f"wrote {args.out_dir}/results.json, summary.json" + (f"; {args.docs}/transfer.json, transfer.png, "
                                                               "training.md" if args.docs else ""))


def _imagenet_val(args: argparse.Namespace) -> None:
    from training.imagenet import reorganise_val

    r = reorganise_val(args.val_dir, args.ground_truth, mode=args.mode)
    print(f"{args.val_dir}: {r['sorted_now']} images sorted now, {r['images']} in {r['classes']} class folders"
          + (f"; {r['labels_without_image']} labelled images are not there" if r["labels_without_image"] else ""))


def _samples(args: argparse.Namespace) -> None:
    from training.samples import export_samples

    paths = export_samples(args.dataset, args.out_dir, n=args.n, data_root=args.data_root)
    print(f"wrote {len(paths)} test images to {args.out_dir}")


def _catalog() -> str:
    """The architectures and recipes, for --help (read without importing torch: training/catalog.py)."""
    from training.catalog import architectures, recipes

    wrap = textwrap.TextWrapper(width=100, initial_indent="  ", subsequent_indent="  ")
    return "\n".join(["architectures (--arch):", wrap.fill(", ".join(architectures())),
                      "recipes (--recipe, training/recipes/*.yaml):", wrap.fill(", ".join(recipes()))])


def build_parser() -> argparse.ArgumentParser:
    catalog = _catalog()
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__, epilog=catalog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a model from a recipe", epilog=catalog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--recipe", help="recipe name in training/recipes/ or a YAML path (default: default)")
    t.add_argument("--arch", help="a registered architecture (listed below); default: the recipe's")
    t.add_argument("--dataset", choices=["fashion_mnist", "cifar10", "imagefolder", "moving_fmnist"])
    t.add_argument("--data-root")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--img-size", type=int)
    t.add_argument("--limit", type=int, help="cap each split at N images (quick runs)")
    t.add_argument("--seed", type=int)
    t.add_argument("--out", help="checkpoint path (default checkpoints/<arch>-<dataset>.pt)")
    t.add_argument("--resume", help="continue from this checkpoint")
    t.add_argument("--stop-after-epoch", type=int, metavar="E",
                   help="end this run after epoch E (the schedule still spans --epochs; --resume continues it)")
    t.add_argument("--init-from", help="start from one of our checkpoints (a new head when the classes differ)")
    t.add_argument("--pretrained-weights", help="start from a torchvision-format state-dict file")
    t.add_argument("--freeze", help="none | linear_probe | layer4_head | gradual")
    t.add_argument("--log-dir", help="TensorBoard log dir (default runs/<checkpoint name>)")
    t.add_argument("--no-tensorboard", action="store_true")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(fn=_train)
    e = sub.add_parser("eval", help="evaluate a checkpoint on its test split, with plots")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data-root")
    e.add_argument("--limit", type=int)
    e.add_argument("--out-dir")
    e.add_argument("--clips", help="segmentation: score the MP4 clips (with .gt files) in this folder instead")
    e.set_defaults(fn=_eval)
    c = sub.add_parser("clips", help="write moving Fashion-MNIST clips: H.264 MP4 + ground truth (.gt.npz/.gt.json)")
    c.add_argument("--out-dir", default="data/clips")
    c.add_argument("--n", type=int, default=8, help="number of clips (seeds --seed .. --seed + n - 1)")
    c.add_argument("--split", default="test", choices=["train", "val", "test"], help="garment pool")
    c.add_argument("--frames", type=int, default=64)
    c.add_argument("--size", type=int, nargs="+", default=[224], metavar="PX", help="side, or height width")
    c.add_argument("--fps", type=float, default=30.0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--noise", type=float, help="pixel noise std (default: the generator's)")
    c.add_argument("--data-root", help="Fashion-MNIST folder (default: Debian's)")
    c.set_defaults(fn=_clips)
    z = sub.add_parser("zoo", help="table of every model: params, FLOPs, CPU latency", add_help=False)
    z.add_argument("rest", nargs=argparse.REMAINDER)
    z.set_defaults(fn=_zoo)
    s = sub.add_parser("samples", help="write test-split images as PNG files (for predictions and load tests)")
    s.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "cifar10"])
    s.add_argument("--data-root")
    s.add_argument("--n", type=int, default=8)
    s.add_argument("--out-dir", default="reports/samples")
    s.set_defaults(fn=_samples)
    d = sub.add_parser("experiment-depth", help="plain vs residual nets of growing depth (degradation)")
    d.add_argument("--out-dir", default="reports/depth")
    d.add_argument("--epochs", type=int, default=3)
    d.add_argument("--limit", type=int, default=12000)
    d.add_argument("--data-root")
    d.set_defaults(fn=_depth)
    x = sub.add_parser("experiment-transfer", help="pretrain on Fashion-MNIST 0-4, fine-tune on 5-9 with "
                       "10/20/50 images per class four ways (resumable)")
    x.add_argument("--out-dir", default="reports/transfer")
    x.add_argument("--data-root")
    x.add_argument("--docs", help="also write the figures into this docs folder (docs/)")
    x.add_argument("--quick", action="store_true", help="a tiny version that checks the pipeline in seconds")
    x.add_argument("--report-only", action="store_true", help="train nothing: summarize the runs that have "
                   "finished (the others show as not run)")
    x.add_argument("--full", action="store_true", help="the longer run: 5000 pretraining images per class, "
                   "3 seeds, 300 fine-tuning steps, 400 test images per class (hours on 2 cores)")
    x.add_argument("--checkpoint-out", help="copy the model to archive and serve here (layer4 + head, 50 images "
                   "per class); archive_configs/fmnist-transfer-resnet50 reads checkpoints/resnet50-fmnist-transfer.pt")
    x.set_defaults(fn=_transfer)
    v = sub.add_parser("imagenet-val", help="sort ImageNet's flat val/ folder into val/<wnid>/ from its ground truth")
    v.add_argument("val_dir")
    v.add_argument("--ground-truth", required=True, help="LOC_val_solution.csv, '<file> <wnid>' lines, or the "
                   "devkit's ILSVRC2012_validation_ground_truth.txt (with meta.mat beside it)")
    v.add_argument("--mode", choices=["move", "copy", "link"], default="move")
    v.set_defaults(fn=_imagenet_val)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()  # parsed before any import of torch: --help and usage errors stay instant
    # The zoo parses its own options (a REMAINDER positional does not take a leading "--option").
    args = parser.parse_args(argv[:1]) if argv[:1] == ["zoo"] else parser.parse_args(argv)
    if args.cmd == "zoo":
        args.rest = argv[1:]
    from training import distributed
    from training.checkpoint import CheckpointError
    from training.data import DatasetError
    from training.distributed import DistributedError
    from training.recipe import RecipeError

    try:
        args.fn(args)
    except (DatasetError, RecipeError, CheckpointError, DistributedError, FileNotFoundError, ValueError,
            KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        rank = distributed.rank()
        if rank == 0 or not getattr(e, "all_ranks", False):  # an error every process saw: rank 0 says it
            print(f"error: {f'rank {rank}: ' if rank else ''}{msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0

"""`python -m training {zoo,train,eval,clips,samples,experiment-depth,experiment-attention,experiment-transfer,
imagenet-val}`.

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
                 "img_size": args.img_size, "teacher": args.teacher, "qat": True if args.qat else None,
                 "init_from": args.init_from, "pretrained_weights": args.pretrained_weights, "freeze": args.freeze}
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


def _experiment_overrides(args: argparse.Namespace) -> dict:
    return {"epochs": args.epochs, "limit": args.limit, "data_root": args.data_root}


def _docs_dir(args: argparse.Namespace) -> Path | None:
    from training.commands import ROOT

    return ROOT / "docs" if args.docs else None


def _depth(args: argparse.Namespace) -> None:
    from training.experiments.depth import depth_experiment

    depth_experiment(args.recipe, args.out_dir, nets=tuple(args.nets), overrides=_experiment_overrides(args),
                     gradnorm_every=args.gradnorm_every, train_eval_images=args.train_eval_images,
                     docs_dir=_docs_dir(args), progress=not args.quiet)


def _attention(args: argparse.Namespace) -> None:
    from training.experiments.attention import attention_experiment

    attention_experiment(args.recipe, args.out_dir, kinds=tuple(args.kinds), placements=tuple(args.placements),
                         skip=tuple(args.skip), seeds=tuple(args.seeds), overrides=_experiment_overrides(args),
                         latency=args.latency, docs_dir=_docs_dir(args), progress=not args.quiet)


def _experiment_args(p: argparse.ArgumentParser, recipe: str) -> None:
    p.add_argument("--recipe", default=recipe, help=f"recipe name or YAML path (default {recipe})")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--limit", type=int, help="override the recipe's images per split")
    p.add_argument("--data-root")
    p.add_argument("--out-dir", help="where runs and reports go (default reports/<experiment>/<recipe>; "
                                     "rerunning continues what is there)")
    p.add_argument("--docs", action="store_true", help="when finished, write the figures into docs/")
    p.add_argument("--quiet", action="store_true")


def _kd(args: argparse.Namespace) -> None:
    from training.kd_experiment import report, run

    if args.report_only:
        summary = report(args.checkpoints, args.reports, "docs", args.profile, args.vit_epochs, args.teacher_epochs)
    else:
        summary = run(args.checkpoints, args.reports, "docs", only=args.only, profile=args.profile,
                      threads=args.threads, vit_epochs=args.vit_epochs, teacher_epochs=args.teacher_epochs)
    print(json.dumps({"teacher": summary["teacher"], "students": summary["students"]}, indent=1))


def _qat(args: argparse.Namespace) -> None:
    from training.qat_experiment import run

    summary = run(args.checkpoints, args.reports, "docs", train_only=args.train_only, reps=args.reps,
                  profile=args.profile, measure_only=args.measure_only, threads=args.threads)
    print("trained" if summary is None else json.dumps(summary["rows"], indent=1))


def _search(args: argparse.Namespace) -> None:
    from training.search import Settings, run_search

    given = {k: v for k, v in vars(args).items() if v is not None}
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()
                    if k in Settings.__dataclass_fields__})
    summary = run_search(s, args.out_dir, docs=args.docs, recipe_path=args.recipe)
    c = summary["chosen"]
    print(f"{summary['trials']} trials, {len(summary['front'])} on the Pareto front; chosen: {c['arch']} "
          f"{c['model_args']} (val acc {c['val_acc']:.4f}, {c['cpu_ms']:.2f} ms)"
          + (f"; recipe {summary['recipe']}" if summary.get("recipe") else ""))


def _select(args: argparse.Namespace) -> None:
    from handlers.artifacts import write_json
    from training.select import Settings, discover, measure
    from training.select_report import write

    docs = Path(args.docs)
    if args.report_only:
        summary = json.loads((docs / "model-selection.json").read_text())
    else:
        given = {k: v for k, v in vars(args).items() if v is not None and k in Settings.__dataclass_fields__}
        given["checkpoints"] = args.checkpoints or discover(args.root, args.dataset)
        summary = measure(Settings(**{k: tuple(v) if k == "runtimes" else v for k, v in given.items()}))
        write_json(Path(args.reports) / "model-selection.json", summary)
    print(f"wrote {write(summary, docs)} ({len(summary['models'])} checkpoints)")


def _transfer(args: argparse.Namespace) -> None:
    from handlers.artifacts import write_json
    from training.transfer import run_experiment, summarize, verdict, write_docs

    args.out_dir = args.out_dir or ("reports/transfer-full" if args.full else "reports/transfer")
    if args.lr_grid:
        return _transfer_lr(args)
    results = run_experiment(args.out_dir, data_root=args.data_root, quick=args.quick,
                             serve_checkpoint=args.checkpoint_out, full=args.full,
                             train_missing=not args.report_only, finetune_steps=args.finetune_steps,
                             pretrain_epochs=args.pretrain_epochs)
    summary = summarize(results)
    write_json(Path(args.out_dir) / "summary.json", summary)
    if args.docs:
        write_docs(summary, args.docs)
    for cell in summary["cells"].values():
        acc = f"{100 * cell['mean']:5.1f} ± {100 * cell['std']:.1f} %" if cell["n"] else "not run"
        print(f"{cell['shots']:>3} images/class  {cell['method']:<13} {acc} (n={cell['n']})")
    print(verdict(summary))
    print(f"wrote {args.out_dir}/results.json, summary.json" + (f"; {args.docs}/transfer.json, transfer.png, "
                                                               "training.md" if args.docs else ""))


def _transfer_lr(args: argparse.Namespace) -> None:
    from handlers.artifacts import write_json
    from training.transfer_lr import markdown_grid, run_grid, summarize_grid, write_grid_docs

    grid = run_grid(args.out_dir, data_root=args.data_root, quick=args.quick, full=args.full,
                    train_missing=not args.report_only, finetune_steps=args.finetune_steps,
                    pretrain_epochs=args.pretrain_epochs)
    summary = summarize_grid(grid)
    write_json(Path(args.out_dir) / "lr-grid-summary.json", summary)
    if args.docs:
        write_grid_docs(summary, args.docs)
    print(markdown_grid(summary))
    print(f"wrote {args.out_dir}/lr-grid.json, lr-grid-summary.json" +
          (f"; {args.docs}/transfer-lr.json, training.md" if args.docs else ""))


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
    t.add_argument("--teacher", metavar="CHECKPOINT", help="distill from this checkpoint (same classes)")
    t.add_argument("--qat", action="store_true", help="int8 quantization-aware training (recipe key qat)")
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
    from training.experiments import defaults

    d = sub.add_parser("experiment-depth", help="CIFAR-style plain vs residual nets of 20/56/110 layers "
                                                "(degradation), with per-layer gradient norms")
    _experiment_args(d, "depth_cpu")
    d.add_argument("--nets", nargs="+", default=list(defaults.NETS), metavar="ARCH",
                   help=f"default: {' '.join(defaults.NETS)}")
    d.add_argument("--gradnorm-every", type=int, default=defaults.GRADNORM_EVERY, metavar="STEPS",
                   help=f"optimizer steps between gradient-norm records (default {defaults.GRADNORM_EVERY})")
    d.add_argument("--train-eval-images", type=int, default=defaults.TRAIN_EVAL_IMAGES, metavar="N",
                   help=f"training images scored for the training error (default {defaults.TRAIN_EVAL_IMAGES})")
    d.set_defaults(fn=_depth)
    a = sub.add_parser("experiment-attention", help="SE / CBAM / non-local placed per stage, several seeds: "
                                                    "accuracy, params, FLOPs, CPU latency")
    _experiment_args(a, "attention_cpu")
    a.add_argument("--kinds", nargs="+", default=list(defaults.KINDS), choices=defaults.KINDS)
    a.add_argument("--placements", nargs="+", default=list(defaults.PLACEMENTS), choices=list(defaults.PLACEMENTS))
    a.add_argument("--skip", nargs="*", default=[], metavar="VARIANT",
                   help="variants (kind_placement) to leave out, e.g. non_local_stage1 non_local_all (the slowest)")
    a.add_argument("--seeds", nargs="+", type=int, default=list(defaults.SEEDS))
    a.add_argument("--latency", action="store_true", help="measure batch-1 CPU latency (on a quiet machine)")
    a.set_defaults(fn=_attention)
    x = sub.add_parser("experiment-transfer", help="pretrain on Fashion-MNIST 0-4, fine-tune on 5-9 with "
                       "10/20/50 images per class four ways (resumable)")
    x.add_argument("--out-dir", help="where the trees, checkpoints and runs go (default reports/transfer, "
                   "with --full reports/transfer-full: the two profiles keep their own state)")
    x.add_argument("--data-root")
    x.add_argument("--docs", help="also write the figures into this docs folder (docs/)")
    x.add_argument("--quick", action="store_true", help="a tiny version that checks the pipeline in seconds")
    x.add_argument("--report-only", action="store_true", help="train nothing: summarize the runs that have "
                   "finished (the others show as not run)")
    x.add_argument("--full", action="store_true", help="the longer run: 5000 pretraining images per class, "
                   "400 test images per class (hours on 2 cores)")
    x.add_argument("--finetune-steps", type=int, help="optimizer steps of every fine-tuning run (default 300); "
                   "the pretraining is reused, runs of another step count are trained again")
    x.add_argument("--pretrain-epochs", type=int, help="epochs of the pretraining (default 6, with --full 4); "
                   "another count pretrains again in --out-dir (give it its own to keep the other)")
    x.add_argument("--lr-grid", action="store_true", help="instead of the experiment: its learning-rate grid at "
                   "the fewest images per class, each method's setting picked on the val images "
                   "(training/transfer_lr.py; reuses the experiment's pretraining and runs in --out-dir)")
    x.add_argument("--checkpoint-out", help="copy the model to archive and serve here (layer4 + head, 50 images "
                   "per class); archive_configs/fmnist-transfer-resnet50 reads checkpoints/resnet50-fmnist-transfer.pt")
    x.set_defaults(fn=_transfer)
    v = sub.add_parser("imagenet-val", help="sort ImageNet's flat val/ folder into val/<wnid>/ from its ground truth")
    v.add_argument("val_dir")
    v.add_argument("--ground-truth", required=True, help="LOC_val_solution.csv, '<file> <wnid>' lines, or the "
                   "devkit's ILSVRC2012_validation_ground_truth.txt (with meta.mat beside it)")
    v.add_argument("--mode", choices=["move", "copy", "link"], default="move")
    v.set_defaults(fn=_imagenet_val)
    r = sub.add_parser("search", help="latency-aware architecture search (Optuna): Pareto front and a recipe",
                       description="Defaults: training/search.py Settings.")
    r.add_argument("--trials", type=int)
    r.add_argument("--timeout-s", type=float, help="no new trial starts after this many seconds")
    r.add_argument("--latency-cap-ms", type=float, help="CPU latency cap at batch 1")
    r.add_argument("--limit", type=int, help="proxy training: images per split")
    r.add_argument("--epochs", type=int, help="proxy training: epochs")
    r.add_argument("--threads", type=int)
    r.add_argument("--families", nargs="+", help="cnn, resnet and/or vit")
    r.add_argument("--seed", type=int)
    r.add_argument("--data-root")
    r.add_argument("--out-dir", default="reports/search", help="study journal (resumable), trials, PNG")
    r.add_argument("--docs", help="also write the summary, PNG and table into this docs folder")
    r.add_argument("--recipe", help="write the chosen architecture as a recipe here")
    r.set_defaults(fn=_search)
    m = sub.add_parser("select", help="model-selection report: every checkpoint per runtime, with guidance",
                       description="Defaults: training/select.py Settings.")
    m.add_argument("--checkpoints", nargs="+", help="default: every finished checkpoint under --root for --dataset")
    m.add_argument("--root", default="checkpoints")
    m.add_argument("--dataset", default="fashion_mnist")
    m.add_argument("--runtimes", nargs="+")
    m.add_argument("--threads", type=int)
    m.add_argument("--reps", type=int)
    m.add_argument("--accuracy-images", type=int, help="test images per accuracy (default: the whole split)")
    m.add_argument("--usd-per-hour", type=float, help="assumed machine price for the cost columns")
    m.add_argument("--data-root")
    m.add_argument("--docs", default="docs", help="writes model-selection.md, .json and .png here")
    m.add_argument("--reports", default="reports/select", help="raw JSON of the measurement")
    m.add_argument("--report-only", action="store_true", help="rebuild the page from <docs>/model-selection.json")
    m.set_defaults(fn=_select)
    k = sub.add_parser("experiment-kd", help="distillation: ResNet teacher, CNN and ViT students alone vs distilled")
    k.add_argument("--checkpoints", default="checkpoints/efficiency")
    k.add_argument("--reports", default="reports/efficiency")
    k.add_argument("--report-only", action="store_true", help="rewrite the JSON and table from finished runs")
    k.add_argument("--profile", choices=("full", "quick"), default="full",
                   help="full: 10,000 images, 10 epochs (hours); quick: 2,000 images, a few epochs (under an hour)")
    k.add_argument("--only", nargs="+", metavar="RUN", help="train these runs (and the teacher when one needs it)")
    k.add_argument("--threads", type=int, help="training threads (default 2; a run may resume with another count)")
    k.add_argument("--vit-epochs", type=int, metavar="N",
                   help="train every ViT run (alone and distilled) N epochs instead of the profile's")
    k.add_argument("--teacher-epochs", type=int, metavar="N",
                   help="train the teacher N epochs instead of the profile's (every distilled run learns from it)")
    k.set_defaults(fn=_kd)
    q = sub.add_parser("experiment-qat", help="PTQ vs QAT for LeNet-5 and ResNet-18: accuracy and CPU latency")
    q.add_argument("--checkpoints", default="checkpoints/efficiency")
    q.add_argument("--reports", default="reports/efficiency")
    q.add_argument("--train-only", action="store_true", help="train what is missing, measure nothing")
    q.add_argument("--measure-only", action="store_true", help="train nothing: measure the runs that have finished")
    q.add_argument("--profile", choices=("full", "quick"), default="full",
                   help="the experiment-kd profile to start from")
    q.add_argument("--reps", type=int, default=30, help="timed forward passes per latency (median)")
    q.add_argument("--threads", type=int, help="training threads (default 2); latency is measured with 2")
    q.set_defaults(fn=_qat)
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

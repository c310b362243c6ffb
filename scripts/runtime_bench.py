"""Runtimes side by side: test accuracy of trained checkpoints and ResNet-18@224 forward speed per runtime.

    .venv/bin/python scripts/runtime_bench.py --checkpoints checkpoints/lenet5-fashion_mnist.pt \\
        checkpoints/resnet18-fashion_mnist-quick.pt

1. Accuracy: each checkpoint's full test split through ImagePipeline.predict (the serving path) per runtime;
   delta and top-1 agreement vs eager.
2. Speed: in-process img/s of the model forward (pipeline.forward on a fixed normalized batch) at batch 8 and 1 for
   ResNet-18 at 224 px, 3 channels, fixed random weights. All runtimes are measured round-robin in one process,
   `--reps` times; the median is reported with the load average.
3. Startup: each runtime built in a fresh subprocess twice on one cache dir: cold (empty cache: export, quantize,
   compile) and warm (a restarted worker).
Prints Markdown tables; writes JSON to reports/runtimes/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from handlers.image import ImagePipeline  # noqa: E402
from handlers.runtimes import RUNTIMES, WrappedModel  # noqa: E402
from training.checkpoint import build_model, load_checkpoint, save_checkpoint  # noqa: E402
from training.models import get_model  # noqa: E402
from training.presets import make_preprocess  # noqa: E402

EXTRA = "eager-nchw"  # eager without channels_last: the evidence for eager's layout choice at 224 px
DOC, NAME = ROOT / "docs" / "runtimes.md", "runtimes"  # --docs: docs/runtimes.json and its block in the doc

_CHILD = """
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
from handlers.image import ImagePipeline
p = ImagePipeline.from_file({path!r}, runtime={rt!r}, runtime_cache={cache!r}, cpu_threads={threads})
print(json.dumps(dict(p.runtime_info, load_s=round(time.perf_counter() - t0, 2))))
"""


def bench_checkpoint(path: Path, seed: int = 0) -> Path:
    """ResNet-18, 224 px, 3 channels, random weights with non-trivial BN statistics (fixed by `seed`)."""
    if path.is_file():
        return path
    torch.manual_seed(seed)
    args = {"num_classes": 1000, "in_channels": 3, "img_size": 224, "zero_init_residual": False}
    model = get_model("resnet18", **args).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    pre = make_preprocess(224, 3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], resize=256)
    return save_checkpoint({"arch": "resnet18", "model_args": args, "state_dict": model.state_dict(),
                            "classes": [str(i) for i in range(1000)], "preprocess": pre, "metrics": {},
                            "recipe": {}}, path)


def startup(path: Path, runtimes: list[str], threads: int) -> dict[str, dict[str, Any]]:
    """Cold then warm start of each runtime in two subprocesses sharing a cache dir that starts empty."""
    out: dict[str, dict[str, Any]] = {}
    for rt in runtimes:
        with tempfile.TemporaryDirectory(prefix="runtime-cache-") as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(cache) / "inductor"))
            code = _CHILD.format(root=str(ROOT), path=str(path), rt=rt, cache=cache, threads=threads)
            for phase in ("cold", "warm"):
                r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
                if r.returncode:
                    raise RuntimeError(f"{rt} startup failed:\n{r.stderr[-2000:]}")
                info = json.loads(r.stdout.strip().splitlines()[-1])
                out.setdefault(rt, {})[phase] = {"prepare_s": info["prepare_s"], "load_s": info["load_s"]}
                print(f"  startup {rt:8s} {phase}: prepare {info['prepare_s']:.1f} s", flush=True)
    return out


def speed(path: Path, runtimes: list[str], threads: int, reps: int, cache: str) -> dict[str, dict[str, Any]]:
    forwards = {}
    for rt in runtimes:
        forwards[rt] = ImagePipeline.from_file(path, runtime=rt, runtime_cache=cache, cpu_threads=threads).forward
    forwards[EXTRA] = WrappedModel(build_model(load_checkpoint(path)), False, None, "cpu")
    x8 = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    runs: dict[str, dict[int, list[float]]] = {k: {8: [], 1: []} for k in forwards}
    with torch.inference_mode():
        for f in forwards.values():  # warm-up: first-call allocations and lazy initialisation
            f(x8), f(x8[:1])
        for _ in range(reps):
            for name, f in forwards.items():
                for batch, iters in ((8, 4), (1, 16)):
                    x = x8[:batch]
                    start = time.perf_counter()
                    for _ in range(iters):
                        f(x)
                    runs[name][batch].append(batch * iters / (time.perf_counter() - start))
    base = {b: statistics.median(runs["eager"][b]) for b in (8, 1)}
    return {name: {f"b{b}": round(statistics.median(v), 1) for b, v in r.items()}
            | {f"ratio_b{b}": round(statistics.median(v) / base[b], 2) for b, v in r.items()}
            | {f"b{b}_runs": [round(s, 1) for s in v] for b, v in r.items()} for name, r in runs.items()}


def accuracy(path: Path, runtimes: list[str], threads: int, cache: str) -> dict[str, dict[str, Any]]:
    from training.data import load_dataset

    ckpt = load_checkpoint(path)
    recipe = ckpt["recipe"]
    test = load_dataset(recipe["dataset"], recipe.get("data_root"), seed=int(recipe.get("seed", 0))).test
    out: dict[str, dict[str, Any]] = {}
    ref = None
    for rt in runtimes:
        start = time.perf_counter()
        pipe = ImagePipeline.from_file(path, runtime=rt, runtime_cache=cache, cpu_threads=threads)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        top1 = torch.cat([pipe.predict(test.images[i:i + 1000], 1)[1][:, 0] for i in range(0, len(test), 1000)])
        eval_s = time.perf_counter() - start
        ref = top1 if ref is None else ref
        acc = (top1 == test.labels).float().mean().item() * 100
        out[rt] = {"acc": round(acc, 2), "agree_with_first": round((top1 == ref).float().mean().item() * 100, 2),
                   "load_s": round(load_s, 1), "eval_img_s": round(len(test) / eval_s), **pipe.runtime_info}
        print(f"  {path.name} {rt:8s} acc {acc:.2f} %  (load {load_s:.1f} s)", flush=True)
    first = out[runtimes[0]]["acc"]
    for r in out.values():
        r["delta_pt"] = round(r["acc"] - first, 2)
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Measured {report['date']} by `scripts/runtime_bench.py` on {report['cpu']} ({report['cores']} cores; "
             f"torch {report['torch']}, onnxruntime {report['onnxruntime']}); figures in "
             "[runtimes.json](runtimes.json).",
             "", f"ResNet-18@224 forward, {report['threads']} threads, median of {report['reps']} "
             f"(load average {report['load_before'][0]:.2f} before, {report['load_after'][0]:.2f} after); startup: "
             "the runtime's preparation in a fresh process, cold (empty cache) then warm (a restarted process)", "",
             "| runtime | img/s b8 | × eager | img/s b1 | × eager | startup cold s | startup warm s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for rt, s in report["speed"].items():
        st = report["startup"].get(rt, {})
        cold, warm = (f"{st[p]['prepare_s']:.1f}" if p in st else "–" for p in ("cold", "warm"))
        lines.append(f"| {rt} | {s['b8']} | {s['ratio_b8']} | {s['b1']} | {s['ratio_b1']} | {cold} | {warm} |")
    for name, acc in report["accuracy"].items():
        lines += ["", f"{name}: test accuracy (full test split, through ImagePipeline.predict)", "",
                  "| runtime | accuracy % | Δ vs eager, pt | top-1 = eager % | load s |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {rt} | {a['acc']:.2f} | {a['delta_pt']:+.2f} | {a['agree_with_first']:.2f} | {a['load_s']} |"
                  for rt, a in acc.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoints", nargs="*", type=Path, default=[], help="trained checkpoints to evaluate")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma list; eager first (the reference)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: speed,startup,accuracy")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "runtimes")
    ap.add_argument("--docs", action="store_true", help="write docs/runtimes.json and its block in docs/runtimes.md")
    a = ap.parse_args(argv)
    runtimes = ["eager"] + [r for r in a.runtimes.split(",") if r and r != "eager"]
    skip = set(a.skip.split(","))
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    cache = str(a.out / "cache")  # the in-process pipelines share one cache (ONNX exports, inductor)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache) / "inductor"))
    model = bench_checkpoint(a.out / "cache" / "resnet18-224-random.pt")
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": a.threads,
        "reps": a.reps, "torch": torch.__version__, "onnxruntime": _ort_version(), "python": platform.python_version(),
        "load_before": os.getloadavg(), "startup": {}, "speed": {}, "accuracy": {}}
    if "startup" not in skip:
        report["startup"] = startup(model, runtimes, a.threads)
    if "speed" not in skip:
        report["speed"] = speed(model, runtimes, a.threads, a.reps, cache)
    if "accuracy" not in skip:
        for path in a.checkpoints:
            report["accuracy"][path.name] = accuracy(path, runtimes, a.threads, cache)
    report["load_after"] = os.getloadavg()
    out = a.out / f"runtimes-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=1))
    if a.docs:
        from load_tests.reliability import write_doc_block

        (DOC.parent / f"{NAME}.json").write_text(json.dumps(report, indent=1))
        write_doc_block(DOC, NAME, markdown(report))
    print(markdown(report))
    print(f"\nwrote {out}")
    return report


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()

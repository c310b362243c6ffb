"""ONNX Runtime graph variants of the ViT segmentation model side by side: speed, agreement and where the time goes.

    flock /tmp/heavy.lock .venv/bin/python scripts/vit_fusion.py --docs

One random-weights checkpoint (the benchmark's `vit_seg_tiny` at 224 px, seed 0), exported once without attention
fusion, then:

- `fp32`: the export as ONNX Runtime loads it (the session's own fusions at ORT_ENABLE_ALL);
- `fp32 ort-optimizer`: `onnxruntime.transformers.optimizer.optimize_model(model_type="vit")` first;
- `fp32 mha`: the attention cores rewritten to MultiHeadAttention (handlers/fusion.py);
- `int8`: static QDQ of the unfused export (handlers/runtimes.quantize_onnx);
- `int8 mha`: the same quantization of the fused graph;
- `int8 dynamic mha`: ONNX Runtime dynamic quantization (MatMulInteger) of the fused graph.

Speed: every variant through handlers.runtimes.OrtModule (the serving session settings) at batch `--batch`, for each
thread count, and as many concurrent one-thread inferences (lanes) as the largest thread count, round-robin passes
in one process; median ms per frame and the median of the per-pass ratios to the
reference (pairs cancel the drift of a shared machine). Agreement: 16 test-clip frames, max |Δ logit| and the share of
pixels whose label equals the reference's (fp32 for fp32 variants, int8 for int8 ones). Profile: ONNX Runtime's
per-node profile, milliseconds per frame by operator type, one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

from handlers.artifacts import CALIBRATION_IMAGES, CALIBRATION_SEED  # noqa: E402
from handlers.fusion import fuse_attention  # noqa: E402
from handlers.runtimes import OrtModule, builder_versions, export_onnx, quantize_onnx  # noqa: E402
from load_tests.inprocess import bench_seg_checkpoint  # noqa: E402
from scripts.video_docs import publish  # noqa: E402
from training.calibration import calibration_set  # noqa: E402
from training.checkpoint import build_model  # noqa: E402
from training.clips import MEAN, STD, make_clip  # noqa: E402

VARIANTS = ("fp32", "fp32 ort-optimizer", "fp32 mha", "int8", "int8 mha", "int8 dynamic mha")


def reference(name: str) -> str:
    return "int8" if name.startswith("int8") else "fp32"


def build(ckpt: dict[str, Any], folder: Path) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    files = {name: folder / (name.replace(" ", "_") + ".onnx") for name in VARIANTS}
    export_onnx(build_model(ckpt), ckpt["preprocess"], files["fp32"], fuse=False)
    dim, heads = {"vit_seg_tiny": (192, 3), "vit_seg_small": (384, 6), "vit_seg_b16": (768, 12)}[ckpt["arch"]]
    optimize_model(str(files["fp32"]), model_type="vit", num_heads=heads, hidden_size=dim,
                   opt_level=1).save_model_to_file(str(files["fp32 ort-optimizer"]))
    fused = onnx.load(str(files["fp32"]))
    if fuse_attention(fused) == 0:
        raise SystemExit(f"no attention core matched in the {ckpt['arch']} export")
    onnx.save(fused, str(files["fp32 mha"]))
    batches, _ = calibration_set(ckpt, CALIBRATION_IMAGES, CALIBRATION_SEED)
    quantize_onnx(files["fp32"], files["int8"], batches)
    quantize_onnx(files["fp32 mha"], files["int8 mha"], batches)
    quantize_dynamic(str(files["fp32 mha"]), str(files["int8 dynamic mha"]), weight_type=QuantType.QInt8,
                     per_channel=True)
    return files


def speed(files: dict[str, Path], size: int, batch: int, threads: int, passes: int, lanes: int = 1) -> dict[str, Any]:
    """ms per frame and FPS per variant; with `lanes` > 1, that many batches at once, each on its own Python thread
    through one session of `threads` ONNX Runtime threads (independent inferences instead of split operators)."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    mods = {name: OrtModule(path, threads) for name, path in files.items()}
    times: dict[str, list[float]] = {name: [] for name in mods}
    with ThreadPoolExecutor(lanes) as pool:
        def call(mod: OrtModule) -> None:
            list(pool.map(lambda _: mod(x), range(lanes)))

        for mod in mods.values():
            call(mod)
        for _ in range(passes):
            for name, mod in mods.items():
                t0 = time.perf_counter()
                call(mod)
                times[name].append(time.perf_counter() - t0)
    out = {}
    for name, t in times.items():
        ref, frames = times[reference(name)], batch * lanes
        out[name] = {"ms_per_frame": round(1000 * statistics.median(t) / frames, 2),
                     "fps": round(frames / statistics.median(t), 1),
                     "x_reference": round(statistics.median(r / s for r, s in zip(ref, t)), 3)}
    return out


def agreement(files: dict[str, Path], size: int) -> dict[str, Any]:
    clip = make_clip(3, "test", 16, size)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    x = (clip.frames.float() / 255 - mean) / std
    logits = {name: OrtModule(path, 2)(x).numpy() for name, path in files.items()}
    out = {}
    for name, y in logits.items():
        ref = logits[reference(name)]
        out[name] = {"reference": reference(name), "max_abs_logit_diff": float(np.abs(y - ref).max()),
                     "logit_range": float(np.abs(ref).max()),
                     "same_label": round(float((y.argmax(1) == ref.argmax(1)).mean()), 5)}
    return out


def profile(path: Path, size: int, batch: int, top: int = 8) -> dict[str, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.enable_profiling = 1, 1, True
    so.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x, runs = np.zeros((batch, 3, size, size), np.float32), 3
    session.run(None, {"x": x})
    session.end_profiling()  # drop the first (warm-up) run
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, {"x": x})
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1000 / runs / batch
    total = sum(per_op.values())
    out = {op: round(ms, 2) for op, ms in per_op.most_common(top)}
    out["other"] = round(total - sum(out.values()), 2)
    return out


def setting(key: str) -> str:
    """"2" -> "2 threads"; "2x1" -> "2 lanes × 1 thread" (concurrent batches, one thread each)."""
    if "x" in key:
        lanes, threads = key.split("x")
        return f"{lanes} lanes × {threads} thread"
    return f"{key} thread" + ("s" if key != "1" else "")


def markdown(r: dict[str, Any]) -> str:
    threads = list(r["speed"])
    lines = ["| graph | " + " | ".join(f"{setting(t)}: ms / frame | FPS | × ref" for t in threads)
             + " | max \\|Δ logit\\| | same label as ref |", "|---|" + "---:|---:|---:|" * len(threads) + "---:|---:|"]
    for name in r["variants"]:
        cells = [f"{s['ms_per_frame']:.2f} | {s['fps']:.1f} | {s['x_reference']:.2f}"
                 for s in (r["speed"][t][name] for t in threads)]
        a = r["agreement"][name]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {a['max_abs_logit_diff']:.1e} | "
                     f"{100 * a['same_label']:.2f} % |")
    fused, span = r["fusion"], r["agreement"]["fp32"]["logit_range"]
    optimizer = ", ".join(f"{n} {k}" for k, n in fused["ort_optimizer"].items() if n) or "nothing"
    lines += ["", "× ref: the median of the per-pass ratios against the reference in the same pass (fp32 for fp32 "
              f"graphs, int8 for int8 ones). Agreement on 16 test-clip frames, logits up to {span:.2f} in magnitude "
              f"(random weights). The ONNX Runtime transformer optimizer fused {optimizer}; handlers/fusion.py fused "
              f"{fused['mha']} attention cores.", "",
              "Milliseconds per frame by operator type (ONNX Runtime profile, 1 thread):", "",
              "| graph | " + " | ".join(f"top {i + 1}" for i in range(5)) + " | total |", "|---|" + "---|" * 6]
    for name, ops in r["profile"].items():
        top = sorted(((k, v) for k, v in ops.items() if k != "other"), key=lambda kv: -kv[1])[:5]
        lines.append(f"| {name} | " + " | ".join(f"{k} {v:.2f}" for k, v in top) + f" | {sum(ops.values()):.1f} |")
    best = {t: max(r["variants"], key=lambda n: r["speed"][t][n]["fps"]) for t in threads}
    lines += ["", "Verdict: " + "; ".join(
        f"{setting(t)}: fastest {best[t]} ({r['speed'][t][best[t]]['fps']:.1f} FPS), attention fusion "
        f"× {r['speed'][t]['fp32 mha']['x_reference']:.2f} on fp32 and "
        f"× {r['speed'][t]['int8 mha']['x_reference']:.2f} on int8" for t in threads) + "."]
    lines += ["", f"Measured {r['date']} on {r['cpus']} cores ({r['machine']}), onnxruntime "
              f"{r['versions']['onnxruntime']}, `{r['arch']}` at {r['size']} px, random weights (seed {r['seed']}), "
              f"batch {r['batch']}, {r['passes']} round-robin passes; at normal priority with niced training of other "
              f"jobs beside it: load average (1 min) {r['load_before'][0]} before, {r['load_after'][0]} after."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_seg_tiny")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--passes", type=int, default=15)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "video_fusion.json")
    p.add_argument("--docs", action="store_true", help="also docs/video_fusion.json and its block in video.md")
    a = p.parse_args(argv)
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt = bench_seg_checkpoint(folder / "ckpt.pt", a.arch, a.size, a.seed)
        files = build(ckpt, folder)
        from onnxruntime.transformers.onnx_model import OnnxModel

        fused_ops = Counter(n.op_type for n in OnnxModel(onnx.load(str(files["fp32 ort-optimizer"]))).nodes())
        result: dict[str, Any] = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "arch": a.arch, "size": a.size,
            "seed": a.seed, "batch": a.batch, "passes": a.passes, "threads": [int(t) for t in a.threads.split(",")],
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "versions": builder_versions(), "variants": list(VARIANTS), "load_before": load_before,
            "fusion": {"mha": sum(n.op_type == "MultiHeadAttention"
                                  for n in onnx.load(str(files["fp32 mha"])).graph.node),
                       "ort_optimizer": {k: fused_ops[k] for k in ("Attention", "MultiHeadAttention",
                                                                    "SkipLayerNormalization", "BiasGelu")}}}
        result["speed"] = {str(t): speed(files, a.size, a.batch, t, a.passes) for t in result["threads"]}
        cores = max(result["threads"])
        if cores > 1:  # the same cores as independent one-thread inferences
            result["speed"][f"{cores}x1"] = speed(files, a.size, a.batch, 1, a.passes, lanes=cores)
        result["agreement"] = agreement(files, a.size)
        result["profile"] = {name: profile(files[name], a.size, a.batch) for name in ("fp32", "fp32 mha", "int8",
                                                                                       "int8 mha")}
        result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    publish(result, a.out, "video-fusion", markdown(result), a.docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

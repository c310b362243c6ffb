"""PyAV or torchcodec for the video handler: decoding speed and robustness on generated clips, side by side.

    flock /tmp/heavy.lock .venv/bin/python scripts/video_decoders.py --docs

1. Speed: PyAV as the handler runs it (handlers/video.py: explicit demuxer, one reused colour converter, the
   limits) against torchcodec (frames fetched 16 at a time, as a handler would to bound memory), on moving
   Fashion-MNIST test clips (training/clips.py) written as H.264 MP4 at 224x224, 480x640 and 720x1280, decoded
   from bytes in memory to uint8 RGB (C, H, W) tensors, every frame and every 4th frame, with 1 and 2 decoder
   threads. Both run round-robin in one process, `--reps` times; medians. Frames/s counts frames delivered
   (every 4th: a quarter of the frames, all of them decoded).
2. Robustness: each decoder on damaged bodies (truncated, flipped bytes, garbage after a valid header, empty, a
   zero-frame MP4, truncated MKV/WebM): "error" (what it raised) or "frames N" (what it silently returned).
   PyAV with the handler's settings (explicit demuxer, err_detect=explode) and torchcodec with its defaults, each
   alone; then the handler itself, whose checks (declared container size, zero frames) come on top.
Prints Markdown tables and the verdict; writes the JSON.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scripts.video_docs import publish  # noqa: E402

SIZES = ((224, 224), (480, 640), (720, 1280))
FORMATS = {"mp4": "mov,mp4,m4a,3gp,3g2,mj2", "matroska": "matroska,webm"}


def decode_pyav(data: bytes, container: str, threads: int, every: int) -> int:
    """The handler's own decoder (handlers/video.py on PyAV), from telling the container by its bytes on."""
    from handlers.video import Sampling, VideoClip, VideoLimits, sniff

    clip = VideoClip(data, sniff(data), VideoLimits(max_frames=100_000), threads)
    return sum(1 for _ in clip.frames(Sampling(every=every)))


def decode_pyav_library(data: bytes, container: str, threads: int, every: int) -> int:
    """PyAV alone, with the handler's settings (explicit demuxer, err_detect=explode), none of its checks."""
    import av

    n = 0
    with av.open(io.BytesIO(data), format=FORMATS[container]) as c:
        stream = c.streams.video[0]
        stream.codec_context.thread_type, stream.codec_context.thread_count = "AUTO", threads
        stream.codec_context.options = {"err_detect": "explode"}
        for i, frame in enumerate(c.decode(stream)):
            if i % every == 0:
                frame.to_ndarray(format="rgb24")
                n += 1
    return n


def decode_torchcodec(data: bytes, container: str, threads: int, every: int, batch: int = 16) -> int:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(data, num_ffmpeg_threads=threads, dimension_order="NCHW")
    total, n = decoder.metadata.num_frames, 0
    wanted = list(range(0, total, every))
    for start in range(0, len(wanted), batch):  # bounded memory, as the handler would run it
        n += len(decoder.get_frames_at(wanted[start:start + batch]).data)
    return n


DECODERS: dict[str, Callable[[bytes, str, int, int], int]] = {"pyav": decode_pyav, "torchcodec": decode_torchcodec}
LIBRARIES = {"pyav": decode_pyav_library, "torchcodec": decode_torchcodec}  # robustness: the libraries alone


def write_clips(tmp: Path, frames: int) -> dict[str, bytes]:
    from training.clips import make_clip, write_clip

    out = {}
    for h, w in SIZES:
        out[f"{h}x{w}"] = write_clip(tmp / f"{h}x{w}.mp4", make_clip(0, "test", frames, (h, w)), 30.0).read_bytes()
    return out


def speed(clips: dict[str, bytes], reps: int, frames: int) -> list[dict[str, Any]]:
    rows = []
    for size, data in clips.items():
        for threads in (1, 2):
            for every in (1, 4):
                times: dict[str, list[float]] = {name: [] for name in DECODERS}
                for fn in DECODERS.values():
                    fn(data, "mp4", threads, every)  # warm-up
                for _ in range(reps):
                    for name, fn in DECODERS.items():
                        t0 = time.perf_counter()
                        n = fn(data, "mp4", threads, every)
                        times[name].append(time.perf_counter() - t0)
                for name in DECODERS:
                    med = statistics.median(times[name])
                    rows.append({"size": size, "threads": threads, "every": every, "decoder": name, "frames": n,
                                 "decoded": frames, "median_s": round(med, 5), "fps": round(n / med, 1)})
    return rows


def damaged(tmp: Path, frames: int) -> dict[str, tuple[str, bytes]]:
    """Bodies broken in each way, made from fresh 224 px clips: name -> (container, bytes)."""
    import av

    from tests.videos import zero_frame_mp4
    from training.clips import make_clip

    clip = make_clip(1, "test", frames, 224)

    def write(fmt: str, codec: str, options: dict[str, str] | None = None) -> bytes:
        path = tmp / f"damaged-{fmt}-{codec}-{len(options or {})}"  # faststart rewrites a real file
        with av.open(str(path), "w", format=fmt, options=options or {}) as c:
            s = c.add_stream(codec, rate=30)
            s.width, s.height, s.pix_fmt = 224, 224, "yuv420p"
            for rgb in clip.frames.permute(0, 2, 3, 1).numpy():
                c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
            c.mux(s.encode())
        return path.read_bytes()

    mp4, fast, mkv = write("mp4", "libx264"), write("mp4", "libx264", {"movflags": "faststart"}), \
        write("matroska", "libx264")
    webm = write("webm", "libvpx-vp9")
    rng = np.random.default_rng(0)
    flipped = bytearray(mp4)
    for i in rng.integers(len(mp4) // 4, len(mp4) - len(mp4) // 4, 64):
        flipped[i] ^= 0xFF
    return {"intact mp4": ("mp4", mp4), "mp4 cut at 50 %": ("mp4", mp4[: len(mp4) // 2]),
            "faststart mp4 cut at 50 %": ("mp4", fast[: len(fast) // 2]),
            "faststart mp4 cut at 90 %": ("mp4", fast[: len(fast) * 9 // 10]),
            "64 bytes flipped in the frames": ("mp4", bytes(flipped)),
            "garbage after a valid ftyp": ("mp4", mp4[:32] + rng.bytes(50_000)),
            "empty body": ("mp4", b""), "zero-frame mp4": ("mp4", zero_frame_mp4()),
            "mkv cut at 60 %": ("matroska", mkv[: len(mkv) * 6 // 10]),
            "webm (VP9) intact": ("matroska", webm),
            "webm (VP9) cut at 60 %": ("matroska", webm[: len(webm) * 6 // 10])}


def robustness(cases: dict[str, tuple[str, bytes]], frames: int) -> list[dict[str, Any]]:
    rows = []
    for case, (container, data) in cases.items():
        row: dict[str, Any] = {"case": case, "bytes": len(data), "frames_in_clip": frames}
        for name, fn in {**LIBRARIES, "handler": decode_pyav}.items():
            try:
                row[name] = f"frames {fn(data, container, 1, 1)}"
            except Exception as e:  # what each library raises is the point of the comparison
                kind = f"{e.status} {e.type}" if hasattr(e, "type") else type(e).__name__  # the handler: its 4xx
                row[name] = f"error: {kind} ({' '.join(str(e).split())[:60]})"
        rows.append(row)
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = ["| frames | threads | every | PyAV frames/s | torchcodec frames/s | PyAV / torchcodec |", "|" + "---|" * 6]
    by = {(r["size"], r["threads"], r["every"], r["decoder"]): r for r in result["speed"]}
    ratios = []
    for size, _ in [(f"{h}x{w}", None) for h, w in SIZES]:
        for threads in (1, 2):
            for every in (1, 4):
                a, b = by[(size, threads, every, "pyav")], by[(size, threads, every, "torchcodec")]
                ratios.append(a["fps"] / b["fps"])
                lines.append(f"| {size} | {threads} | {every} | {a['fps']:.0f} | {b['fps']:.0f} | "
                             f"{a['fps'] / b['fps']:.2f} |")
    lines += ["", "| body | PyAV | torchcodec | the handler (PyAV + its checks) |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['pyav']} | {r['torchcodec']} | {r['handler']} |" for r in result["robustness"]]
    silent = {name: sum(1 for r in result["robustness"] if "intact" not in r["case"] and r[name].startswith("frames"))
              for name in (*LIBRARIES, "handler")}
    per_size = {f"{h}x{w}": statistics.median(ratios[i * 4:(i + 1) * 4]) for i, (h, w) in enumerate(SIZES)}
    pace = "; ".join(f"{size}: PyAV / torchcodec {r:.2f} (" + ("within 10 %" if abs(r - 1) < 0.1 else
                     "PyAV faster" if r > 1 else f"torchcodec {1 / r:.2f}x faster") + ")"
                     for size, r in per_size.items())
    versions, before, after = result["versions"], result["load_before"][0], result["load_after"][0]
    lines += ["", f"Verdict: decoding speed, median of the 4 settings per frame size: {pace}; "
              f"of {len(result['robustness']) - 2} damaged bodies PyAV alone returned frames without an error for "
              f"{silent['pyav']}, torchcodec for {silent['torchcodec']}, the handler for {silent['handler']}.",
              "", f"Measured {result['date'][:16].replace('T', ' ')} UTC on {result['cpus']} cores "
              f"({result['machine']}), PyAV {versions['av']} (libavcodec {versions['ffmpeg_pyav']}), torchcodec "
              f"{versions['torchcodec']}; {result['frames']} frames per clip, median of {result['reps']} passes, both "
              f"decoders round-robin in one process at normal priority. Load average (1 min) {before} before, "
              f"{after} after" + (": other jobs (niced training) ran beside it on the same cores." if max(before, after)
                                  > 1 else ".")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=90, help="frames per clip (default 90: 3 s at 30 fps)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "video_decoders.json")
    p.add_argument("--docs", action="store_true", help="also docs/video_decoders.json and its block in video.md")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import av
    import torchcodec

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        clips = write_clips(Path(tmp), a.frames)
        result: dict[str, Any] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "versions": {"av": av.__version__, "ffmpeg_pyav": ".".join(map(str, av.library_versions["libavcodec"])),
                         "torchcodec": torchcodec.__version__, "torch": torch.__version__},
            "clips": {size: len(data) for size, data in clips.items()}, "frames": a.frames, "reps": a.reps,
            "load_before": [round(x, 2) for x in load_before]}
        result["speed"] = speed(clips, a.reps, a.frames)
        result["robustness"] = robustness(damaged(Path(tmp), 30), 30)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    publish(result, a.out, "video-decoders", markdown(result), a.docs)
    print(f"\nload average {result['load_before'][0]} before, {result['load_after'][0]} after; JSON: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The inference library's one-way flow, without TorchServe:

    parse (handlers/request.py) -> decode (handlers/decode.py, images | handlers/video.py, frames)
    -> preprocess (training.presets, from the checkpoint) -> infer (handlers/runtimes.py)
    -> post-process (top-k | masks -> boxes) -> answer

`Pipeline` holds the model, its runtime and the loop that runs every request of a worker batch through those
stages in chunks of at most `max_batch` units (an image, or a video frame) and `max_batch_pixels` decoded pixels,
so memory stays bounded however many units the requests carry (with `lanes` > 1, that many chunks are inferred
at once on their own threads, one more decoded meanwhile). Pixels are counted from the image headers before
anything is decoded: a request whose images add up to more than `max_request_pixels` is refused (413) whole.
A task subclass (handlers/image.py: `ImagePipeline`, handlers/segment.py: `SegmentPipeline`) supplies parse,
post-process and answer, and may stream: after each chunk, `partial` gives a streamed request's answer so far to
the caller's `emit`. It runs in unit tests, benchmarks and on a GPU box with no TorchServe; handlers/adapter.py
adapts it.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from handlers.decode import DecodeLimits, decode_image, decode_jpegs, image_pixels
from handlers.errors import BadInput, error_body
from handlers.options import decode_limits
from handlers.runtimes import EXPORTED, PACKED, RUNTIMES, content_sha256, file_sha256, prepare_runtime
from training.checkpoint import build_model, load_checkpoint
from training.presets import alpha_background, eval_batch

log = logging.getLogger(__name__)

STAGES = ("decode", "preprocess", "inference", "postprocess", "answer")  # per-stage seconds in `timings`


@dataclass
class Decoded:
    """A unit its source decoded itself (a video frame), with what the source knows about it (e.g. the frame's
    index and time); post-processing gets `info` back as `Unit.info`."""

    pixels: torch.Tensor  # uint8 (C, H, W)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    """One request on its way through the stages: the units it carries and what they produced."""

    units: Iterable[bytes | torch.Tensor | Decoded]  # encoded images (decoded in chunks) or decoded frames
    options: dict[str, Any] = field(default_factory=dict)  # per-request options, validated by `parse`
    results: list[Any] = field(default_factory=list)  # post-processed results of units not yet answered, in order
    count: int = 0  # units taken so far (the index of the next one)
    pixels: int = 0  # pixels (width x height) of its encoded images taken so far, counted against max_request_pixels


@dataclass
class Unit:
    """A decoded unit in a chunk, as post-processing sees it."""

    job: Job
    index: int  # its position among its job's units
    pixels: torch.Tensor  # uint8 (C, H, W) on the pipeline device, as decoded (the source's size)
    info: dict[str, Any]  # Decoded.info ({} for encoded images)


Emit = Callable[[int, Any], None]  # (request index, part of its answer): how a streamed answer leaves the pipeline


class Pipeline:
    """A checkpoint served as a function: `handle_requests(list of request items) -> [(status, body), ...]`."""

    # handler options (model-config `handler:` block) -> type; subclasses add their own
    OPTIONS: ClassVar[dict[str, type]] = {"runtime": str, "max_batch": int, "cpu_threads": int,
                                          "runtime_cache": str, "max_image_pixels": int, "max_image_bytes": int,
                                          "max_request_pixels": int, "max_batch_pixels": int,
                                          "jpeg_decoder": str, "jpeg_draft": bool, "artifact": str,
                                          "lanes": int, "max_answer_bytes": int}  # the last: for the adapter
    # True: the TorchServe adapter sends answers as compact JSON text, refusing one over max_answer_bytes with a
    # 413; False: TorchServe encodes dict answers itself (indented JSON)
    COMPACT_JSON: ClassVar[bool] = False

    def __init__(self, ckpt: dict[str, Any], device: str | torch.device = "cpu", *, runtime: str | None = None,
                 max_batch: int = 256, model_name: str | None = None, model_version: str | None = None,
                 cpu_threads: int | None = None, runtime_cache: str | None = None,
                 checkpoint_sha256: str | None = None, max_image_pixels: int = DecodeLimits.max_pixels,
                 max_image_bytes: int = DecodeLimits.max_bytes,
                 max_request_pixels: int = DecodeLimits.max_request_pixels,
                 max_batch_pixels: int = DecodeLimits.max_batch_pixels, jpeg_decoder: str = "auto",
                 jpeg_draft: bool = True, artifact: str | None = None, lanes: int = 1):
        self.device = torch.device(device)
        # None: the device's default -- fp32 eager on CPU, bf16 autocast + channels_last on CUDA
        runtime = runtime or ("bf16" if self.device.type == "cuda" else "eager")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime {runtime!r} is not supported; choose one of {list(RUNTIMES)}")
        if jpeg_decoder not in ("auto", "pil", "torchvision"):
            raise ValueError("jpeg_decoder must be 'auto', 'pil' or 'torchvision'")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if lanes < 1 or (lanes > 1 and runtime not in PACKED):
            raise ValueError(f"lanes must be >= 1, and above 1 only with an ONNX Runtime runtime {list(PACKED)}")
        self.lanes = lanes  # chunks inferred at once, each on its own thread with cores / lanes threads
        self.preprocess: dict[str, Any] = dict(ckpt["preprocess"])
        self.classes = [str(c) for c in ckpt["classes"]]
        self.task = str(ckpt.get("task") or "classification")
        self.limits = decode_limits({"max_image_pixels": max_image_pixels, "max_image_bytes": max_image_bytes,
                                     "jpeg_draft": jpeg_draft, "max_request_pixels": max_request_pixels,
                                     "max_batch_pixels": max_batch_pixels})
        self.jpeg_decoder = (("torchvision" if self.device.type == "cuda" else "pil") if jpeg_decoder == "auto"
                             else jpeg_decoder)
        self.max_batch, self.runtime = max_batch, runtime
        self.model_name = model_name or str(ckpt["arch"])
        self.model_version = str(model_version or "1.0")
        if cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(cpu_threads)  # torch and ONNX Runtime both follow it (see prepare_model)
        self.runtime_cache, self.recipe, self.artifact = runtime_cache, dict(ckpt.get("recipe") or {}), artifact
        self.qat = ckpt.get("qat")  # what quantization-aware training learnt (the qat runtime's development build)
        # onnx/int8 files are cached per checkpoint: the file's sha256 when loaded from a file, else a content hash
        self.checkpoint_sha256 = checkpoint_sha256 or (content_sha256(ckpt) if runtime in EXPORTED else None)
        self.runtime_info: dict[str, Any] = {}
        self.timings: dict[str, float] = dict.fromkeys(STAGES, 0.0)  # seconds per stage, last handle_requests
        self.model = self.prepare_model(build_model(ckpt))

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str | torch.device = "cpu", **options: Any) -> Pipeline:
        """Load a checkpoint (weights_only) and build the pipeline; `options` are the keyword arguments above."""
        ckpt = load_checkpoint(path, map_location="cpu")
        if options.get("artifact"):  # the archive's artifact manifest, next to the checkpoint in the model dir
            options["artifact"] = os.path.join(os.path.dirname(os.path.abspath(path)), options["artifact"])
        if options.get("artifact") or options.get("runtime") in EXPORTED:  # checked / cache key
            options.setdefault("checkpoint_sha256", file_sha256(path))
        return cls(ckpt, device, **options)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The eager model -> the module `forward` runs for `self.runtime` (handlers/runtimes.py). ONNX Runtime uses
        torch's thread count, which the TorchServe adapter sets from cpu_threads (cores / workers by default)."""
        module, self.runtime_info = prepare_runtime(
            self.runtime, model, self.preprocess, self.device, threads=max(1, torch.get_num_threads() // self.lanes),
            cache_dir=self.runtime_cache, key=self.checkpoint_sha256, recipe=self.recipe, artifact=self.artifact,
            max_batch=self.max_batch, qat=self.qat)
        log.info("runtime %s ready: %s", self.runtime, self.runtime_info)
        return module

    # -- the stages a task defines --------------------------------------------------------------------------
    def parse(self, item: Any) -> Job:
        """One request item -> a Job. Raises BadInput with a message for the client."""
        raise NotImplementedError

    def postprocess(self, logits: torch.Tensor, units: Sequence[Unit]) -> list[Any]:
        """Float32 model outputs for a chunk -> one result per unit."""
        raise NotImplementedError

    def answer(self, job: Job) -> Any:
        """A job whose units all succeeded -> the JSON body of its 200 answer (for a streamed job: the rest of
        it, after what `partial` returned)."""
        raise NotImplementedError

    def partial(self, job: Job) -> Any | None:
        """Called after each chunk that ran units of `job` when the caller streams: the part of its answer ready
        now (taking its results out of the job), or None to send nothing yet. Default: answers are not streamed."""
        return None

    def unit_error(self, job: Job, index: int, error: BadInput) -> BadInput:
        """The error a job answers with when its unit `index` failed to decode (default: the unit's error)."""
        return error

    # -- the shared stages ----------------------------------------------------------------------------------
    def unit_pixels(self, unit: Any) -> int:
        """Pixels a unit decodes to: an encoded image's from its header (JPEG draft decoding may produce fewer; the
        budgets count the header), a decoded frame's height x width. Raises BadInput for a bad header."""
        if isinstance(unit, (bytes, bytearray)):
            return image_pixels(unit, self.limits)
        frame = getattr(unit, "pixels", unit)  # a frame tensor, bare or with what its source knows about it
        return int(frame.shape[-1]) * int(frame.shape[-2])

    def decode(self, datas: Sequence[bytes]) -> list[torch.Tensor | BadInput]:
        """Encoded images -> uint8 (C, H, W) tensors on the pipeline device, or a BadInput per failed item."""
        channels, background = self.preprocess["channels"], alpha_background(self.preprocess)
        if self.jpeg_decoder == "torchvision":
            return decode_jpegs(datas, channels, self.device, self.limits, self.preprocess["resize"], background)
        out: list[torch.Tensor | BadInput] = []
        for data in datas:
            try:
                out.append(decode_image(data, channels, self.limits, self.preprocess["resize"], background))
            except BadInput as e:
                out.append(e)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A normalized float32 batch -> float32 outputs (layout and precision are the runtime's business)."""
        return self.model(x).float()

    def handle_requests(self, requests: Sequence[Any], emit: Emit | None = None,
                        streams: Collection[int] | None = None) -> list[tuple[int, Any]]:
        """Answer every request item: (200, body) or (4xx/5xx, error JSON). Never raises. A bad request, or a
        bad unit inside one, fails only that request; the others of the batch are answered normally.

        `emit(request index, part)`, when given, receives the parts of streamed answers as chunks finish (see
        `partial`) for the requests in `streams` (None: all); the final (status, body) then holds only what was
        not emitted. A BadInput raised by `emit` (e.g. a part too large to send) fails that request."""
        self.timings = dict.fromkeys(STAGES, 0.0)
        answers: list[tuple[int, Any] | None] = [None] * len(requests)
        jobs: dict[int, Job] = {}
        for r, item in enumerate(requests):
            try:
                jobs[r] = self.parse(item)
            except BadInput as e:
                answers[r] = (e.status, e.body())
            except Exception as e:  # a parser bug must not take the batch down
                log.exception("request %d: parsing failed", r)
                answers[r] = (500, error_body(500, "InternalError", f"could not read the request ({type(e).__name__})"))
        try:
            self._admit(jobs, answers)
            for chunk, results, seconds in self._computed(self._chunks(jobs, answers)):
                for (_, unit), result in zip(chunk, results):
                    unit.job.results.append(result)
                for stage, spent in zip(("preprocess", "inference", "postprocess"), seconds):
                    self.timings[stage] += spent
                if emit is not None:
                    self._emit([(r, u) for r, u in chunk if streams is None or r in streams], answers, emit)
            start = time.perf_counter()
            for r, job in jobs.items():
                if answers[r] is None:
                    answers[r] = (200, self.answer(job))
            self.timings["answer"] += time.perf_counter() - start
        except Exception as e:
            return self._fail_all(answers, e)
        return answers  # type: ignore[return-value]

    def _computed(self, chunks: Iterable[list[tuple[int, Unit]]]
                  ) -> Iterator[tuple[list[tuple[int, Unit]], list[Any], tuple[float, float, float]]]:
        """(chunk, results, stage seconds) in chunk order. With lanes > 1, up to `lanes` chunks run at once on their
        own threads (ONNX Runtime, numpy and the decoders release the GIL) while the next chunk is decoded here;
        stage seconds are then summed over the lanes and overlap."""
        if self.lanes == 1:
            for chunk in chunks:
                yield chunk, *self._compute(chunk)
            return
        pending: deque = deque()
        with ThreadPoolExecutor(self.lanes, thread_name_prefix="lane") as pool:
            for chunk in chunks:
                pending.append((chunk, pool.submit(self._compute, chunk)))
                if len(pending) > self.lanes:
                    done, future = pending.popleft()
                    yield done, *future.result()
            while pending:
                done, future = pending.popleft()
                yield done, *future.result()

    def _compute(self, chunk: list[tuple[int, Unit]]) -> tuple[list[Any], tuple[float, float, float]]:
        """preprocess -> infer -> post-process one chunk of decoded units: its results and the stages' seconds."""
        with torch.inference_mode():
            t0 = time.perf_counter()
            x = eval_batch([u.pixels for _, u in chunk], self.preprocess, device=self.device)
            t1 = time.perf_counter()
            logits = self.forward(x)
            t2 = time.perf_counter()
            results = self.postprocess(logits, [u for _, u in chunk])
            t3 = time.perf_counter()
        return results, (t1 - t0, t2 - t1, t3 - t2)

    def _emit(self, chunk: list[tuple[int, Unit]], answers: list[Any], emit: Emit) -> None:
        """Hand the parts of streamed answers that the chunk completed to `emit` (answer encoding time)."""
        start = time.perf_counter()
        for r, unit in {r: u for r, u in chunk}.items():
            if answers[r] is None:
                part = self.partial(unit.job)
                if part is not None:
                    try:
                        emit(r, part)
                    except BadInput as e:
                        answers[r] = (e.status, e.body())
        self.timings["answer"] += time.perf_counter() - start

    def _admit(self, jobs: dict[int, Job], answers: list[Any]) -> None:
        """The request budget before anything is decoded: the encoded images of a job that lists its units up front
        are header-checked and counted here (a stream's, as they are read: `_chunks`)."""
        for r, job in jobs.items():
            if isinstance(job.units, Sequence):
                probe = Job(job.units, job.options)  # counts without touching the job
                for unit in job.units:
                    if self._count(r, probe, unit, answers) is None:
                        break
                    probe.count += 1

    def _count(self, r: int, job: Job, unit: Any, answers: list[Any]) -> int | None:
        """The unit's pixels; None (and the job answered) for a bad header or when the job's encoded images pass
        max_request_pixels. (Frames a stream decoded itself count only towards the chunk: a video's own limits on
        frames, duration and frame size bound its request.)"""
        try:
            pixels = self.unit_pixels(unit)
        except BadInput as e:
            e = self.unit_error(job, job.count, e)
            answers[r] = (e.status, e.body())
            return None
        if isinstance(unit, (bytes, bytearray)):
            job.pixels += pixels
            if job.pixels > self.limits.max_request_pixels:
                answers[r] = (413, error_body(413, "TooManyPixels", (
                    f"the request's images decode to more than {self.limits.max_request_pixels} pixels, the limit "
                    f"per request (width x height from their headers: {job.pixels} in the first {job.count + 1}); "
                    "send fewer or smaller images per request")))
                return None
        return pixels

    def _chunks(self, jobs: dict[int, Job], answers: list[Any]) -> Iterator[list[tuple[int, Unit]]]:
        """Decoded units of all live jobs, in request order, at most `max_batch` units and `max_batch_pixels`
        pixels at a time. A unit that fails fails its job (its later units are skipped); a job's unit source may
        also raise BadInput itself (a corrupt stream)."""
        pending: list[tuple[int, int, bytes | torch.Tensor | Decoded]] = []
        pending_pixels = 0
        for r, job in jobs.items():
            for unit in self._take(r, job, answers):
                pixels = self._count(r, job, unit, answers)
                if pixels is None:
                    break
                if pending and pending_pixels + pixels > self.limits.max_batch_pixels:
                    chunk, pending, pending_pixels = self._decode_chunk(pending, jobs, answers), [], 0
                    if chunk:
                        yield chunk
                pending.append((r, job.count, unit))
                pending_pixels += pixels
                job.count += 1
                if len(pending) >= self.max_batch:
                    chunk, pending, pending_pixels = self._decode_chunk(pending, jobs, answers), [], 0
                    if chunk:
                        yield chunk
        if pending:
            chunk = self._decode_chunk(pending, jobs, answers)
            if chunk:
                yield chunk

    def _take(self, r: int, job: Job, answers: list[Any]) -> Iterator[bytes | torch.Tensor | Decoded]:
        """A job's units while it is live. Time spent in its source counts as decoding (a video source decodes
        frames as they are taken); an error from the source answers that job only (BadInput: its 4xx)."""
        units = iter(job.units)
        while answers[r] is None:
            start = time.perf_counter()
            try:
                unit = next(units)
            except StopIteration:
                return
            except BadInput as e:
                answers[r] = (e.status, e.body())
                return
            except (torch.OutOfMemoryError, MemoryError):
                raise
            except Exception as e:  # a decoder bug on odd input must not take the batch down
                log.exception("request %d: its units could not be decoded", r)
                answers[r] = (500, error_body(500, "InternalError", f"decoding failed ({type(e).__name__})"))
                return
            finally:
                self.timings["decode"] += time.perf_counter() - start
            yield unit

    def _decode_chunk(self, pending: list[tuple[int, int, bytes | torch.Tensor | Decoded]], jobs: dict[int, Job],
                      answers: list[Any]) -> list[tuple[int, Unit]]:
        start = time.perf_counter()
        live = [(r, j, u) for r, j, u in pending if answers[r] is None]
        encoded = [i for i, (_, _, u) in enumerate(live) if not isinstance(u, (torch.Tensor, Decoded))]
        units: list[Any] = [u for _, _, u in live]
        for i, x in zip(encoded, self.decode([live[i][2] for i in encoded]) if encoded else []):
            units[i] = x
        for (r, j, _), x in zip(live, units):
            if isinstance(x, BadInput) and answers[r] is None:
                e = self.unit_error(jobs[r], j, x)
                answers[r] = (e.status, e.body())
        self.timings["decode"] += time.perf_counter() - start
        return [(r, Unit(jobs[r], j, x.pixels, x.info) if isinstance(x, Decoded) else Unit(jobs[r], j, x, {}))
                for (r, j, _), x in zip(live, units) if answers[r] is None]

    def _fail_all(self, answers: list[tuple[int, Any] | None], exc: Exception) -> list[tuple[int, Any]]:
        """A failure of the shared batch (OOM, a model error): every request not already answered gets 5xx."""
        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
            log.error("out of memory on %d requests", len(answers))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            fail = (503, error_body(503, "OutOfMemory", "the server ran out of memory; retry with fewer images"))
        else:
            log.exception("inference failed", exc_info=exc)
            fail = (500, error_body(500, "InternalError", f"inference failed ({type(exc).__name__}); retry later"))
        return [a if a is not None else fail for a in answers]

    def describe(self) -> dict[str, Any]:
        """What a client needs to know to call the model."""
        return {"model": self.model_name, "version": self.model_version, "task": self.task, "classes": self.classes,
                "preprocess": self.preprocess, "device": str(self.device), "runtime": self.runtime,
                "runtime_info": {k: v for k, v in self.runtime_info.items() if k != "file"},
                "max_batch": self.max_batch, "max_image_pixels": self.limits.max_pixels,
                "max_image_bytes": self.limits.max_bytes, "max_request_pixels": self.limits.max_request_pixels,
                "max_batch_pixels": self.limits.max_batch_pixels}


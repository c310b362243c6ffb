"""The TorchServe side of every handler: (data, context) -> a pipeline's handle_requests -> per-item answers.

A handler entry file (classifier.py, ...) subclasses `PipelineHandler` and names its pipeline class. Inside a
.mar the entry file sits at the archive root next to the packages `handlers/` and `training/`; the worker puts the
model dir on sys.path, so the absolute imports work there and in the repo. Handler options come from the
model-config YAML `handler:` block (see docs/serving.md, "## Handler").
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from ts.handler_utils.utils import send_intermediate_predict_response
from ts.metrics.dimension import Dimension
from ts.torch_handler.base_handler import BaseHandler

from handlers.artifacts import require_artifact
from handlers.cpu import threads_per_worker
from handlers.errors import BadInput
from handlers.options import check_options
from handlers.pipeline import Pipeline
from handlers.request import check_content_type

log = logging.getLogger(__name__)
NDJSON = "application/x-ndjson"
# TorchServe's own default max_response_size: a worker answer over the frontend's limit kills the worker. The archive
# step passes the configured limit (archive_configs/config.properties.template) as the max_answer_bytes option.
MAX_ANSWER_BYTES = 6_553_500

# Counter of answers by the version that produced them (TorchServe's own ts_inference_requests_total says
# model_version="default" for requests to /predictions/<model>): labels ModelName, ModelVersion, Status.
ANSWERS_METRIC = "handler_answers_total"


def reason_phrase(message: str, limit: int = 200) -> str:
    """An HTTP reason phrase that cannot break the worker protocol: TorchServe 0.12 frames the phrase with its
    length in characters but writes UTF-8 bytes, so one non-ASCII character (say, from an echoed form field
    name) desynchronises the socket and kills the worker. ASCII only, one line, bounded; the full message
    stays in the JSON body."""
    text = " ".join(message.split())
    text = text.encode("ascii", "replace").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cpu_threads(option: int | None, yaml_config: dict[str, Any]) -> int:
    """Threads per worker: the cpu_threads option, else OMP_NUM_THREADS, else the CPU budget (affinity, cgroup
    quota) shared among maxWorkers (or minWorkers), so several CPU workers do not oversubscribe it."""
    if option:
        return max(1, option)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    workers = int(yaml_config.get("maxWorkers") or yaml_config.get("minWorkers") or 1)
    return threads_per_worker(workers)


def request_header(context: Any, idx: int, name: str) -> str | None:
    """A request's HTTP header, any capitalisation (None without TorchServe's per-request processors)."""
    if getattr(context, "request_processor", None) is None:
        return None
    headers = context.get_all_request_header(idx) or {}
    return next((v for k, v in headers.items() if k.lower() == name and isinstance(v, str)), None)


# Per-stage time and errors by type, emitted through TorchServe's metrics cache (context.metrics); the config's
# model_metrics_auto_detect puts them on the Prometheus endpoint (docs/serving.md, "Metrics"). Counters, so rate()
# gives per-second figures; stage milliseconds / batches = the mean time per worker batch in a stage.
STAGE_METRIC, BATCHES_METRIC, ERRORS_METRIC = ("handler_stage_milliseconds_total", "handler_batches_total",
                                               "handler_errors_total")


def declare_metrics(cache: Any) -> dict[str, Any]:
    """Add the stage and error metrics to a worker's metrics cache (once, at load): name -> metric."""
    from ts.metrics.metric_type_enum import MetricTypes

    labels = ["ModelName", "ModelVersion"]
    specs = {STAGE_METRIC: ("ms", labels + ["Stage"]), BATCHES_METRIC: ("count", labels),
             ERRORS_METRIC: ("count", labels + ["Status", "Type"])}
    return {name: cache.add_metric_to_cache(name, unit, dims, MetricTypes.COUNTER)
            for name, (unit, dims) in specs.items()}


def record_metrics(metrics: dict[str, Any], pipeline: Pipeline, answers: Sequence[tuple[int, Any]],
                   ran: bool = True) -> None:
    """One worker batch: milliseconds per stage (the pipeline's `timings`, when it `ran` on this batch), the batch,
    and each error answer by status and type. Never raises: a metrics failure must not fail the answers."""
    labels = [pipeline.model_name, pipeline.model_version]
    try:
        for stage, seconds in (pipeline.timings.items() if ran else ()):
            metrics[STAGE_METRIC].add_or_update(round(seconds * 1000, 3), labels + [stage])
        metrics[BATCHES_METRIC].add_or_update(1, labels)
        errors = Counter((str(status), str(body.get("type", "Error"))) for status, body in answers if status != 200)
        for (status, type_), n in sorted(errors.items()):
            metrics[ERRORS_METRIC].add_or_update(n, labels + [status, type_])
    except Exception:  # noqa: BLE001
        log.exception("could not record handler metrics")


class PipelineHandler(BaseHandler):
    """Loads the archive's checkpoint into `pipeline_class` and answers each request item on its own."""

    pipeline_class: ClassVar[type[Pipeline]]

    def initialize(self, context: Any) -> None:
        # BaseHandler.initialize would try to load a TorchScript/eager model itself: we rebuild ours from the
        # checkpoint through the training registry instead.
        self.context, self.manifest = context, context.manifest
        props = context.system_properties
        model_meta = (context.manifest or {}).get("model", {})
        yaml_config = dict(getattr(context, "model_yaml_config", None) or {})
        options = check_options(yaml_config.get("handler"), self.pipeline_class.OPTIONS)
        require_artifact(options)  # onnx/int8 load what the archive step built; a worker never builds it
        threads = cpu_threads(options.pop("cpu_threads", None), yaml_config)
        self.max_answer_bytes = int(options.pop("max_answer_bytes", MAX_ANSWER_BYTES))

        serialized = model_meta.get("serializedFile")
        if not serialized:
            raise RuntimeError("the archive has no serialized file; build it with the checkpoint as --serialized-file")
        path = os.path.join(props.get("model_dir") or ".", serialized)
        gpu_id = props.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(threads)
        self.map_location = self.device.type
        self.model_pt_path = path
        self.pipeline = self.pipeline_class.from_file(path, self.device, model_name=model_meta.get("modelName"),
                                                      model_version=model_meta.get("modelVersion"), **options)
        self.model = self.pipeline.model
        self.mapping = dict(enumerate(self.pipeline.classes))
        cache = getattr(context, "metrics", None)
        self.handler_metrics = declare_metrics(cache) if cache is not None else None
        self.initialized = True
        log.info("loaded %s version %s on %s (runtime %s, %d CPU threads)", self.pipeline.model_name,
                 self.pipeline.model_version, self.device, self.pipeline.runtime, torch.get_num_threads())

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        """One body per request item; a failed item gets its HTTP status via set_response_status(code, msg, idx).
        A streamed answer (a list of JSON lines) leaves in parts as TorchServe intermediate responses: HTTP
        chunks of NDJSON, the rest with the final response."""
        start = time.time()
        self.context = context
        if self._is_describe():
            return [self.describe_handle() for _ in data]
        answers: list[Any] = [None] * len(data)
        for idx in range(len(data)):
            try:
                check_content_type(request_header(context, idx, "content-type"))
            except BadInput as e:
                answers[idx] = (e.status, e.body())
        todo = [i for i, a in enumerate(answers) if a is None]
        has_processor = getattr(context, "request_processor", None) is not None
        # only HTTP answers may leave in parts: TorchServe 0.12 wedges the worker when a unary gRPC answer does, and
        # the handler cannot tell a gRPC stream call from a unary one. HTTP requests carry their headers (Host is
        # never missing), gRPC ones only their inputs' content types.
        http = {idx for idx in range(len(data)) if request_header(context, idx, "host") is not None}
        streamed: set[int] = set()

        def emit(r: int, lines: list[Any]) -> None:
            idx, text = todo[r], self._text(lines)
            context.set_response_content_type(idx, NDJSON)
            send_intermediate_predict_response({idx: text}, {idx: context.request_ids[idx]},
                                               "Intermediate prediction", 200, context)
            streamed.add(idx)

        parts = {r for r, idx in enumerate(todo) if idx in http}
        for idx, answer in zip(todo, self.pipeline.handle_requests([data[i] for i in todo], emit if parts else None,
                                                                   parts) if todo else []):
            answers[idx] = answer
        bodies = []
        for idx, (status, body) in enumerate(answers):
            lines = isinstance(body, list) or idx in streamed
            text = body
            if lines or self.pipeline.COMPACT_JSON:
                try:
                    text = self._text(body if isinstance(body, list) or not lines else [body])
                except BadInput as e:
                    status, body = e.status, e.body()
                    text = self._text([body] if lines else body)
                    answers[idx] = (status, body)
            if status != 200 and idx not in streamed:  # a stream already answered 200: its last line says why
                context.set_response_status(status, reason_phrase(body["message"]), idx)
            if has_processor:
                context.set_response_content_type(idx, NDJSON if lines else "application/json")
                if idx not in http:  # gRPC StreamPredictions fails the worker on an answer without it (a Java NPE)
                    context.set_response_header(idx, "ts_stream_next", "false")
            bodies.append(text)
        if getattr(context, "metrics", None) is not None:
            context.metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
            self.count_answers(context.metrics, [status for status, _ in answers])
            if getattr(self, "handler_metrics", None) is not None:
                record_metrics(self.handler_metrics, self.pipeline, answers, ran=bool(todo))
        return bodies

    def count_answers(self, metrics: Any, statuses: list[int]) -> None:
        """ANSWERS_METRIC += the batch's answers, per status, under this worker's model name and version."""
        for status, n in sorted(Counter(statuses).items()):
            metrics.add_counter(ANSWERS_METRIC, n, None, [
                Dimension("ModelName", self.pipeline.model_name),
                Dimension("ModelVersion", self.pipeline.model_version),
                Dimension("Status", str(status)), Dimension("Level", "Model")])

    def _text(self, body: Any) -> str:
        """Compact JSON for a body, NDJSON for a list of lines. TorchServe drops the worker (every request of its
        batch fails) on a response over the frontend's max_response_size, so a larger one is a 413 instead."""
        if isinstance(body, list):
            text = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in body)
        else:
            text = json.dumps(body, separators=(",", ":"))
        if len(text) > self.max_answer_bytes and len(text.encode()) > self.max_answer_bytes:
            raise BadInput(413, "AnswerTooLarge", f"the answer would be {len(text.encode())} bytes; the server "
                           f"sends at most {self.max_answer_bytes}: ask for fewer frames or masks, or stream it")
        return text

    def _is_describe(self) -> bool:
        # BaseHandler's version indexes the request processors unguarded; a bare context has none.
        if self.context is None or getattr(self.context, "request_processor", None) is None:
            return False
        return super()._is_describe()

    def describe_handle(self) -> dict[str, Any]:
        return self.pipeline.describe()

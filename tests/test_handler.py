"""The TorchServe adapter, with a real ts.context.Context (as TorchServe's mock_context does) and through the
worker's own loader and Service.predict, whose wire response carries each request's status and body."""

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch

ts = pytest.importorskip("ts")
from ts.context import Context, RequestProcessor  # noqa: E402
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl  # noqa: E402
from ts.model_loader import TsModelLoader  # noqa: E402

from handlers.classifier import ImageClassifier  # noqa: E402
from handlers.cpu import cpu_budget  # noqa: E402
from tests.images import b64, encode, photo, tiny_checkpoint  # noqa: E402
from training.checkpoint import CheckpointError, save_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = {"model": {"modelName": "tiny", "modelVersion": "2.0", "serializedFile": "model.pt",
                      "handler": "classifier.py", "configFile": "model-config.yaml"}}


def metrics_cache() -> MetricsCacheYamlImpl:
    cache = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    cache.initialize_cache()
    return cache


@pytest.fixture
def model_dir(tmp_path):
    save_checkpoint(tiny_checkpoint(3, 32, 36), tmp_path / "model.pt")
    return tmp_path


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def make_context(model_dir, handler_cfg=None, gpu=None):
    config = {"minWorkers": 1, "maxWorkers": 2, "batchSize": 8, "handler": handler_cfg or {}}
    return Context("tiny", str(model_dir), MANIFEST, 8, gpu, ts.__version__, metrics=metrics_cache(),
                   model_yaml_config=config)


def serve(handler, ctx, data, headers=None):
    """What ts.service.Service.predict does around handle(): one RequestProcessor and request id per item."""
    ctx.request_processor = [RequestProcessor(dict(headers or {})) for _ in data]
    ctx.request_ids = {i: f"req-{i}" for i in range(len(data))}
    ctx.metrics.set_request_ids(ctx.request_ids)
    out = handler.handle(data, ctx)
    assert len(out) == len(data)
    json.dumps(out)  # every body must be JSON-serializable
    return out, [ctx.get_response_status(i) for i in range(len(data))]


def close(a, b, tol=1e-6):
    """Same labels in the same order and probabilities equal up to float noise (batch size may change the
    last bits of a convolution)."""
    return [(p["label"], p["index"]) for p in a] == [(p["label"], p["index"]) for p in b] and all(
        abs(p["probability"] - q["probability"]) <= tol for p, q in zip(a, b))


def loaded(model_dir, handler_cfg=None):
    handler, ctx = ImageClassifier(), make_context(model_dir, handler_cfg)
    handler.initialize(ctx)
    return handler, ctx


def test_initialize_reads_manifest_and_handler_options(model_dir, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    handler, _ = loaded(model_dir, {"topk": 3, "max_images_per_request": 4})
    assert handler.initialized and handler.device == torch.device("cpu")
    assert handler.pipeline.model_name == "tiny" and handler.pipeline.model_version == "2.0"
    assert handler.pipeline.topk == 3 and handler.pipeline.max_images_per_request == 4
    assert handler.manifest == MANIFEST and handler.mapping[0] == "class0"
    assert torch.get_num_threads() == max(1, cpu_budget() // 2)  # the CPU budget shared by maxWorkers=2
    loaded(model_dir, {"cpu_threads": 1})
    assert torch.get_num_threads() == 1


def test_bad_options_and_missing_checkpoint_fail_at_load(model_dir):
    with pytest.raises(ValueError, match="top_k"):
        loaded(model_dir, {"top_k": 3})
    (model_dir / "model.pt").unlink()
    with pytest.raises(CheckpointError, match="not found"):
        loaded(model_dir)


def test_mixed_batch_answers_each_item(model_dir):
    handler, ctx = loaded(model_dir, {"topk": 3, "max_images_per_request": 4})
    jpg, png = encode(photo(80, 60), "JPEG"), encode(photo(50, 40, seed=1), "PNG")
    data = [
        {"body": jpg},                                              # 0 raw bytes
        {"body": {"image": "%%%"}},                                 # 1 bad base64 (JSON decoded by TorchServe)
        {"body": {"images": [b64(jpg), b64(png)], "topk": 2}},      # 2 multi
        {"body": b""},                                              # 3 empty
        {"body": b64(png)},                                         # 4 text/plain, decoded to str
        {"body": [b64(png)] * 5},                                   # 5 too many for this model
        {"body": b"GIF89a but not really"},                         # 6 corrupt
    ]
    out, statuses = serve(handler, ctx, data)
    assert [s for s, _ in statuses] == [200, 400, 200, 400, 200, 413, 400]
    assert close(out[0]["predictions"], handler.handle([data[0]], ctx)[0]["predictions"])  # neighbours don't matter
    assert close(out[0]["predictions"][:2], out[2]["results"][0]["predictions"])  # same JPEG, the request's topk 2
    assert out[0]["model"] == "tiny" and out[0]["version"] == "2.0" and len(out[0]["predictions"]) == 3
    assert [len(r["predictions"]) for r in out[2]["results"]] == [2, 2]
    for i, type_ in [(1, "InvalidBase64"), (3, "EmptyBody"), (5, "TooManyImages"), (6, "InvalidImage")]:
        assert out[i]["type"] == type_ and out[i]["code"] == statuses[i][0]
        assert statuses[i][1] == out[i]["message"]  # the reason phrase carries the message too
    assert all(ctx.get_response_content_type(i) == "application/json" for i in range(len(data)))


def test_describe_and_bare_context(model_dir):
    handler, ctx = loaded(model_dir)
    out, _ = serve(handler, ctx, [{"body": b""}], headers={"describe": "True"})
    assert out[0]["classes"][:2] == ["class0", "class1"] and out[0]["preprocess"]["resize"] == 36
    ctx.request_processor = None  # no per-request processors: answering must still work
    out = handler.handle([{"body": b""}, {"body": encode(photo(), "PNG")}], ctx)
    assert out[0]["code"] == 400 and len(out[1]["predictions"]) == 5


def parse_predict_response(msg: bytes):
    """Decode ts.protocol.otf_message_handler.create_predict_response: [(request id, status, body), ...]."""
    pos = 0

    def i32():
        nonlocal pos
        pos += 4
        return struct.unpack_from("!i", msg, pos - 4)[0]

    def buf():
        nonlocal pos
        n = i32()
        pos += max(n, 0)
        return bytes(msg[pos - max(n, 0):pos])

    code, _ = i32(), buf()
    answers = []
    while (n := i32()) != -1:
        pos += n
        req_id = bytes(msg[pos - n:pos]).decode()
        _content_type, status, _phrase = buf(), i32(), buf()
        for _ in range(i32()):
            buf(), buf()
        answers.append((req_id, status, json.loads(buf())))
    return code, answers


def worker_service(model_dir, monkeypatch, model_config: str):
    """The handler loaded the way a worker loads it, from the .mar layout: classifier.py at the root,
    MAR-INF/MANIFEST.json, the model-config YAML."""
    shutil.copy(ROOT / "handlers" / "classifier.py", model_dir / "classifier.py")
    (model_dir / "MAR-INF").mkdir()
    (model_dir / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(MANIFEST))
    (model_dir / "model-config.yaml").write_text(model_config)
    monkeypatch.syspath_prepend(str(model_dir))
    monkeypatch.delitem(sys.modules, "classifier", raising=False)
    service = TsModelLoader().load("tiny", str(model_dir), "classifier.py", None, 4, metrics_cache=metrics_cache())
    service.set_cl_socket(None)
    return service


def test_through_the_worker_loader_and_service(model_dir, monkeypatch):
    service = worker_service(model_dir, monkeypatch, "batchSize: 4\nhandler:\n  topk: 2\n")
    png = encode(photo(), "PNG")
    batch = [{"requestId": f"r{i}".encode(), "parameters": [{"name": "body", "contentType": ct, "value": v}]}
             for i, (ct, v) in enumerate([("image/png", png), ("application/json", {"image": "??"}),
                                          ("application/json", {"image": b64(png), "topk": 4}),
                                          ("application/octet-stream", png[:60])])]
    code, answers = parse_predict_response(service.predict(batch))
    assert code == 200
    assert [(r, s) for r, s, _ in answers] == [("r0", 200), ("r1", 400), ("r2", 200), ("r3", 400)]
    assert len(answers[0][2]["predictions"]) == 2 and len(answers[2][2]["predictions"]) == 4
    assert answers[1][2]["type"] == "InvalidBase64" and answers[3][2]["type"] == "InvalidImage"


def test_non_ascii_error_text_keeps_the_wire_protocol_in_step(model_dir, monkeypatch):
    # TorchServe frames the reason phrase by character count but writes UTF-8: a non-ASCII phrase would shift
    # every later byte and kill the worker. A form-encoded image (curl --data-binary's default) arrives as
    # fields whose names are binary garbage; the error names them.
    service = worker_service(model_dir, monkeypatch, "batchSize: 4\n")
    png = encode(photo(), "PNG")
    garbage = [{"name": "\u00fc\ufffdPNG\u00e9", "contentType": None, "value": b"\xff"},
               {"name": "\u2014x", "contentType": None, "value": b"\xfe"}]
    batch = [{"requestId": b"r0", "parameters": garbage},
             {"requestId": b"r1", "parameters": [{"name": "body", "contentType": "image/png", "value": png}]}]
    code, answers = parse_predict_response(service.predict(batch))
    assert [(r, s) for r, s, _ in answers] == [("r0", 400), ("r1", 200)]
    assert "predictions" in answers[1][2]


def test_reason_phrase_is_ascii_single_line_and_bounded():
    from handlers.adapter import reason_phrase

    phrase = reason_phrase("width \u00d7 height\nover \u2014 limit " + "x" * 500)
    assert phrase.isascii() and "\n" not in phrase and len(phrase) <= 200


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_device_from_context(model_dir):
    handler, ctx = ImageClassifier(), make_context(model_dir, gpu=0)
    handler.initialize(ctx)
    assert handler.device == torch.device("cuda:0")
    out, statuses = serve(handler, ctx, [{"body": encode(photo(), "JPEG")}, {"body": b"x"}])
    assert [s for s, _ in statuses] == [200, 400] and len(out[0]["predictions"]) == 5


def test_form_encoded_bodies_get_415_and_answers_are_counted_per_version(model_dir, caplog):
    """A form-encoded body (curl -d's default) is refused with a short ASCII message naming the fix; every answer
    is counted under the version that produced it (the manifest's 2.0), whatever endpoint was called."""
    handler, ctx = loaded(model_dir)
    png = encode(photo(), "PNG")
    caplog.set_level("INFO", logger="ts.metrics.caching_metric")
    out, statuses = serve(handler, ctx, [{"body": b64(png)}, {"body": b64(png)}],
                          headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    assert [s for s, _ in statuses] == [415, 415] and out[0]["type"] == "FormEncodedBody"
    message = statuses[0][1]
    assert message.isascii() and "-H 'Content-Type: application/octet-stream'" in message and len(message) <= 300
    out, statuses = serve(handler, ctx, [{"body": png}, {"body": b""}], headers={"content-type": "image/png"})
    assert [s for s, _ in statuses] == [200, 400] and out[0]["version"] == "2.0"
    lines = [r.getMessage() for r in caplog.records if "handler_answers_total" in r.getMessage()]
    counts = {line.split("|#")[1].split(",Level")[0]: float(line.split(":")[1].split("|")[0]) for line in lines}
    assert counts == {"ModelName:tiny,ModelVersion:2.0,Status:415": 2.0,
                      "ModelName:tiny,ModelVersion:2.0,Status:200": 1.0,
                      "ModelName:tiny,ModelVersion:2.0,Status:400": 1.0}, lines


def test_each_batch_emits_stage_times_and_errors_by_type(model_dir, caplog):
    """The metric lines the worker prints for TorchServe's frontend (the real-server test reads them back from
    the Prometheus endpoint: tests/test_conventions.py)."""
    handler, ctx = loaded(model_dir)
    with caplog.at_level("INFO", logger="ts.metrics.caching_metric"):
        serve(handler, ctx, [{"body": encode(photo(), "PNG")}, {"body": b"junk"}, {"body": b""}, {"body": b"\x00junk"}])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]handler_")
             and "handler_answers_total" not in r.getMessage()]
    version = "ModelName:tiny,ModelVersion:2.0"
    for stage in ("decode", "preprocess", "inference", "postprocess", "answer"):
        assert any("handler_stage_milliseconds_total.Milliseconds:" in x and f"{version},Stage:{stage}|" in x
                   for x in lines), stage
    assert sum(x.startswith(f"[METRICS]handler_batches_total.Count:1|#{version}|") for x in lines) == 1
    errors = sorted(x.split("|")[0:2] for x in lines if x.startswith("[METRICS]handler_errors_total"))
    assert errors == [["[METRICS]handler_errors_total.Count:1", f"#{version},Status:400,Type:EmptyBody"],
                      ["[METRICS]handler_errors_total.Count:2", f"#{version},Status:400,Type:InvalidImage"]]

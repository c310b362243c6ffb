"""A gRPC inference client built from TorchServe's own protos, and the rule for reading its answers.

The installed TorchServe ships its protos inside `ts/frontend/model-server.jar` (`proto/inference.proto`,
`management.proto` and the `google/...` files they import). `stubs()` extracts them and generates the Python
stubs with grpcio-tools into a cache directory, once per TorchServe version; nothing generated is kept in the
repository.

TorchServe 0.12 drops a handler's per-request status over gRPC: a request the handler refuses arrives with
status OK and the handler's error JSON as the prediction. The answer to read is therefore the body: every error
body of ours has an integer "code" (the HTTP status REST would have sent), no successful answer has one.
`predict` applies that rule and returns (status, body) like REST. Refusals by TorchServe itself (a missing or
wrong token: PERMISSION_DENIED; an unknown model: INTERNAL, "Model not found") do arrive as gRPC errors
and are raised.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any


def _jar() -> Path:
    import ts

    return Path(ts.__file__).resolve().parent / "frontend" / "model-server.jar"


def stubs(cache_dir: Path) -> tuple[ModuleType, ModuleType]:
    """(inference_pb2, inference_pb2_grpc) generated from the installed TorchServe's inference.proto."""
    import grpc_tools
    from grpc_tools import protoc
    from ts.version import __version__

    out = Path(cache_dir) / f"torchserve-{__version__}"
    if not (out / "stubs" / "inference_pb2_grpc.py").is_file():
        out.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=out, prefix=".build-"))  # renamed into place: concurrent runs are safe
        protos, gen = work / "protos", work / "stubs"
        with zipfile.ZipFile(_jar()) as jar:
            jar.extractall(protos, [n for n in jar.namelist() if n.endswith(".proto")
                                    and (n.startswith("proto/") or n.startswith("google/"))])
        gen.mkdir()
        well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
        rc = protoc.main(["protoc", f"-I{protos / 'proto'}", f"-I{protos}", f"-I{well_known}",
                          f"--python_out={gen}", f"--grpc_python_out={gen}", str(protos / "proto" / "inference.proto"),
                          str(protos / "google" / "rpc" / "status.proto")])  # PredictionResponse.status
        if rc != 0:
            shutil.rmtree(work, ignore_errors=True)
            raise RuntimeError(f"protoc failed ({rc}) on the protos of {_jar()}")
        try:
            gen.rename(out / "stubs")
        except OSError:  # another run got there first
            pass
        shutil.rmtree(work, ignore_errors=True)
    if str(out / "stubs") not in sys.path:
        sys.path.insert(0, str(out / "stubs"))
        importlib.invalidate_caches()
    return importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")


def body_status(body: Any) -> int:
    """The status of one answer body: its "code" when it is an error body, else 200."""
    code = body.get("code") if isinstance(body, dict) else None
    return code if isinstance(code, int) and not isinstance(code, bool) else 200


class GrpcClient:
    """Predictions and Ping over TorchServe's gRPC inference API, with the inference key as bearer token."""

    def __init__(self, target: str, token: str | None, cache_dir: Path, timeout: float = 60.0):
        import grpc

        self.pb2, grpc_pb2 = stubs(cache_dir)
        self.channel = grpc.insecure_channel(target)
        self.stub = grpc_pb2.InferenceAPIsServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.timeout = timeout

    def predict(self, model: str, data: bytes, version: str | None = None) -> tuple[int, Any]:
        """(status, body) for one request: `data` as the request body (image bytes or JSON)."""
        request = self.pb2.PredictionsRequest(model_name=model, model_version=version or "", input={"data": data})
        reply = self.stub.Predictions(request, metadata=self.metadata, timeout=self.timeout)
        try:
            body = json.loads(reply.prediction)
        except ValueError:
            return 500, {"code": 500, "type": "InvalidAnswer", "message": reply.prediction[:200].decode("latin-1")}
        return body_status(body), body

    def ping(self) -> str:
        from google.protobuf import empty_pb2

        reply = self.stub.Ping(empty_pb2.Empty(), metadata=self.metadata, timeout=self.timeout)
        return json.loads(reply.health)["status"]

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Int8 quantization-aware training: prepare -> a few steps -> convert on CPU, the checkpoint contract, the int8
model against the fake-quantised one, and the models and recipes QAT refuses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.checkpoint import build_model, load_checkpoint
from training.data import load_dataset
from training.models import get_model
from training.presets import eval_batch, make_preprocess
from training.qat import QATError, fake_quantized, full_state, prepare_qat, quantized
from training.recipe import Recipe, RecipeError, make_recipe
from training.train import train

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")


@pytest.fixture(scope="module")
def qat_checkpoint(tmp_path_factory) -> Path:
    """LeNet-5 trained with QAT from scratch: 128 images, batch 32, one epoch = 4 fake-quantised steps."""
    if not FMNIST.exists():
        pytest.skip("dataset-fashion-mnist is not installed")
    path = tmp_path_factory.mktemp("qat") / "q.pt"
    train(Recipe(arch="lenet5", epochs=1, batch_size=32, optimizer="adamw", lr=3e-3, warmup_epochs=0.25, limit=128,
                 crop_padding=0, qat=True), path, progress=False)
    return path


def test_the_checkpoint_keeps_float_weights_under_registry_names_and_the_quantiser_state_beside(qat_checkpoint):
    ckpt = load_checkpoint(qat_checkpoint)  # weights_only, like every checkpoint
    assert set(ckpt["state_dict"]) == set(get_model("lenet5").state_dict())
    assert build_model(ckpt)(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # the float model still builds
    assert ckpt["qat"]["scheme"] == "pt2e-x86-qat" and ckpt["qat"]["fake_quantizers"] >= 5
    assert set(ckpt["qat"]["versions"]) == {"torch", "torchao"}


def test_converted_int8_model_agrees_with_the_fake_quantised_one_and_runs_in_onnx_runtime(qat_checkpoint, tmp_path,
                                                                                          monkeypatch):
    import onnxruntime as ort

    from handlers.runtimes import export_onnx

    ckpt = load_checkpoint(qat_checkpoint)
    test = load_dataset("fashion_mnist", limit=128).test
    x = eval_batch(test.images, ckpt["preprocess"])
    int8 = quantized(ckpt)
    with torch.no_grad():
        fake, real = fake_quantized(ckpt)(x), int8(x)
    # the rebuilt fake-quantised model is the one the training run evaluated
    assert (fake.argmax(1) == test.labels).float().mean().item() == pytest.approx(ckpt["metrics"]["test_acc"])
    assert (fake.argmax(1) == real.argmax(1)).float().mean().item() >= 0.98
    assert (fake - real).abs().max().item() <= 0.05 * fake.abs().max().item()
    assert sum(t.dtype == torch.int8 for t in int8.state_dict().values()) >= 5  # int8 weights, really
    # torchao's pattern graphs are exported once per process: converting again exports only the model itself
    exports = []
    real_export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: exports.append(1) or real_export(*a, **k))
    with torch.no_grad():
        again = quantized(ckpt)(x)
    monkeypatch.undo()
    assert len(exports) == 1 and torch.equal(again, real)
    # the QDQ ONNX graph that serving runs gives the same answers
    export_onnx(int8, ckpt["preprocess"], tmp_path / "q.onnx")
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    onnx = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    assert (onnx.argmax(1) == real.argmax(1)).float().mean().item() >= 0.98
    assert (onnx - real).abs().max().item() <= 0.05 * real.abs().max().item()


def test_a_model_the_quantizer_cannot_handle_is_one_clear_cli_error(tmp_path):
    recipe = tmp_path / "cbam_qat.yaml"
    recipe.write_text("arch: cbam_resnet18\nmodel_args: {width: 8, zero_init_residual: false}\nqat: true\n"
                      "epochs: 1\nlimit: 64\n")
    p = subprocess.run([sys.executable, "-m", "training", "train", "--recipe", str(recipe), "--out",
                        str(tmp_path / "c.pt"), "--no-tensorboard"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "the x86 int8 quantizer cannot handle cbam_resnet18" in lines[0] and "int8 (post-training)" in lines[0]
    assert not (tmp_path / "c.pt").exists()


def test_zero_batchnorm_weights_and_non_qat_checkpoints_are_refused(qat_checkpoint):
    pre = make_preprocess(28, 1, [0.5], [0.5])
    with pytest.raises(QATError, match="zero_init_residual: false"):
        prepare_qat(get_model("resnet18", width=8), pre, "resnet18")  # zero-initialised last BN of each block
    ckpt = load_checkpoint(qat_checkpoint)
    ckpt.pop("qat")
    with pytest.raises(QATError, match="not trained with qat"):
        full_state(ckpt)


@pytest.mark.parametrize("values, message", [
    ({"qat": True, "ema_decay": 0.99}, "without a weight EMA"),
    ({"qat": True, "amp": "bf16"}, "float32"),
    ({"qat": True, "freeze": "linear_probe"}, "whole fake-quantised graph"),
])
def test_qat_recipes_that_cannot_work_are_refused(values, message):
    with pytest.raises(RecipeError, match=message):
        make_recipe(values)


# -- served through the runtimes module: built at archive time, accuracy-guarded like int8 --------------------------
def _config(tmp: Path, checkpoint: Path, runtime: str = "qat", **artifact) -> Path:
    import yaml

    path = tmp / "configs" / "fq" / "1.0.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "name": "fq", "version": "1.0", "checkpoint": str(checkpoint), "runtime": runtime,
        "artifact": {"accuracy_images": 500, **artifact},
        "torchserve": {"batchSize": 4, "maxBatchDelay": 5, "minWorkers": 1, "maxWorkers": 1, "responseTimeout": 60,
                       "deviceType": "cpu", "handler": {"topk": 3}}}))
    return path


def test_the_qat_runtime_is_archived_measured_and_loaded_without_torchao(qat_checkpoint, tmp_path, monkeypatch):
    import zipfile

    import training.qat
    from handlers.image import ImagePipeline
    from serving.archive import build_archive
    from serving.config import load_config

    # the same accuracy guard as int8 (serving/artifacts.py): measured against the float weights, held to a budget
    # (wide here: four training steps make a fragile model; the refusal itself is tested for int8)
    entry = build_archive(load_config(_config(tmp_path, qat_checkpoint, max_accuracy_drop=5.0)), tmp_path / "store")
    assert entry["artifact"]["file"] == "model.qat.onnx" and entry["artifact"]["qat"]["scheme"] == "pt2e-x86-qat"
    acc = entry["accuracy"]
    assert acc["runtime"] == "qat" and acc["images"] == 500 and acc["budget_pt"] == 5.0
    assert acc["drop_pt"] == pytest.approx(100 * (acc["fp32"] - acc["qat"]), abs=0.01)
    with zipfile.ZipFile(tmp_path / "store" / entry["mar"]) as z:
        z.extractall(tmp_path / "unpacked")

    def forbidden(*args, **kwargs):
        raise AssertionError("a worker loads the packed graph: no export, no torchao")

    monkeypatch.setattr(training.qat, "prepare_qat", forbidden)
    pipe = ImagePipeline.from_file(tmp_path / "unpacked" / qat_checkpoint.name, runtime="qat",
                                   artifact="artifact.json")
    assert pipe.describe()["runtime_info"]["artifact"] == "model.qat.onnx"
    monkeypatch.undo()
    ckpt = load_checkpoint(qat_checkpoint)
    x = eval_batch(load_dataset("fashion_mnist", limit=128).test.images[:64], ckpt["preprocess"])
    with torch.no_grad():
        served, int8 = pipe.model(x), quantized(ckpt)(x)
    assert (served.argmax(1) == int8.argmax(1)).float().mean().item() >= 0.98


def test_the_qat_runtime_refuses_a_checkpoint_trained_without_qat(qat_checkpoint, tmp_path):
    from serving.archive import ArchiveError, build_archive
    from serving.config import load_config
    from training.checkpoint import save_checkpoint

    ckpt = load_checkpoint(qat_checkpoint)
    ckpt.pop("qat")
    plain = save_checkpoint(ckpt, tmp_path / "plain.pt")
    with pytest.raises(ArchiveError, match="runtime qat: this checkpoint was not trained with qat: true.*int8"):
        build_archive(load_config(_config(tmp_path, plain)), tmp_path / "store")

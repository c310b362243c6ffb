"""Runtimes (handlers/runtimes.py): each answers like eager within its stated tolerance; the development cache
is keyed by checkpoint, tool versions and calibration source and never loads a file that does not match its
recorded sha256; int8 calibration data is deterministic and synthetic calibration is said loudly; unknown names
fail early."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import handlers.runtimes as runtimes
from handlers.artifacts import CALIBRATION_IMAGES
from handlers.decode import to_tensor
from handlers.image import ImagePipeline, pipeline_options
from handlers.runtimes import RUNTIMES, SYNTHETIC_WARNING, development_calibration, file_sha256, prepare_runtime
from tests.images import photo, tiny_checkpoint
from training.calibration import calibration_set
from training.checkpoint import build_model, save_checkpoint
from training.data import FASHION_MNIST_ROOT
from training.models import get_model
from training.presets import eval_batch, make_preprocess

# runtime -> (least share of images whose top-1 equals eager's, largest mean |probability - eager's|). fp32 runtimes
# must agree exactly. Random backbones with a refitted head are harsher on reduced precision than trained nets (their
# features differ little between images, the head amplifies the differences), so bf16/int8 get room here; a broken
# runtime lands near chance (< 0.3). Accuracy on the real test set: docs/runtimes.md. int8 per model: LeNet
# calibrates on synthetic images (its recipe names no dataset), the ResNet on its ImageFolder training set.
TOLERANCE = {"compile": (1.0, 1e-5), "onnx": (1.0, 1e-5), "bf16": (0.85, 0.01),
             "int8-lenet": (0.85, 0.03), "int8-resnet": (0.75, 0.03)}
N_IMAGES = 48


def pattern(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Two random gratings on a random colour plus noise: far more varied than tests.images.photo, so that
    different images reach different classes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(60, 190, 3) + rng.normal(0, 8, (h, w, 3))
    for _ in range(2):
        theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.05, 0.5), rng.uniform(0, 2 * np.pi)
        a += rng.uniform(30, 90, 3) * np.sin(freq * (x * np.cos(theta) + y * np.sin(theta)) + phase)[..., None]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB").convert(mode)


def spread_head(ckpt: dict, images: list[torch.Tensor], std: float = 3.0) -> dict:
    """Refit the last Linear so logits over `images` have zero mean and `std` per class: a random head answers the
    same class for every image, which would make top-1 agreement trivial. The backbone stays random."""
    model = build_model(ckpt)
    name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    feats: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, args, out: feats.append(args[0]))
    with torch.no_grad():
        model(eval_batch(images, ckpt["preprocess"]))
    hook.remove()
    mu = feats[0].mean(0)
    w = torch.randn(head.out_features, mu.numel(), generator=torch.Generator().manual_seed(0))
    w = w * (std / ((feats[0] - mu) @ w.T).std(0)).unsqueeze(1)
    state = dict(ckpt["state_dict"], **{f"{name}.weight": w, f"{name}.bias": -(w @ mu)})
    return dict(ckpt, state_dict=state)


def resnet_checkpoint(size: int = 32, width: int = 16, seed: int = 0, recipe: dict | None = None) -> dict:
    """A narrow ResNet-18 with random weights and non-trivial BN statistics (zero-init would make blocks identities)."""
    torch.manual_seed(seed)
    args = {"num_classes": 10, "in_channels": 3, "img_size": size, "width": width, "zero_init_residual": False}
    model = get_model("resnet18", **args).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return {"arch": "resnet18", "model_args": args, "state_dict": model.state_dict(),
            "classes": [f"class{i}" for i in range(10)], "preprocess": make_preprocess(size, 3, [0.5] * 3, [0.25] * 3,
                                                                                      resize=size + 4),
            "metrics": {}, "recipe": recipe or {}}


@pytest.fixture(scope="module")
def images() -> dict[str, list[torch.Tensor]]:
    """Varied test images of several sizes; the pipeline's preprocess resizes and crops them."""
    shapes = [(28 + 3 * (i % 7), 28 + 5 * (i % 5)) for i in range(N_IMAGES)]
    return {"lenet": [to_tensor(pattern(w, h, i, "L")) for i, (w, h) in enumerate(shapes)],
            "resnet": [to_tensor(pattern(w + 8, h + 8, i)) for i, (w, h) in enumerate(shapes)]}


@pytest.fixture(scope="module")
def files(tmp_path_factory, images) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpts")
    for i in range(90):  # the ResNet's "training set": more images of the same kind (other seeds), two classes
        (d / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        pattern(40, 40, 1000 + i).save(d / "train" / f"c{i % 2}" / f"{i}.png")
    resnet = resnet_checkpoint(recipe={"dataset": "imagefolder", "data_root": str(d / "train")})
    return {"lenet": save_checkpoint(spread_head(tiny_checkpoint(1, 28), images["lenet"]), d / "lenet.pt"),
            "resnet": save_checkpoint(spread_head(resnet, images["resnet"]), d / "resnet.pt")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runtime-cache")


@pytest.fixture(scope="module")
def pipe(files, cache):
    """pipe(model, runtime): one pipeline per pair for the module, all sharing one runtime cache."""
    made: dict[tuple[str, str], ImagePipeline] = {}

    def get(model: str, runtime: str, **kw) -> ImagePipeline:
        if (model, runtime) not in made:
            made[model, runtime] = ImagePipeline.from_file(files[model], runtime=runtime, runtime_cache=str(cache),
                                                           **kw)
        return made[model, runtime]
    return get


@torch.inference_mode()
def probs(p: ImagePipeline, imgs: list[torch.Tensor]) -> torch.Tensor:
    return torch.softmax(p.forward(eval_batch(imgs, p.preprocess)), dim=1)


def assert_like_eager(p: ImagePipeline, eager: ImagePipeline, imgs: list[torch.Tensor], tolerance: str) -> None:
    min_agree, mean_diff = TOLERANCE[tolerance]
    ref, got = probs(eager, imgs), probs(p, imgs)
    assert ref.argmax(1).unique().numel() >= 5  # the images reach many classes
    agree = (ref.argmax(1) == got.argmax(1)).float().mean().item()
    diff = (ref - got).abs().mean().item()
    assert agree >= min_agree and diff <= mean_diff, f"{tolerance}: top-1 agreement {agree:.3f}, mean diff {diff:.2e}"
    one = probs(p, imgs[:1])  # batch 1 and a batch of 48 take different code paths in every runtime
    assert (one - got[:1]).abs().max().item() <= max(mean_diff, 1e-5)


@pytest.mark.parametrize("runtime", ["onnx", "bf16", "int8"])
@pytest.mark.parametrize("model", ["lenet", "resnet"])
def test_runtime_answers_like_eager(model, runtime, pipe, images):
    tolerance = f"int8-{model}" if runtime == "int8" else runtime
    assert_like_eager(pipe(model, runtime), pipe(model, "eager"), images[model], tolerance)


def test_compile_answers_like_eager_without_recompiling(files, images):
    # the inductor cache stays in the default cache dir, so a rerun compiles from cache in seconds
    from torch._dynamo.utils import counters

    p = ImagePipeline.from_file(files["lenet"], runtime="compile")
    graphs = counters["stats"]["unique_graphs"]
    assert_like_eager(p, ImagePipeline.from_file(files["lenet"]), images["lenet"], "compile")
    for n in (3, 16, 40):  # the warm-up at load covered every batch size
        probs(p, images["lenet"][:n])
    assert counters["stats"]["unique_graphs"] == graphs


def test_onnx_export_is_cached_by_checkpoint_sha256(pipe, files, cache, monkeypatch):
    first = pipe("lenet", "onnx")
    path = Path(first.runtime_info["file"])
    assert path.parent.parent == cache / file_sha256(files["lenet"]) and path.name == "fp32-1x28.onnx"
    assert path.with_name(path.name + ".sha256").read_text().split()[0] == file_sha256(path)

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")
    monkeypatch.setattr(runtimes, "export_onnx", no_export)
    again = ImagePipeline.from_file(files["lenet"], runtime="onnx", runtime_cache=str(cache))  # a restarted worker
    assert again.runtime_info["cache"] == "hit" and again.runtime_info["file"] == first.runtime_info["file"]
    x = eval_batch([to_tensor(photo(28, 28, mode="L"))], again.preprocess)
    with torch.inference_mode():
        assert torch.equal(again.forward(x), first.forward(x))
    other = tiny_checkpoint(1, 28, seed=1)  # other weights: another key, so a new export
    with pytest.raises(AssertionError, match="exported again"):
        ImagePipeline(other, runtime="onnx", runtime_cache=str(cache))


def test_the_cache_key_covers_tool_versions(files, tmp_path, monkeypatch):
    """Another torch, onnx, onnxscript or ONNX Runtime build gets its own files, never the old ones."""
    first = ImagePipeline.from_file(files["lenet"], runtime="onnx", runtime_cache=str(tmp_path))
    versions = runtimes.builder_versions()
    monkeypatch.setattr(runtimes, "builder_versions", lambda: {**versions, "onnxruntime": "9.9.9"})
    upgraded = ImagePipeline.from_file(files["lenet"], runtime="onnx", runtime_cache=str(tmp_path))
    assert upgraded.runtime_info["cache"] == "miss" and upgraded.runtime_info["file"] != first.runtime_info["file"]


@pytest.mark.parametrize("damage", ["changed", "truncated"])
def test_a_damaged_cache_file_is_rebuilt_never_loaded(files, tmp_path, damage):
    first = ImagePipeline.from_file(files["lenet"], runtime="onnx", runtime_cache=str(tmp_path))
    path = Path(first.runtime_info["file"])
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]) if damage == "changed" else data[: len(data) // 2])
    again = ImagePipeline.from_file(files["lenet"], runtime="onnx", runtime_cache=str(tmp_path))
    assert again.runtime_info["cache"] == "miss" and path.read_bytes() == data  # rebuilt to the same bytes
    x = eval_batch([to_tensor(photo(28, 28, mode="L"))], again.preprocess)
    with torch.inference_mode():
        assert torch.equal(again.forward(x), first.forward(x))


def test_int8_reports_its_calibration_and_onnx_threads_follow_cpu_threads(pipe, files, cache, caplog):
    lenet = pipe("lenet", "int8")  # its recipe names no dataset: synthetic, and said so
    assert lenet.runtime_info["calibration"]["source"] == "synthetic"
    assert lenet.describe()["runtime_info"]["warning"] == SYNTHETIC_WARNING
    with caplog.at_level("WARNING", logger="handlers.runtimes"):
        ImagePipeline.from_file(files["lenet"], runtime="int8", runtime_cache=str(cache))  # from the cache too
    assert SYNTHETIC_WARNING in caplog.text
    info = pipe("resnet", "int8").runtime_info
    assert info["calibration"]["source"] == "imagefolder:train" and info["calibration"]["images"] == CALIBRATION_IMAGES
    assert "warning" not in info
    before = torch.get_num_threads()
    try:
        p = ImagePipeline.from_file(files["lenet"], runtime="onnx", runtime_cache=str(cache), cpu_threads=1)
        assert p.runtime_info["threads"] == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_synthetic_calibration_is_deterministic_and_follows_the_preprocess_stats():
    pre = make_preprocess(32, 3, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    a, about = development_calibration(pre, None)
    b, _ = development_calibration(pre, {"dataset": "imagefolder", "data_root": "/nonexistent"})  # data missing
    assert about["source"] == "synthetic" and len(a) == 4 and all(torch.equal(x, y) for x, y in zip(a, b))
    pixels = torch.cat(a) * torch.tensor(pre["std"]).view(1, 3, 1, 1) + torch.tensor(pre["mean"]).view(1, 3, 1, 1)
    assert pixels.shape == (64, 3, 32, 32) and pixels.min() >= 0 and pixels.max() <= 1  # real pixel range
    assert pixels.std() > 0.1 and (pixels[0] - pixels[1]).abs().mean() > 0.05  # varied, not constant


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason="needs the Fashion-MNIST package")
def test_calibration_uses_the_training_data_when_present():
    pre = make_preprocess(28, 1, [0.286], [0.353])
    batches, about = calibration_set({"preprocess": pre, "recipe": {"dataset": "fashion_mnist"}}, 64, 0)
    assert about["source"] == "fashion_mnist:train" and torch.cat(batches).shape == (64, 1, 28, 28)


def test_eager_runs_conv_nets_channels_last_with_the_same_answers():
    ckpt = resnet_checkpoint(size=64, width=8)
    p = ImagePipeline(ckpt)
    assert p.model.channels_last and p.model.autocast is None
    x = eval_batch([to_tensor(photo(70, 70)), to_tensor(photo(90, 64, seed=1))], p.preprocess)
    with torch.inference_mode():
        assert torch.allclose(p.forward(x), build_model(ckpt)(x), atol=1e-4)


def test_unknown_or_misplaced_runtime_fails_early():
    ckpt = tiny_checkpoint(1, 28)
    with pytest.raises(ValueError, match="tensorrt.*" + ".*".join(RUNTIMES)):
        ImagePipeline(ckpt, runtime="tensorrt")
    with pytest.raises(ValueError, match="CPU only"):
        prepare_runtime("int8", torch.nn.Identity(), ckpt["preprocess"], "cuda")
    with pytest.raises(ValueError, match="sha256"):
        prepare_runtime("onnx", torch.nn.Identity(), ckpt["preprocess"])
    with pytest.raises(ValueError, match="runtime_cache"):
        pipeline_options({"runtime_cache": 1})
    assert ImagePipeline(ckpt).runtime == "eager"  # the CPU default


@pytest.mark.parametrize("name, script", [("runtimes", "runtime_bench"), ("runtimes-artifacts", "artifact_bench")])
def test_every_figure_in_runtimes_md_is_generated_from_a_committed_json(name, script):
    """docs/runtimes.md's measurement blocks are exactly what their JSON files generate (no hand-typed figures)."""
    import importlib
    import json
    import re

    root = Path(__file__).resolve().parents[1]
    markdown = importlib.import_module(f"scripts.{script}").markdown
    block = re.search(f"<!-- {name}:begin -->\n(.*?)\n<!-- {name}:end -->", (root / "docs/runtimes.md").read_text(),
                      re.S)
    assert block, name
    if not (root / f"docs/{name}.json").is_file():
        assert block.group(1).startswith("(awaiting "), f"{name}: figures without their JSON"
        pytest.skip(f"awaits scripts/{script}.py --docs on a quiet machine")
    assert block.group(1) == markdown(json.loads((root / f"docs/{name}.json").read_text()))

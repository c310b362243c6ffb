"""Training recipes: YAML files in training/recipes/, validated into a dataclass (an unknown key is an error)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.presets import check_background

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
SEGMENTATION_DATASETS = ("moving_fmnist",)


HEAD_MODES = ("auto", "keep", "new")
FREEZE_POLICIES = ("none", "linear_probe", "layer4_head", "gradual")
AUTO_AUGMENTS = ("none", "trivial", "randaugment")
FOLDER_ONLY_KEYS = ("train_img_size", "crop_scale_min", "color_jitter", "auto_augment", "random_erasing", "decoder")


class RecipeError(ValueError):
    """A recipe that cannot be used as written."""


@dataclass
class Recipe:
    arch: str = "lenet5"                # a name from `python -m training zoo`
    task: str = "classification"        # classification | segmentation (per-pixel classes, dataset moving_fmnist)
    dataset: str = "fashion_mnist"      # fashion_mnist | cifar10 | imagefolder | moving_fmnist
    data_root: str | None = None        # None: the dataset's default location
    data_args: dict[str, Any] = field(default_factory=dict)  # moving_fmnist knobs: training.clips.ClipConfig
    img_size: int | None = None         # None: the dataset's natural size (28 FMNIST, 32 CIFAR, 224 folders)
    resize: int | None = None           # eval: shorter side resized to this before the center crop (None = img_size)
    model_args: dict[str, Any] = field(default_factory=dict)  # extra builder kwargs, e.g. {dropout: 0.1}
    background: list[int] | None = None  # RGB served transparent pixels go on; None: the dataset's (black for FMNIST)
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"              # sgd (nesterov) | adamw
    lr: float = 0.1                     # peak learning rate after warm-up
    momentum: float = 0.9
    weight_decay: float = 5e-4          # not applied to norm layers and biases
    warmup_epochs: float = 1.0          # linear warm-up, then cosine decay to zero
    label_smoothing: float = 0.0
    dice_weight: float = 0.0            # segmentation: weight of a soft Dice term next to the per-pixel cross-entropy
    mixup_alpha: float = 0.0            # 0 disables MixUp
    cutmix_alpha: float = 0.0           # 0 disables CutMix
    mix_prob: float = 1.0               # share of batches that get MixUp/CutMix
    crop_padding: int = 2               # in-memory datasets: random crop with this zero padding (0 = off)
    hflip: bool = True
    ema_decay: float = 0.0              # 0 disables the weight EMA; e.g. 0.999
    grad_clip: float = 0.0              # max grad norm; 0 disables
    amp: str = "auto"                   # auto (bf16 on CUDA) | bf16 | off
    channels_last: str = "auto"         # auto (on CUDA) | on | off
    val_fraction: float = 0.1
    limit: int | None = None            # cap each split (quick runs, tests)
    num_workers: int = 0                # DataLoader workers for folder datasets
    seed: int = 0
    threads: int | None = None          # CPU threads (None: torch default)
    # -- starting weights and fine-tuning (training/finetune.py) --
    init_from: str | None = None        # one of our checkpoints to start from (its EMA weights when it has them)
    pretrained_weights: str | None = None  # a torchvision-format state-dict file, e.g. resnet50-11ad3fa6.pth
    head: str = "auto"                  # auto (new head when the classes differ) | keep | new
    freeze: str = "none"                # none | linear_probe | layer4_head | gradual
    unfreeze_every: int = 1             # gradual: one more stage (from the top) trains every N epochs
    backbone_lr_factor: float = 1.0     # backbone LR = factor x head LR (e.g. 0.1 when fine-tuning)
    # -- folder datasets: per-image augmentation (training/presets.py) and decoding --
    train_img_size: int | None = None   # RandomResizedCrop output (None = img_size); e.g. 176 for 224 eval
    crop_scale_min: float = 0.35        # RandomResizedCrop area from crop_scale_min to 1 (ImageNet: 0.08)
    color_jitter: float = 0.3           # brightness/contrast/saturation strength (hue = strength / 6); 0 = off
    auto_augment: str = "none"          # none | trivial (TrivialAugmentWide) | randaugment (2 ops, magnitude 9)
    random_erasing: float = 0.0         # probability of erasing a random box (filled with the mean colour)
    interpolation: str = "bilinear"     # bilinear | bicubic, for training crops and the eval resize
    decoder: str = "pil"                # pil | torchvision (torchvision.io; other formats fall back to PIL)
    # -- data parallel (torchrun; training/distributed.py) --
    sync_bn: bool = False               # SyncBatchNorm across processes (CUDA only)
    # -- distillation (training/distill.py) and quantization-aware training (training/qat.py) --
    teacher: str | None = None          # checkpoint to distill from (same classes); None: no distillation
    distill: str = "auto"               # auto (hard for *_distilled students, else soft) | soft | hard
    kd_alpha: float = 0.5               # weight of the teacher's term; the labels' term gets 1 - kd_alpha
    kd_temperature: float = 4.0         # temperature of the soft targets (the KL term is scaled by T^2)
    kd_unlabeled: int = 0               # training images beyond `limit` with their labels hidden: only the
                                        # teacher's term learns from them (a transfer set; in-memory datasets)
    qat: bool = False                   # int8 quantization-aware training (pt2e, x86 quantizer); no EMA, fp32

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.optimizer in ("sgd", "adamw"), "optimizer must be sgd or adamw"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "mixup_alpha/cutmix_alpha must be >= 0"),
            (0 <= self.mix_prob <= 1, "mix_prob must be in [0, 1]"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)"),
            (self.amp in ("auto", "bf16", "off"), "amp must be auto, bf16 or off"),
            (self.channels_last in ("auto", "on", "off"), "channels_last must be auto, on or off"),
            (0 < self.val_fraction < 1, "val_fraction must be in (0, 1)"),
            (isinstance(self.model_args, dict), "model_args must be a mapping"),
            (isinstance(self.data_args, dict), "data_args must be a mapping"),
            (self.task in ("classification", "segmentation"), "task must be classification or segmentation"),
            ((self.task == "segmentation") == (self.dataset in SEGMENTATION_DATASETS),
             f"task segmentation goes with dataset {' or '.join(SEGMENTATION_DATASETS)}, and only it"),
            (self.dice_weight >= 0, "dice_weight must be >= 0"),
            (self.head in HEAD_MODES, f"head must be one of {', '.join(HEAD_MODES)}"),
            (self.freeze in FREEZE_POLICIES,
             f"unknown freeze policy {self.freeze!r}; choose one of: {', '.join(FREEZE_POLICIES)}"),
            (self.unfreeze_every >= 1, "unfreeze_every must be >= 1 (epochs)"),
            (self.backbone_lr_factor > 0, "backbone_lr_factor must be > 0 (freeze layers with `freeze` instead)"),
            (not (self.init_from and self.pretrained_weights), "give init_from or pretrained_weights, not both"),
            (self.train_img_size is None or self.train_img_size >= 8, "train_img_size must be >= 8"),
            (0 < self.crop_scale_min <= 1, "crop_scale_min must be in (0, 1]"),
            (self.color_jitter >= 0, "color_jitter must be >= 0"),
            (self.auto_augment in AUTO_AUGMENTS, f"auto_augment must be one of {', '.join(AUTO_AUGMENTS)}"),
            (0 <= self.random_erasing <= 1, "random_erasing must be in [0, 1]"),
            (self.interpolation in ("bilinear", "bicubic"), "interpolation must be bilinear or bicubic"),
            (self.decoder in ("pil", "torchvision"), "decoder must be pil or torchvision"),
            (self.distill in ("auto", "soft", "hard"), "distill must be auto, soft or hard"),
            (0 <= self.kd_alpha <= 1, "kd_alpha must be in [0, 1]"),
            (self.kd_temperature > 0, "kd_temperature must be > 0"),
            (self.kd_unlabeled >= 0, "kd_unlabeled must be >= 0"),
            (not self.kd_unlabeled or (self.teacher and self.limit), "kd_unlabeled (images only the teacher "
             "labels) needs a teacher and a limit: the labelled training images, the unlabelled ones after them"),
            (not self.kd_unlabeled or (self.mixup_alpha == 0 and self.cutmix_alpha == 0),
             "kd_unlabeled cannot mix images: MixUp/CutMix would blend a hidden label into a known one"),
            (not (self.qat and self.ema_decay > 0), "qat trains without a weight EMA: set ema_decay: 0 (the "
             "fake-quantised graph's observers have no average)"),
            (not (self.qat and self.amp == "bf16"), "qat trains in float32 (fake quantisation): set amp: off"),
            (not (self.qat and (self.freeze != "none" or self.backbone_lr_factor != 1.0)), "qat trains the whole "
             "fake-quantised graph: set freeze: none and backbone_lr_factor: 1"),
        ]
        if self.task == "segmentation":
            checks += [(self.mixup_alpha == 0 and self.cutmix_alpha == 0, "MixUp/CutMix are for classification")]
        else:
            checks += [(not self.data_args, "data_args are moving_fmnist's knobs"),
                       (self.dice_weight == 0, "dice_weight is for segmentation")]
        for ok, msg in checks:
            if not ok:
                raise RecipeError(msg)
        if self.task == "segmentation":
            from training.clips import ClipError, make_config

            try:
                make_config(self.data_args)
            except ClipError as e:
                raise RecipeError(str(e)) from None
        if self.background is not None:
            try:
                check_background(self.background)
            except ValueError as e:
                raise RecipeError(str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def folder_only_keys(self) -> list[str]:
        """Keys set away from their defaults that only folder datasets use (in-memory data is augmented in
        batches by presets.train_batch)."""
        return [k for k in FOLDER_ONLY_KEYS if getattr(self, k) != getattr(_DEFAULTS, k)]


_DEFAULTS = Recipe()


def _coerce(name: str, value: Any, default: Any) -> Any:
    """YAML types loosely checked against the field's default (ints accepted for floats)."""
    if value is None or default is None or isinstance(default, dict):
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RecipeError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool):
        pass
    elif isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    elif isinstance(default, int) and isinstance(value, int):
        return value
    if isinstance(default, str) and isinstance(value, str):
        return value
    raise RecipeError(f"{name} must be a {type(default).__name__}, got {value!r}")


def make_recipe(values: dict[str, Any], source: str = "recipe") -> Recipe:
    known = {f.name: f for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise RecipeError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(known)}")
    kwargs = {k: _coerce(k, v, getattr(_DEFAULTS, k)) for k, v in values.items()}
    try:
        return Recipe(**kwargs)
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None


def load_recipe(name_or_path: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """A recipe by name (training/recipes/<name>.yaml) or path, with CLI overrides applied on top."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise RecipeError(f"recipe not found: {name_or_path} (known recipes: {known})")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys to values")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return make_recipe(values, source=str(path))

"""Starting weights and freeze policies: fine-tuning a pretrained network on a small dataset.

Starting weights come from one of our checkpoints (`init_from`) or from a torchvision-format state-dict file
(`pretrained_weights`, e.g. `resnet50-11ad3fa6.pth`; our ResNet module names follow torchvision's). Every
tensor must fit the model except the classifier head, which is replaced by a freshly initialised one when the
classes differ (`head: auto`); anything else that does not fit is an error that lists what did not.

A segmentation model whose encoder is a registered classifier (`backbone_arch`, e.g. resnet18_seg's `backbone`
is a resnet18) also starts from a checkpoint of that classifier: its weights go into the encoder, its
classifier head is dropped and the segmentation head stays freshly initialised. When the classifier saw grey
images and the model takes RGB, the first conv's weights are repeated over the channels and divided by their
count (timm's adapt_input_conv), so a grey RGB image gives the features the grey original gave.

Freeze policies decide which stages train: `none`; `linear_probe` (the head only); `layer4_head` (the classic
recipe: ResNet stages up to layer3 frozen, layer4 and the head trained); `gradual` (the head first, then one
more stage from the top every `unfreeze_every` epochs). Frozen BatchNorm layers stay in eval mode, so their
running statistics keep the pretrained values. The backbone can train at `backbone_lr_factor` x the head LR.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from training.checkpoint import load_checkpoint
from training.recipe import Recipe

# torchvision's convention: <name>-<first hex digits of the file's sha256>.<ext>
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
_SHOW = 6  # names listed per kind of mismatch


class WeightsError(ValueError):
    """Starting weights that are missing, unreadable or do not fit the model; the message lists what did not."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def head_name(model: nn.Module) -> str:
    """The classifier head: the model's last nn.Linear (ResNet `fc`, ViT `head`, LeNet `classifier.7`), or the
    module a model names in `head_module` (segmentation models: their `head`, a stack of convs)."""
    if named := getattr(model, "head_module", None):
        return named
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise WeightsError(f"{type(model).__name__} has no linear classifier head")
    return linear[-1]


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256) of a torchvision-format weights file, loaded weights-only. Also accepted: the
    {"model": ...} of torchvision's reference-script checkpoints, a {"state_dict": ...} wrapper, and the
    "module." prefix of a state dict saved from DistributedDataParallel."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    digest = sha256_of(path)
    named = _HASH_IN_NAME.search(path.name)
    if named and not digest.startswith(prefix := named.group(1)):
        raise WeightsError(f"{path}: the name says sha256 {prefix}..., the file's is {digest[:len(prefix)]}...: "
                           "the file is damaged or not the one its name says")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(f"refusing {path}: it holds pickled code, not plain tensors (weights-only load)") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightsError(f"cannot read weights file {path}: {str(e).splitlines()[0]}") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    return state, digest


def _check_fit(what: str, own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
               skip: set[str], source: str) -> None:
    """Every tensor of `own` but `skip` is in `state` with its shape, and `state` has nothing else; or an error
    that lists what did not fit. A skipped (replaced) tensor may differ in its first dimension only."""
    # Files saved before PyTorch 0.4.1 lack BatchNorm's step counter; torch loads them without it too.
    missing = [k for k in own if k not in state and k not in skip and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape
             and not (k in skip and state[k].shape[1:] == own[k].shape[1:])]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {kind} ({', '.join(v[:_SHOW])}{', ...' if len(v) > _SHOW else ''})"
                 for kind, v in (("missing", missing), ("unexpected", unexpected),
                                 ("with another shape (file vs model)", wrong)) if v]
        raise WeightsError(f"{source} does not fit this {what}: {'; '.join(parts)}. Are they "
                           "weights for another architecture or input size (up to 64 px our ResNets use a 3x3 "
                           "stem; torchvision's 7x7 stem needs img_size > 64)?")


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, head: str = "auto",
                 classes_differ: bool = False) -> dict[str, Any]:
    """Copy `state` into `model`. The head is kept when it fits (and, under head=auto, the classes are the
    same), else left freshly initialised; every other tensor must match by name and shape."""
    own = model.state_dict()
    prefix = head_name(model) + "."
    head_keys = [k for k in own if k.startswith(prefix)]
    head_fits = all(k in state and state[k].shape == own[k].shape for k in head_keys)
    new_head = head == "new" or (head == "auto" and (classes_differ or not head_fits))
    if head == "keep" and not head_fits:
        out = [k for k in head_keys if k.endswith("weight")][-1]  # the class layer: a Linear or a 1x1 conv
        theirs = state.get(out)
        got = f"a {theirs.shape[0]}-class head" if theirs is not None else "no head"
        raise WeightsError(f"head/class mismatch: {source} has {got} ({out}), the model has "
                           f"{own[out].shape[0]} classes; use head: auto or new to train a new head")
    # A replaced head may differ in its class count only; a different input width means another architecture.
    skip = set(head_keys) if new_head else set()
    _check_fit(type(model).__name__, own, state, skip, source)
    model.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=False)
    return {"source": source, "tensors": len(own) - len(skip), "head": "new" if new_head else "loaded"}


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A first conv's weights (out, 1, k, k) for `in_channels` inputs: repeated and divided by the count, so an
    image whose channels are all equal gives the output the one-channel original gave (timm's adapt_input_conv)."""
    if weight.shape[1] != 1:
        raise WeightsError(f"only a one-channel first conv can be adapted, this one takes {weight.shape[1]}")
    return weight.repeat(1, in_channels, 1, 1) / in_channels


def load_backbone(model: nn.Module, ckpt: Mapping[str, Any], state: Mapping[str, torch.Tensor], *, source: str,
                  head: str = "auto") -> dict[str, Any]:
    """A classifier checkpoint of the model's `backbone_arch` into its `backbone`: the classifier's head is
    dropped (the model's own head stays freshly initialised), a grey first conv is adapted to the model's input
    channels; every other tensor must fit (else the error lists what did not)."""
    if head == "keep":
        raise WeightsError(f"head: keep needs a {type(model).__name__} checkpoint; {source} holds a "
                           f"{ckpt['arch']} classifier, whose head cannot be kept: use head: auto or new")
    from training.models import get_model

    classifier_head = head_name(get_model(ckpt["arch"], **ckpt["model_args"])) + "."
    backbone = model.backbone
    own = backbone.state_dict()
    theirs = {k: v for k, v in state.items() if not k.startswith(classifier_head)}
    adapted = []
    first = next(name for name, m in backbone.named_modules() if isinstance(m, nn.Conv2d)) + ".weight"
    want, got = own[first].shape[1], theirs[first].shape[1] if first in theirs else None
    if got == 1 and want != 1 and theirs[first].shape[2:] == own[first].shape[2:]:
        theirs[first] = adapt_input_conv(theirs[first], want)
        adapted.append(f"{first} 1 -> {want} channels")
    _check_fit(f"{type(model).__name__}'s backbone", own, theirs, set(), source)
    backbone.load_state_dict(theirs, strict=False)
    return {"source": source, "tensors": len(own), "head": "new", "backbone": ckpt["arch"], "adapted": adapted}


def init_weights(model: nn.Module, recipe: Recipe, classes: list[str]) -> dict[str, Any] | None:
    """Apply the recipe's starting weights, if any; returns what was loaded (for the checkpoint and the log)."""
    if recipe.freeze != "none" and not (recipe.init_from or recipe.pretrained_weights):
        raise WeightsError(f"freeze: {recipe.freeze} keeps layers at their starting weights: give them with "
                           "--pretrained-weights FILE (torchvision format) or --init-from CHECKPOINT")
    if recipe.pretrained_weights:
        state, digest = read_state_dict(recipe.pretrained_weights)
        report = load_weights(model, state, source=recipe.pretrained_weights, head=recipe.head)
        return {**report, "sha256": digest}
    if recipe.init_from:
        try:
            ckpt = load_checkpoint(recipe.init_from)
        except ValueError as e:
            raise WeightsError(f"init_from: {e}") from None
        state = ckpt.get("ema_state_dict") or ckpt["state_dict"]
        backbone_arch = getattr(model, "backbone_arch", None)
        if ckpt["arch"] != recipe.arch and ckpt["arch"] == backbone_arch:
            report = load_backbone(model, ckpt, state, source=recipe.init_from, head=recipe.head)
            return {**report, "sha256": sha256_of(Path(recipe.init_from)), "classes": list(ckpt["classes"])}
        if ckpt["arch"] != recipe.arch:
            also = f", or a {backbone_arch} classifier for its backbone" if backbone_arch else ""
            raise WeightsError(f"{recipe.init_from} holds a {ckpt['arch']}, the recipe trains a {recipe.arch} "
                               f"(set arch: {ckpt['arch']} or start from other weights{also})")
        report = load_weights(model, state, source=recipe.init_from, head=recipe.head,
                              classes_differ=list(ckpt["classes"]) != list(classes))
        return {**report, "sha256": sha256_of(Path(recipe.init_from)), "classes": list(ckpt["classes"])}
    return None


# ---- freeze policies ----

def backbone_stages(model: nn.Module) -> list[list[str]]:
    """A ResNet's backbone stages, input to output, as module-name prefixes: the stem, layer1..layer4 (with
    anything else that has parameters, e.g. a non-local block, riding on layer4). Empty for other models."""
    names = list(getattr(model, "stage_names", None) or [])
    if not names:
        return []
    head = head_name(model)
    top = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    top += [n for n, _ in model.named_parameters(recurse=False)]
    extra = [n for n in top if n not in names and n not in ("conv1", "bn1", head)]
    return [["conv1", "bn1"], *[[n] for n in names[:-1]], [names[-1], *extra]]


class FreezePolicy:
    """Which parameters train in a given epoch; `start_epoch` also puts frozen BatchNorm layers in eval mode."""

    def __init__(self, model: nn.Module, policy: str = "none", unfreeze_every: int = 1):
        self.policy, self.unfreeze_every = policy, unfreeze_every
        self.head = head_name(model) if policy != "none" else ""  # a QAT graph has no head module
        self.stages = backbone_stages(model)
        if policy in ("layer4_head", "gradual") and not self.stages:
            raise WeightsError(f"freeze policy {policy} needs a ResNet (stages layer1..layer4); "
                               f"{type(model).__name__} supports none and linear_probe")
        self._state: tuple[str, ...] | None = None

    def trainable(self, epoch: int) -> tuple[str, ...]:
        """Module-name prefixes that train in `epoch` (0-based); ("",) means everything."""
        if self.policy == "none":
            return ("",)
        n_backbone = {"linear_probe": 0, "layer4_head": 1}.get(self.policy, epoch // self.unfreeze_every)
        if n_backbone >= len(self.stages) > 0:
            return ("",)
        return (self.head, *(p for stage in self.stages[len(self.stages) - n_backbone:] for p in stage))

    def start_epoch(self, model: nn.Module, epoch: int) -> bool:
        """model.train() with this epoch's parameters trainable and frozen BN in eval mode. True when the set
        of trainable parameters changed (a DistributedDataParallel wrapper must then be rebuilt)."""
        live = self.trainable(epoch)
        changed = live != self._state
        if changed:
            for name, p in model.named_parameters():
                p.requires_grad_(any(not pre or name == pre or name.startswith(pre + ".") for pre in live))
            self._state = live
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None \
                    and not m.weight.requires_grad:
                m.eval()  # running statistics stay the pretrained ones
        return changed


    def copy_frozen_bn(self, model: nn.Module, other: nn.Module) -> None:
        """Copy the statistics of `model`'s frozen BatchNorm layers into the same layers of `other` (an EMA copy
        whose statistics were recomputed on the training data): frozen layers keep the pretrained ones."""
        mine = dict(other.named_modules())
        with torch.no_grad():
            for name, m in model.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None \
                        and not m.weight.requires_grad:
                    for a, b in zip(mine[name].buffers(), m.buffers()):
                        a.copy_(b)


def param_groups(model: nn.Module, weight_decay: float, lr: float, backbone_lr_factor: float = 1.0,
                 include_frozen: bool = False) -> list[dict[str, Any]]:
    """Optimizer groups: no weight decay on biases, norm weights, tokens and position embeddings (1-D or
    tiny params); with backbone_lr_factor != 1 the backbone and the head get their own groups and LRs.
    `include_frozen` adds frozen parameters too (gradual unfreezing: they get gradients later)."""
    split = backbone_lr_factor != 1.0
    head = head_name(model) + "." if split else ""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad or include_frozen:
            decay = not (p.ndim <= 1 or p.shape[0] == 1)
            groups.setdefault((split and not name.startswith(head), decay), []).append(p)
    out = []
    for backbone in ((True, False) if split else (False,)):
        for decay in (True, False):
            out.append({"params": groups.get((backbone, decay), []), "weight_decay": weight_decay if decay else 0.0,
                        "lr": lr * (backbone_lr_factor if backbone else 1.0)})
    return out

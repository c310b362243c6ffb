"""Image classification on the shared flow: images in (handlers/request.py's grammar), top-k labels out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from handlers.errors import BadInput
from handlers.options import check_options
from handlers.pipeline import Job, Pipeline, Unit
from handlers.request import parse_request
from training.presets import eval_batch


class ImagePipeline(Pipeline):
    """Classification: `{"predictions": [{"label", "index", "probability"}, ...]}` per image; several images are
    answered as `{"results": [{"predictions": ...}, ...]}`, KServe v1 instances as `{"predictions": [[...], ...]}`."""

    OPTIONS = {**Pipeline.OPTIONS, "topk": int, "max_images_per_request": int}

    def __init__(self, ckpt: dict[str, Any], device: str | torch.device = "cpu", *, topk: int = 5,
                 max_images_per_request: int = 64, **options: Any):
        super().__init__(ckpt, device, **options)
        self.topk = max(1, min(int(topk), len(self.classes)))  # a default above the class count is clamped
        self.max_images_per_request = max_images_per_request

    def parse(self, item: Any) -> Job:
        p = parse_request(item, self.max_images_per_request, self.limits.max_bytes)
        return Job(p.images, {"topk": self._topk(p.topk), "multi": p.multi, "instances": p.instances})

    def unit_error(self, job: Job, index: int, error: BadInput) -> BadInput:
        name = "instances" if job.options["instances"] else "images"
        where = f"{name}[{index}]: " if job.options["multi"] else ""
        return BadInput(error.status, error.type, where + error.message)

    def postprocess(self, logits: torch.Tensor, units: Sequence[Unit]) -> list[Any]:
        k = max(u.job.options["topk"] for u in units)
        probs, idx = torch.softmax(logits, dim=1).topk(k, dim=1)
        probs, idx = probs.cpu().tolist(), idx.cpu().tolist()
        return [[{"label": self.classes[c], "index": c, "probability": p}
                 for p, c in zip(probs[n][:u.job.options["topk"]], idx[n][:u.job.options["topk"]])]
                for n, u in enumerate(units)]

    def answer(self, job: Job) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model_name, "version": self.model_version}
        if job.options["instances"]:  # KServe v1: one prediction (here: the top-k list) per instance
            body["predictions"] = job.results
        elif job.options["multi"]:
            body["results"] = [{"predictions": p} for p in job.results]
        else:
            body["predictions"] = job.results[0]
        return body

    @torch.inference_mode()
    def predict(self, images: Sequence[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded uint8 images -> (top-k probabilities, top-k class indices), both (N, k) on CPU."""
        probs, idx = [], []
        for start in range(0, len(images), self.max_batch):
            x = eval_batch(images[start:start + self.max_batch], self.preprocess, device=self.device)
            p, i = torch.softmax(self.forward(x), dim=1).topk(k, dim=1)
            probs.append(p.cpu())
            idx.append(i.cpu())
        return torch.cat(probs), torch.cat(idx)

    def _topk(self, topk: Any) -> int:
        if topk is None:
            return self.topk
        n = len(self.classes)
        if isinstance(topk, str) and topk.strip().isdigit():
            topk = int(topk)
        if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= n:
            raise BadInput(400, "InvalidTopK", f"topk must be an integer from 1 to {n}, got {topk!r}")
        return topk

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "topk": self.topk, "max_images_per_request": self.max_images_per_request}


OPTIONS = ImagePipeline.OPTIONS


def pipeline_options(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate the image handler's options mapping (see `check_options`)."""
    return check_options(cfg, OPTIONS)

# Stable entry points; each target is a thin wrapper over a Python CLI.
#   make demo   fresh machine: set up, train + evaluate the demo model, archive, serve, predict
#   make test   set up, then the whole test suite (unit + integration against a real TorchServe)
SHELL := /bin/bash
PY := .venv/bin/python
MODEL ?= fmnist-lenet5
VERSION ?= 1.0
ARCH ?= lenet5
DATASET ?= fashion_mnist
EPOCHS ?=
RECIPE ?= default
CKPT ?= checkpoints/$(ARCH)-$(DATASET).pt
IMAGES ?= reports/samples
WORKERS ?= 1
SERVE_MODELS ?= fmnist-lenet5
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup demo demo-video train eval zoo samples experiment-depth experiment-attention experiment-transfer experiment-transfer-lr bench-loader clips seg-speed \
        archive serve stop predict models describe register scale set-default unregister rollout rollback metrics \
        test lint load-test bench bench-video reliability clean fleet-up fleet-down fleet-status fleet-rollout \
        fleet-canary fleet-promote fleet-rollback manifests reliability-fleet \
        experiment-kd experiment-qat search model-report

setup:
	@bash scripts/setup.sh

train: setup
	$(PY) -m training train --recipe $(RECIPE) --arch $(ARCH) --dataset $(DATASET) \
	  $(if $(EPOCHS),--epochs $(EPOCHS)) --out $(CKPT)

eval: setup
	$(PY) -m training eval --checkpoint $(CKPT)

zoo: setup
	$(PY) -m training zoo

samples: setup
	$(PY) -m training samples --out-dir $(IMAGES)

# Resumable experiments (rerun to continue); the figures go to reports/ and, when finished, docs/training.md.
# Arguments: EXPERIMENT_ARGS, e.g. "--recipe depth_gpu --gradnorm-every 20" or "--seeds 0 1 2".
experiment-depth: setup
	$(PY) -m training experiment-depth --docs $(EXPERIMENT_ARGS)

experiment-attention: setup
	$(PY) -m training experiment-attention --latency --docs $(EXPERIMENT_ARGS)

# Moving Fashion-MNIST test clips (H.264 MP4 + ground truth) for the video pipeline and benchmarks.
CLIPS_DIR ?= data/clips
clips: setup
	$(PY) -m training clips --out-dir $(CLIPS_DIR) --n 8 --split test

# Segmentation speeds (bare forward at batch 8, clip generator, training step) -> docs/seg_speed.json.
seg-speed: setup
	$(PY) scripts/seg_speed.py

# Pretrain on Fashion-MNIST 0-4, fine-tune on 5-9 four ways (resumable; figures into docs/training.md) and
# write the checkpoint archive_configs/fmnist-transfer-resnet50 serves.
experiment-transfer: setup
	$(PY) -m training experiment-transfer --docs docs --checkpoint-out checkpoints/resnet50-fmnist-transfer.pt

# The transfer experiment's learning-rate grid at 10 images per class, picked on the val images (reuses the
# --full pretraining and runs; figures into docs/training.md).
experiment-transfer-lr: setup
	$(PY) -m training experiment-transfer --full --lr-grid --docs docs

# Loader images/s on a synthetic ImageNet-layout tree (PIL vs torchvision.io, workers); run on a quiet machine.
bench-loader: setup
	$(PY) -m training.loader_bench --docs docs

# Efficiency (docs/efficiency.md, docs/model-selection.md). Long runs are resumable; measure latency on a quiet machine.
experiment-kd: setup
	$(PY) -m training experiment-kd $(KD_ARGS)

experiment-qat: setup
	$(PY) -m training experiment-qat $(QAT_ARGS)

# A few minutes here; longer: make search SEARCH_ARGS="--trials 60 --timeout-s 3600 --limit 10000 --epochs 3"
search: setup
	$(PY) -m training search --docs docs --recipe training/recipes/searched_fmnist.yaml $(SEARCH_ARGS)

model-report: setup
	$(PY) -m training select $(SELECT_ARGS)

# An archived name+version is immutable: ARCHIVE_ARGS=--replace rebuilds one from changed inputs (recorded).
archive: setup
	$(PY) -m serving archive --all $(ARCHIVE_ARGS)

serve: setup
	$(PY) -m serving serve --models $(SERVE_MODELS)

stop:
	@if [ -x $(PY) ]; then $(PY) -m serving stop; else echo "nothing to stop"; fi

predict: setup
	$(PY) -m serving predict --model $(MODEL) $(IMAGES)/*.png

models:
	$(PY) -m serving models

metrics:
	$(PY) -m serving metrics --grep ts_inference

describe:
	$(PY) -m serving describe $(MODEL) $(VERSION)

register:
	$(PY) -m serving register $(MODEL) $(VERSION) --min-workers $(WORKERS)

scale:
	$(PY) -m serving scale $(MODEL) $(VERSION) --min-workers $(WORKERS)

set-default:
	$(PY) -m serving set-default $(MODEL) $(VERSION)

unregister:
	$(PY) -m serving unregister $(MODEL) $(VERSION)

rollout:
	$(PY) -m serving rollout $(MODEL) $(VERSION)

rollback:
	$(PY) -m serving rollback $(MODEL)

demo: setup
	$(PY) -m training train --recipe default --out checkpoints/lenet5-fashion_mnist.pt
	$(PY) -m training eval --checkpoint checkpoints/lenet5-fashion_mnist.pt
	$(PY) -m training samples --out-dir $(IMAGES)
	@# each demo trains new weights: its two versions are rebuilt (--replace, recorded in model_store/index.json)
	$(PY) -m serving archive --replace --config archive_configs/fmnist-lenet5/1.0.yaml \
	  --config archive_configs/fmnist-lenet5/2.0.yaml
	$(PY) -m serving serve --models fmnist-lenet5:1.0
	$(PY) -m serving predict --model fmnist-lenet5 $(IMAGES)/*.png
	@$(PY) -m serving howto --model fmnist-lenet5

# Video: the ViT-Tiny segmentation model on a moving Fashion-MNIST clip, served, answered frame by frame (streamed)
# and written back with masks and boxes drawn in. Uses VIDEO_CKPT when it exists, else trains the quick recipe there.
VIDEO_MODEL ?= fmnist-video-seg-vit-tiny
VIDEO_CKPT ?= checkpoints/vit_seg_tiny-moving_fmnist.pt
VIDEO_RECIPE ?= vit_seg_tiny_moving_fmnist_quick
demo-video: setup
	@test -f $(VIDEO_CKPT) || $(PY) -m training train --recipe $(VIDEO_RECIPE) --out $(VIDEO_CKPT)
	$(PY) -m training clips --out-dir reports/demo-video --n 1 --frames 90 --seed 7
	$(PY) -m serving archive --config archive_configs/$(VIDEO_MODEL)/1.0.yaml
	@if ! $(PY) -m serving models >/dev/null 2>&1; then $(PY) -m serving serve --models $(VIDEO_MODEL):1.0; \
	  elif ! $(PY) -m serving describe $(VIDEO_MODEL) 1.0 >/dev/null 2>&1; then \
	  $(PY) -m serving register $(VIDEO_MODEL) 1.0; fi
	$(PY) -m serving predict-video reports/demo-video/test-00007.mp4 --model $(VIDEO_MODEL) \
	  --out reports/demo-video/annotated.mp4
	@echo "annotated clip: reports/demo-video/annotated.mp4 (make stop stops TorchServe)"

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check .

load-test: LOAD_USERS ?= 16
load-test: LOAD_TIME ?= 30s
load-test: LOAD_SHAPE ?= steady
load-test: HOST ?= http://127.0.0.1:8080
load-test: TOKEN_FILE ?= .runtime/key_file.json
load-test: setup
	@mkdir -p reports/load
	$(PY) -m locust -f load_tests/locustfile.py --headless -u $(LOAD_USERS) -r $(LOAD_USERS) -t $(LOAD_TIME) \
	  --shape $(LOAD_SHAPE) --host $(HOST) --model $(MODEL) $(if $(MODEL_VERSION),--model-version $(MODEL_VERSION)) \
	  --images '$(IMAGES)' --token-file $(TOKEN_FILE) \
	  --csv reports/load/$(MODEL)-$(LOAD_SHAPE) --html reports/load/$(MODEL)-$(LOAD_SHAPE).html

bench: setup
	$(PY) -m load_tests.bench $(BENCH_ARGS)

# Video end to end: a clip in-process, clip requests and 30 FPS camera streams through TorchServe, the per-frame
# client loop as the baseline, py-spy profiles; ~6 min. Rewrites docs/video_bench.json, .png and its docs/video.md block.
bench-video: setup
	$(PY) -m load_tests.video_bench $(BENCH_VIDEO_ARGS)

# Faults under load (worker kill, rollout/rollback, snapshot restart) + a soak; figures go to reports/reliability/
# and docs/reliability.md. Shorter: make reliability SOAK_S=60 FAULT_S=20 (SOAK_S=0: no soak).
reliability: SOAK_S ?= 600
reliability: FAULT_S ?= 30
reliability: setup
	$(PY) -m load_tests.reliability --soak-duration $(SOAK_S) --fault-seconds $(FAULT_S) $(RELIABILITY_ARGS)

# A local fleet: FLEET_NODES TorchServe nodes behind HAProxy on 127.0.0.1:8090 (docs/fleet.md).
fleet-up: FLEET_NODES ?= 2
fleet-up: setup
	$(PY) -m serving fleet up --nodes $(FLEET_NODES) --models $(SERVE_MODELS)

fleet-down:
	@if [ -x $(PY) ]; then $(PY) -m serving fleet down; else echo "nothing to stop"; fi

fleet-status:
	$(PY) -m serving fleet status

fleet-rollout:
	$(PY) -m serving fleet rollout $(MODEL) $(VERSION)

fleet-canary: PERCENT ?= 10
fleet-canary:
	$(PY) -m serving fleet canary $(MODEL) $(VERSION) --percent $(PERCENT)

fleet-promote:
	$(PY) -m serving fleet promote $(MODEL)

fleet-rollback:
	$(PY) -m serving fleet rollback $(MODEL)

# Kubernetes manifests (deploy/) from the archive configs.
manifests: setup
	$(PY) -m serving manifests

# Fleet operations and node faults under load through HAProxy, plus 1/2/3-node throughput; figures go to
# docs/fleet.md and docs/fleet-reliability.json. Measure on a quiet machine.
reliability-fleet: setup
	$(PY) -m load_tests.fleet_reliability $(RELIABILITY_FLEET_ARGS)

clean:
	rm -rf reports runs .pytest_cache .ruff_cache

"""Data-parallel training under torchrun with gloo on CPU: two processes sharing each global batch follow the
loss curve of one process, resume included; a dataset that only one node can read stops every process with
one message. Sharding itself (which samples each process sees) is tested without processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.datagen import write_imagefolder
from tests.torchserve import free_ports
from training.data import ShardedBatchSampler, TensorLoader, TensorSplit, shard_bounds
from training.recipe import make_recipe
from training.train import train

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
RUN = [sys.executable, "-m", "torch.distributed.run"]
# No BatchNorm in simple_cnn, so the only difference between 1 x 64 and 2 x 32 images per step is the order
# of float additions: measured 2e-5 on the weights, 1e-7 on the losses.
RECIPE = dict(arch="simple_cnn", dataset="fashion_mnist", epochs=2, batch_size=64, optimizer="adamw", lr=3e-3,
              weight_decay=0.0, warmup_epochs=0.1, limit=512, crop_padding=0, hflip=False, threads=1)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_shards_of_each_global_batch_add_up_to_one_process_batches():
    n, batch, world = 23, 8, 2
    single = list(shard_bounds(n, batch, drop_last=False))
    shards = [list(shard_bounds(n, batch, drop_last=False, rank=r, world_size=world)) for r in range(world)]
    for (lo, hi), parts in zip(single, zip(*shards)):
        assert parts[0][0] == lo and parts[-1][1] == hi and parts[0][1] == parts[1][0]  # contiguous, in order
    split = TensorSplit(torch.zeros(n, 1, 1, 1, dtype=torch.uint8), torch.arange(n))
    one = [y.tolist() for _, y in TensorLoader(split, batch, shuffle=True, seed=3)]
    two = [[y.tolist() for _, y in TensorLoader(split, batch, shuffle=True, seed=3, rank=r, world_size=world)]
           for r in range(world)]
    assert [a + b for a, b in zip(*two)] == one
    folder = [list(ShardedBatchSampler(n, batch, shuffle=True, drop_last=False, seed=3, rank=r, world_size=world))
              for r in range(world)]
    assert folder == two  # folders and tensors share one order


@pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")
def test_two_gloo_processes_follow_the_one_process_loss_curve(tmp_path):
    threads = torch.get_num_threads()
    try:
        single = train(make_recipe(RECIPE), tmp_path / "one.pt", progress=False)
    finally:
        torch.set_num_threads(threads)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(RECIPE))
    common = [*RUN, "--standalone", "--nproc_per_node", "2", "-m", "training", "train", "--recipe",
              str(tmp_path / "r.yaml"), "--out", str(tmp_path / "two.pt"), "--no-tensorboard"]
    outs = []
    for extra in (["--stop-after-epoch", "1"], ["--resume", str(tmp_path / "two.pt")]):  # stop, then resume
        p = subprocess.run([*common, *extra], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        outs.append(p.stdout)
    assert [o.count("epoch ") for o in outs] == [1, 1]  # only rank 0 prints
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert two["metrics"]["processes"] == 2 and two["epoch"] == 2
    for a, b in zip(two["metrics"]["history"], single["metrics"]["history"]):
        for key in ("train_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
        assert a["val_acc"] == b["val_acc"]
    assert two["metrics"]["test_acc"] == single["metrics"]["test_acc"]
    for k, v in single["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][k], v, rtol=1e-3, atol=2e-4)
    assert not list(tmp_path.glob(".two.pt.*"))  # atomic writes leave no temporary files


def test_a_dataset_only_one_node_can_see_stops_every_process_with_one_message(tmp_path):
    """Two single-process 'nodes' joined by torchrun's static rendezvous (--nnodes/--node_rank/--master_*),
    each in its own working directory; the relative --data-root exists on node 0 only."""
    write_imagefolder(tmp_path / "node0" / "flowers", per_class=4, size=(36, 36))
    (tmp_path / "node1").mkdir()
    port = free_ports(1)[0]
    procs = [subprocess.Popen(
        [*RUN, "--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
         "--master_port", str(port), "-m", "training", "train", "--arch", "resnet18", "--dataset", "imagefolder",
         "--data-root", "flowers", "--img-size", "32", "--epochs", "1", "--batch-size", "4", "--no-tensorboard",
         "--out", "x.pt"], cwd=tmp_path / f"node{n}", env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for n in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    errors = [line for _, err in results for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, results
    assert errors[0].startswith("error: the dataset is not the same in every process")
    assert "rank 0 (" in errors[0] and "imagefolder, 3 classes, 12 train" in errors[0]
    assert "rank 1 (" in errors[0] and "failed: DatasetError: imagefolder root flowers does not exist" in errors[0]
    assert not list(tmp_path.glob("node*/x.pt"))

"""`pip install .` installs the project: its packages, data files, dependencies (requirements.txt, one list) and
console scripts; `python -m training --help` answers without importing torch and lists what can be trained."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.torchserve import ROOT, free_ports, tiny_checkpoint

SOURCES = ("pyproject.toml", "requirements.txt", "README.md", "training", "handlers", "serving", "load_tests",
           "archive_configs")
PACKAGES = ("training", "handlers", "serving", "load_tests")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from a copy of the sources (the checkout stays clean), installed into its own folder."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = (tmp / "dist").glob("*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    work = tmp / "work"  # a user's directory: no checkout, no archive_configs
    work.mkdir()
    return wheel, tmp / "site", work


def _run(site: Path, work: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_carries_every_package_its_data_and_the_one_dependency_list(installed):
    wheel, _, _ = installed
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith("/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith("/entry_points.txt"))).decode()
    for package in PACKAGES:
        for init in (ROOT / package).rglob("__init__.py"):
            assert str(init.relative_to(ROOT)) in names, init
    assert {f"training/recipes/{p.name}" for p in (ROOT / "training" / "recipes").glob("*.yaml")} <= names
    assert "serving/templates/config.properties.template" in names
    wanted = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert [line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist: ")] == wanted
    assert "vision-train = training.cli:main" in entry_points and "vision-serve = serving.cli:main" in entry_points


def test_installed_console_scripts_work_outside_the_checkout(installed, tmp_path):
    _, site, work = installed
    r = _run(site, work, str(site / "bin" / "vision-train"), "--help")
    assert r.returncode == 0, r.stderr
    assert "architectures (--arch):" in r.stdout and "resnet18" in r.stdout and "default" in r.stdout
    # The installed serving package archives from its own code and renders TorchServe's config from the
    # template it carries, in a directory with no archive_configs/.
    ckpt = tiny_checkpoint(work / "tiny.pt")
    (work / "tiny").mkdir()
    (work / "tiny" / "1.0.yaml").write_text(
        f"name: tiny\nversion: '1.0'\ncheckpoint: {ckpt}\nruntime: eager\ntorchserve: {{batchSize: 1, "
        "maxBatchDelay: 0, minWorkers: 1, maxWorkers: 1, responseTimeout: 30, deviceType: cpu}\n")
    r = _run(site, work, str(site / "bin" / "vision-serve"), "archive", "--config", "tiny/1.0.yaml", "--store",
             "store")
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(work / "store" / "tiny-1.0.mar") as z:
        assert "handlers/pipeline.py" in z.namelist() and "classifier.py" in z.namelist()
    code = ("import serving.server as s, pathlib; p = s.render_config(pathlib.Path('rt'), pathlib.Path('store')); "
            "print(s.__file__); print(p.read_text())")
    r = _run(site, work, sys.executable, "-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(site)) and "inference_address=http://127.0.0.1:8080" in r.stdout


def test_training_help_is_fast_and_lists_architectures_and_recipes():
    from training.catalog import architectures, recipes
    from training.models import list_models

    assert architectures() == list_models()  # the catalog reads the registry's own decorators
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "training", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    imported = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "numpy" not in imported
    assert ", ".join(list_models())[:60] in " ".join(r.stdout.split())
    assert all(name in r.stdout for name in recipes())


def test_the_pod_helpers_run_from_the_installed_package(installed, tiny_store):
    """deploy/Dockerfile installs the project this way; the init container and the probes run `python -m
    serving.pod` from it, outside any checkout."""
    _, site, work = installed
    r = _run(site, work, sys.executable, "-m", "serving.pod", "stage", "--store", str(tiny_store), "--dest",
             str(work / "models"), "tiny:1.0")
    assert r.returncode == 0 and "staged" in r.stdout, r.stderr
    r = _run(site, work, sys.executable, "-m", "serving.pod", "stage", "--store", str(tiny_store), "--dest",
             str(work / "models"), "tiny:9.9")
    assert r.returncode == 1 and r.stderr.startswith("error: tiny 9.9 is not in") and "Traceback" not in r.stderr
    config = work / "pod.properties"
    config.write_text(f"inference_address=http://0.0.0.0:{free_ports(1)[0]}\ndisable_token_authorization=true\n")
    r = _run(site, work, sys.executable, "-m", "serving.pod", "probe", "live", "--config", str(config))
    assert r.returncode == 1 and "TorchServe does not answer" in r.stderr  # nothing listens there
    r = _run(site, work, sys.executable, "-c", "import serving.haproxy as h; print(h.TEMPLATE.read_text()[:40])")
    assert r.returncode == 0 and r.stdout.startswith("# HAProxy"), r.stderr  # the fleet's template is packed too

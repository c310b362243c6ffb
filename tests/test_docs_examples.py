"""README.md and docs/serving.md stay true: their examples run against a real TorchServe (the session's), the
commands that build or start things parse, and `howto` prints commands that work (rules: tests/doc_examples.py)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import requests

from tests.doc_examples import (
    ROOT,
    check_parsed,
    makefile_targets,
    output_matches,
    read_blocks,
    run_commands,
    substitute,
)
from tests.torchserve import gray_png, metric

SERVED_DOCS = ("README.md", "docs/serving.md")
DOCS = (*SERVED_DOCS, "docs/training.md")
MODEL = "tiny"  # the session server's model, in place of the demo's fmnist-lenet5 (same versions: 1.0, 2.0)


def test_commands_that_build_train_or_start_things_parse():
    targets, checked = makefile_targets(), 0
    for doc in DOCS:
        for block in read_blocks(ROOT / doc):
            for cmd in block.commands:
                if cmd.kind == "parse":
                    check_parsed(cmd, targets)
                    checked += 1
    assert checked >= 20


@pytest.fixture
def samples(tmp_path):
    """The demo's sample images (reports/samples/) for the tiny model: Fashion-MNIST-like 28x28 PNGs."""
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, name in enumerate(("0000_ankle-boot", "0001_pullover", "0002_trouser")):
        (folder / f"{name}.png").write_bytes(gray_png(seed=i))
    return folder


def _answers_counted(ts) -> None:
    """One answer, and wait until the frontend shows the handler's counter (it reads worker metrics
    asynchronously), so a documented `grep handler_answers_total` has a line to find."""
    r = ts.infer.post(f"{ts.inference_url}/predictions/{MODEL}/1.0", data=gray_png(), timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while not metric(requests.get(f"{ts.metrics_url}/metrics", timeout=10).text, "handler_answers_total",
                     ModelName=MODEL, ModelVersion="1.0", Status="200"):
        assert time.monotonic() < deadline, "handler_answers_total never appeared"
        time.sleep(0.3)


@pytest.mark.parametrize("doc", SERVED_DOCS)
def test_doc_examples_run_against_a_real_torchserve(doc, torchserve, samples):
    ts, client = torchserve, torchserve.client
    names = {"http://127.0.0.1:8080": ts.inference_url, "http://127.0.0.1:8081": ts.management_url,
             "http://127.0.0.1:8082": ts.metrics_url, "fmnist-lenet5": MODEL,
             ".runtime/": f"{ts.runtime_dir}/", "reports/samples/": f"{samples}/"}
    blocks = read_blocks(ROOT / doc)
    commands = [c for b in blocks for c in b.commands if c.kind == "run"]
    assert commands, f"{doc} has no example that talks to a server"
    _answers_counted(ts)
    before = {v: client.describe(MODEL, v)[0]["minWorkers"] for v in client.versions(MODEL)}
    default = client.default_version(MODEL)
    try:
        results = run_commands([substitute(c.text, names, sys.executable, ts.runtime_dir, ts.store)
                                for c in commands], cwd=ROOT)
    finally:  # the session server goes back to how it was
        if client.default_version(MODEL) != default:
            client.set_default(MODEL, default)
        for version in client.versions(MODEL):
            if version not in before:
                client.unregister(MODEL, version)
            elif client.describe(MODEL, version)[0]["minWorkers"] != before[version]:
                client.scale(MODEL, version, before[version], before[version])
    for cmd, (rc, http, out) in zip(commands, results):
        if http is not None:
            assert http == (cmd.expected_status or 200), f"{cmd.source}: {cmd.text}\n-> HTTP {http}: {out[:600]}"
        else:
            assert rc == 0, f"{cmd.source}: {cmd.text}\n-> exit status {rc}: {out[:600]}"
    output_of = {id(c): out for c, (_, _, out) in zip(commands, results)}
    for block in (b for b in blocks if b.output is not None):
        last = [c for c in block.commands if c.kind == "run"][-1]
        documented = substitute(block.output, {"fmnist-lenet5": MODEL}, "", ts.runtime_dir, ts.store)
        assert output_matches(documented, output_of[id(last)], block.output_kind), \
            f"{block.output_source}: the output of `{last.text}` is not as documented; it printed:\n" \
            f"{output_of[id(last)]}"


def test_howto_prints_commands_that_work(torchserve, samples):
    ts = torchserve
    _answers_counted(ts)
    p = subprocess.run([sys.executable, "-m", "serving", "howto", "--model", MODEL, "--image",
                        str(samples / "0000_ankle-boot.png"), "--runtime-dir", str(ts.runtime_dir), "--store",
                        str(ts.store)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [x.strip() for x in p.stdout.splitlines()]
    assert "..." not in p.stdout and "VERSION" not in p.stdout
    curls = [x for x in lines if x.startswith("curl ")]
    versions = [x for x in lines if " -m serving " in x]
    read_key = [x for x in lines if x.startswith("KEY=$(")]  # the key is read when the commands run, not printed
    assert len(curls) == 4 and all('Bearer $KEY"' in c for c in curls) and len(read_key) == 1
    assert all(key not in p.stdout for key in ts.tokens.values())
    assert any(x.endswith(f"rollout {MODEL} 2.0 --runtime-dir {ts.runtime_dir} --store {ts.store}") for x in versions)
    metrics_line = next(x for x in lines if "handler_answers_total" in x)
    runnable = read_key + curls + [metrics_line[metrics_line.index("curl "):]] + \
        [x for x in versions if any(f" serving {c} " in x for c in ("models", "describe", "ping"))]
    results = run_commands([substitute(c, {}, sys.executable, ts.runtime_dir, ts.store) for c in runnable], ROOT)
    for cmd, (rc, http, out) in zip(runnable, results):
        assert (http or 200) == 200 and rc == 0, f"{cmd}\n-> {rc} {http}: {out[:500]}"

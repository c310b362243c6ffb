"""Where attention helps: one backbone with SE, CBAM or non-local blocks in each stage alone, in the last
stages and everywhere, several seeds each; test accuracy mean ± std, the paired gain over the plain backbone
with a t-test across seeds, params, FLOPs and CPU latency per variant.

    python -m training experiment-attention                   # recipe attention_cpu -> reports/attention/...
    python -m training experiment-attention --latency --docs  # + batch-1 CPU latency (quiet machine), docs

Runs go seed by seed (every variant with seed 0, then seed 1, ...), so an interrupted ablation has every
variant with the same seeds; run the command again to continue. Seed s fixes the initialisation and the
training subset for every variant alike, so variant and baseline are compared seed by seed (paired).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from handlers.artifacts import write_json
from training.experiments.defaults import KINDS, PLACEMENTS, SEEDS
from training.experiments.plots import attention_accuracy
from training.experiments.runs import Run, environment, publish, result_recipe, usage, usage_text
from training.models import get_model
from training.recipe import Recipe, load_recipe
from training.zoo import count_flops, cpu_latency_ms

LATENCY_THREADS, LATENCY_REPS, LATENCY_ROUNDS = 2, 10, 3
# Two-sided 95 % critical values of Student's t by degrees of freedom (standard tables).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
       20: 2.086}


def variant_args(kind: str, stages: list[int]) -> dict[str, Any]:
    """Builder kwargs: SE/CBAM gate every block of those stages; a non-local block ends each of them."""
    if kind == "non_local":
        return {"non_local_stages": list(stages)}
    return {"attn": kind, "attn_stages": list(stages)}


def variants(kinds: tuple[str, ...] = KINDS, placements: tuple[str, ...] = tuple(PLACEMENTS),
             skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """name -> {kind, placement, stages, model_args}; "baseline" (no attention) first; `skip` names
    kind_placement variants of the grid to leave out."""
    unknown = [k for k in kinds if k not in KINDS] + [p for p in placements if p not in PLACEMENTS]
    unknown += [v for v in skip if v not in {f"{k}_{p}" for k in KINDS for p in PLACEMENTS}]
    if unknown:
        raise ValueError(f"unknown kind/placement/variant {unknown}; kinds: {', '.join(KINDS)}; "
                         f"placements: {', '.join(PLACEMENTS)}; variants are named kind_placement")
    out = {"baseline": {"kind": None, "placement": None, "stages": [], "model_args": {}}}
    for kind in kinds:
        for placement in placements:
            if f"{kind}_{placement}" in skip:
                continue
            stages = PLACEMENTS[placement]
            out[f"{kind}_{placement}"] = {"kind": kind, "placement": placement, "stages": stages,
                                          "model_args": variant_args(kind, stages)}
    return out


def attention_experiment(recipe: str = "attention_cpu", out_dir: str | Path | None = None,
                         kinds: tuple[str, ...] = KINDS, placements: tuple[str, ...] = tuple(PLACEMENTS),
                         skip: tuple[str, ...] = (), seeds: tuple[int, ...] = SEEDS,
                         overrides: dict[str, Any] | None = None, latency: bool = False,
                         docs_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train every variant with every seed (resumably), then summarise into `out_dir`; `latency` measures
    batch-1 CPU latency (do it on a quiet machine); `docs_dir` publishes a finished ablation."""
    base = load_recipe(recipe, overrides)
    name = Path(recipe).stem
    out = Path(out_dir or f"reports/attention/{name}")
    table_of = variants(kinds, placements, skip)
    runs = {(v, seed): Run(f"{v}-seed{seed}", dataclasses.replace(
        base, seed=seed, model_args={**base.model_args, **spec["model_args"]}), out / "runs")
        for seed in seeds for v, spec in table_of.items()}
    for run in runs.values():
        run.load()  # a record of another recipe fails here, before anything trains
    for run in runs.values():
        if not run.done():
            run.advance(progress=progress)
            report(name, base, table_of, seeds, runs, out, measure_latency=False)
    summary = report(name, base, table_of, seeds, runs, out, measure_latency=latency)
    if docs_dir is not None:
        name = summary["recipe_name"]
        publish(summary, out, Path(docs_dir), [f"{name}.png"], markdown(summary, image_dir="experiments"))
    return summary


def report(name: str, base: Recipe, table_of: dict[str, dict], seeds: tuple[int, ...], runs: dict, out: Path,
           measure_latency: bool) -> dict[str, Any]:
    records = {key: run.load() for key, run in runs.items()}
    finished = {key: r for key, r in records.items() if r is not None and r["epochs_done"] == base.epochs}
    cost = measure_cost(base, table_of, finished, out, measure_latency)
    summary = summarize(name, base, table_of, seeds, finished, cost)
    write_json(out / f"{name}.json", summary)
    attention_accuracy(summary, out / f"{name}.png")
    (out / "results.md").write_text(markdown(summary, image_dir=".") + "\n")
    print(table(summary), flush=True)
    return summary


def measure_cost(base: Recipe, table_of: dict[str, dict], finished: dict, out: Path,
                 measure_latency: bool) -> dict[str, Any]:
    """Params and forward FLOPs (batch 1) per variant; CPU latency from cost.json, re-measured when asked
    (interleaved rounds, so drift on a shared machine hits every variant alike)."""
    path = out / "cost.json"
    cost = json.loads(path.read_text()) if path.is_file() else {"variants": {}, "latency": None}
    model_args = {v: r["model_args"] for (v, _), r in finished.items()}
    models = {v: get_model(base.arch, **args).eval() for v, args in model_args.items() if v in table_of}
    for v, model in models.items():
        shape = (1, model_args[v]["in_channels"], model_args[v]["img_size"], model_args[v]["img_size"])
        cost["variants"].setdefault(v, {}).update(params=sum(p.numel() for p in model.parameters()),
                                                  flops=count_flops(model, torch.randn(shape)))
    if measure_latency and models:
        previous = torch.get_num_threads()
        torch.set_num_threads(LATENCY_THREADS)
        load_before = os.getloadavg()
        samples: dict[str, list[float]] = {v: [] for v in models}
        try:
            order = list(models)
            for round_ in range(LATENCY_ROUNDS):
                for v in order[round_ % len(order):] + order[:round_ % len(order)]:  # each round starts elsewhere
                    model = models[v]
                    x = torch.randn(1, model_args[v]["in_channels"], model_args[v]["img_size"],
                                    model_args[v]["img_size"])
                    samples[v].append(cpu_latency_ms(model, x, warmup=3, reps=LATENCY_REPS))
        finally:
            torch.set_num_threads(previous)
        for v, ms in samples.items():
            cost["variants"][v]["latency_ms"] = statistics.median(ms)
        cost["latency"] = {"threads": LATENCY_THREADS, "batch": 1, "precision": "fp32",
                           "what": f"median of {LATENCY_ROUNDS} interleaved rounds x median of {LATENCY_REPS} "
                                   "forward passes, eval mode, random input",
                           "load_before": list(load_before), "load_after": list(os.getloadavg()),
                           "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **environment()}
    write_json(path, cost)
    return cost


def paired(acc: dict[int, float], base: dict[int, float]) -> dict[str, Any]:
    """Gain over the baseline seed by seed: mean, std, t and the verdict at the 95 % level."""
    diffs = [acc[s] - base[s] for s in sorted(acc) if s in base]
    n = len(diffs)
    result: dict[str, Any] = {"n": n, "gain_mean": statistics.fmean(diffs) if diffs else None,
                              "gain_std": statistics.stdev(diffs) if n >= 2 else None, "t": None,
                              "t_crit": T95.get(n - 1, 2.086) if n >= 2 else None}
    if n < 2:
        result["verdict"] = "too few seeds"
        return result
    sd = result["gain_std"]
    t = math.inf * (1 if result["gain_mean"] > 0 else -1) if sd == 0 and result["gain_mean"] != 0 else \
        (0.0 if sd == 0 else result["gain_mean"] / (sd / math.sqrt(n)))
    result["t"] = t
    result["verdict"] = "gain" if t > result["t_crit"] else ("loss" if t < -result["t_crit"] else "within noise")
    return result


def summarize(name: str, base: Recipe, table_of: dict[str, dict], seeds: tuple[int, ...], finished: dict,
              cost: dict[str, Any]) -> dict[str, Any]:
    accs = {v: {s: r["metrics"]["test_acc"] for (vv, s), r in finished.items() if vv == v} for v in table_of}
    base_lat = cost["variants"].get("baseline", {}).get("latency_ms")
    out_variants = {}
    for v, spec in table_of.items():
        a = accs[v]
        c = cost["variants"].get(v, {})
        entry = {"kind": spec["kind"], "placement": spec["placement"], "stages": spec["stages"],
                 "test_acc": {str(s): acc for s, acc in sorted(a.items())},
                 "acc_mean": statistics.fmean(a.values()) if a else None,
                 "acc_std": statistics.stdev(a.values()) if len(a) >= 2 else None,
                 "params": c.get("params"), "flops": c.get("flops"), "latency_ms": c.get("latency_ms"),
                 "latency_x": c["latency_ms"] / base_lat if base_lat and c.get("latency_ms") else None,
                 "cpu_s": usage([r for (vv, _), r in finished.items() if vv == v])["cpu_s"]}
        if v != "baseline":
            entry["vs_baseline"] = paired(a, accs.get("baseline", {}))
        out_variants[v] = entry
    hardware = sorted({r["metrics"]["hardware"] for r in finished.values()})
    complete = len(finished) == len(table_of) * len(seeds)
    summary = {"experiment": "attention", "recipe_name": name, "backbone": base.arch,
               "recipe": {k: v for k, v in result_recipe(base).items() if k != "seed"}, "seeds": list(seeds),
               "kinds": sorted({spec["kind"] for spec in table_of.values() if spec["kind"]}, key=KINDS.index),
               "placements": list(dict.fromkeys(spec["placement"] for spec in table_of.values()
                                                if spec["placement"])),
               "runs_done": len(finished), "runs": len(table_of) * len(seeds), "complete": complete,
               "hardware": hardware, "usage": usage(list(finished.values())),
               "latency": cost.get("latency"), "variants": out_variants, "environment": environment(),
               "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    summary["verdicts"] = verdicts(summary)
    return summary


def _pp(x: float) -> str:
    return f"{100 * x:+.2f} pp"


def verdicts(summary: dict[str, Any]) -> list[str]:
    """Sentences generated from the figures: where the gain is, per kind, or that it is within noise."""
    vs, out = summary["variants"], []
    base = vs.get("baseline", {})
    tested = {v: e for v, e in vs.items() if v != "baseline" and e["vs_baseline"]["t"] is not None}
    if not tested:
        return ["Too few finished seeds to compare any variant with the baseline yet."]
    n = min(e["vs_baseline"]["n"] for e in tested.values())
    for kind in summary["kinds"]:
        mine = {v: e for v, e in tested.items() if e["kind"] == kind}
        if not mine:
            continue
        best_v, best = max(mine.items(), key=lambda kv: kv[1]["vs_baseline"]["gain_mean"])
        p = best["vs_baseline"]
        where = f"{kind} is best in {best['placement']} ({_pp(p['gain_mean'])} ± {100 * p['gain_std']:.2f} over the " \
                f"baseline, paired over {p['n']} seeds, t = {p['t']:.2f}, 95 % needs |t| > {p['t_crit']:.2f})"
        gains = [e["placement"] for e in mine.values() if e["vs_baseline"]["verdict"] == "gain"]
        losses = [e["placement"] for e in mine.values() if e["vs_baseline"]["verdict"] == "loss"]
        tail = f"a gain beyond seed noise in {', '.join(gains)}" if gains else "no placement beyond seed noise"
        if losses:
            tail += f"; a loss beyond seed noise in {', '.join(losses)}"
        out.append(f"{where}: {tail}.")
    gains = [v for v, e in tested.items() if e["vs_baseline"]["verdict"] == "gain"]
    if gains:
        out.append(f"Where the gain is: {', '.join(gains)}.")
    else:
        std = base.get("acc_std")
        spread = f" (the baseline's seed-to-seed std is {100 * std:.2f} pp)" if std is not None else ""
        out.append(f"Where the gain is: nowhere beyond seed noise on this budget{spread}; every placement's gain is "
                   "within noise.")
    out.append(f"{len(tested)} variants tested at the 95 % level with {n} seeds: about {0.05 * len(tested):.1f} "
               "would cross that line by chance alone.")
    lat = [(v, e["latency_x"]) for v, e in vs.items() if e["placement"] == "all" and e.get("latency_x")]
    if lat:
        out.append("Cost of attention everywhere, batch-1 CPU latency against the baseline: "
                   + ", ".join(f"{v} {x:.2f}x" for v, x in lat) + ".")
    return out


def table(summary: dict[str, Any]) -> str:
    rows = ["| variant | attention | stages | test accuracy (mean ± std) | gain vs baseline (paired) | t | verdict | "
            "params | MFLOPs | CPU ms (b=1) | latency vs baseline |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, e in summary["variants"].items():
        acc = "—" if e["acc_mean"] is None else f"{100 * e['acc_mean']:.2f} %" + (
            f" ± {100 * e['acc_std']:.2f}" if e["acc_std"] is not None else "")
        p = e.get("vs_baseline")
        gain = "—" if not p or p["gain_mean"] is None else _pp(p["gain_mean"]) + (
            f" ± {100 * p['gain_std']:.2f}" if p["gain_std"] is not None else "")
        t = "—" if not p or p["t"] is None else f"{p['t']:.2f}"
        verdict = "—" if not p else p["verdict"]
        params = "—" if e["params"] is None else f"{e['params'] / 1e6:.3f} M"
        flops = "—" if e["flops"] is None else f"{e['flops'] / 1e6:.1f}"
        ms = "—" if e["latency_ms"] is None else f"{e['latency_ms']:.2f}"
        x = "—" if e["latency_x"] is None else f"{e['latency_x']:.2f}x"
        stages = ", ".join(map(str, e["stages"])) or "—"
        rows.append(f"| {v} | {e['kind'] or 'none'} | {stages} | {acc} | {gain} | {t} | {verdict} | {params} | "
                    f"{flops} | {ms} | {x} |")
    return "\n".join(rows)


def markdown(summary: dict[str, Any], image_dir: str) -> str:
    r, name = summary["recipe"], summary["recipe_name"]
    status = "all runs finished" if summary["complete"] else \
        f"partial: {summary['runs_done']} of {summary['runs']} runs so far (rerun to continue)"
    lat = summary["latency"]
    latency = "CPU latency not measured yet (`--latency`, on a quiet machine)." if not lat else (
        f"CPU latency: batch 1, {lat['precision']}, {lat['threads']} threads, {lat['what']}; measured "
        f"{lat['measured']}, load average {lat['load_before'][0]:.2f} before, {lat['load_after'][0]:.2f} after.")
    data = f"{r['limit']} training images" if r.get("limit") else "the full training split"
    lines = [
        f"Recipe `{name}`: backbone {summary['backbone']}, {r['dataset']}, {data}, {r['epochs']} epochs, batch "
        f"{r['batch_size']}, {r['optimizer']} lr {r['lr']:g}, amp {r['amp']}; seeds "
        f"{', '.join(map(str, summary['seeds']))}. Measured {summary['generated']} on "
        f"{', '.join(summary['hardware'])} ({status}); {usage_text(summary['usage'])} (torch "
        f"{summary['environment']['torch']}). Test accuracy on the test split"
        f"{f' (at most {lim} images, the limit)' if (lim := r.get('limit')) else ''}; FLOPs per image (a multiply-add "
        f"counts 2). {latency} "
        f"Figures from [{name}.json]({image_dir}/{name}.json).",
        "", table(summary), "", f"![test accuracy per placement]({image_dir}/{name}.png)", "",
        *[f"- {v}" for v in summary["verdicts"]],
    ]
    return "\n".join(lines)


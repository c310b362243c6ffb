"""The experiments' figures, drawn from their summary JSON only (what the docs show is what the JSON holds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _families(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    nets = summary["nets"]
    return [(title, {n: r for n, r in nets.items() if r["skip"] == skip})
            for title, skip in (("plain (no skips)", False), ("ResNet (skips)", True))]


def _colour(net: str) -> str:
    depth = "".join(ch for ch in net if ch.isdigit())
    return {"20": "C0", "56": "C1", "110": "C3"}.get(depth, "C7")


def depth_curves(summary: dict[str, Any], path: Path) -> None:
    """He et al. fig. 6 layout: one panel per family; training error dashed, validation error solid."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (title, nets) in zip(axes, _families(summary)):
        for net, r in nets.items():
            ep = [h["epoch"] for h in r["history"]]
            ax.plot(ep, [100 * h["train_err"] for h in r["history"]], "--", color=_colour(net), lw=1,
                    label=f"{net} train")
            ax.plot(ep, [100 * h["val_err"] for h in r["history"]], "-", color=_colour(net), lw=2,
                    label=f"{net} val")
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("error (%)")
    fig.suptitle(f"{summary['recipe_name']}: training error (dashed) and validation error (solid)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gradnorm_profiles(summary: dict[str, Any], path: Path) -> None:
    """Per-layer weight-gradient norm (log scale) against depth: the epoch-1 mean (solid) and the last epoch's
    (dotted). Layer 1 is the first conv; the last point is the classifier."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (title, nets) in zip(axes, _families(summary)):
        for net, r in nets.items():
            epochs = [p for p in r["gradnorms"]["per_epoch"] if p["mean"]]
            if not epochs:
                continue
            shown = [(epochs[0], "-", 1.0)] + ([(epochs[-1], ":", 0.7)] if len(epochs) > 1 else [])
            for p, style, alpha in shown:
                ax.semilogy(range(1, len(p["mean"]) + 1), p["mean"], style, color=_colour(net), alpha=alpha,
                            label=f"{net} epoch {p['epoch']}")
        ax.set(title=title, xlabel="layer (1 = first conv)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("weight-gradient L2 norm")
    fig.suptitle(f"{summary['recipe_name']}: per-layer gradient norms, mean over the epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attention_accuracy(summary: dict[str, Any], path: Path) -> None:
    """Top: test accuracy mean ± std over seeds per placement, one colour per attention kind, the baseline's
    mean ± std as a grey band. Bottom: the gain over the baseline, paired seed by seed (mean ± std)."""
    plt = _pyplot()
    variants = summary["variants"]
    base = variants.get("baseline")
    kinds = [k for k in summary["kinds"] if any(v["kind"] == k for v in variants.values())]
    placements = summary["placements"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    width = 0.8 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        acc: tuple[list, list, list] = ([], [], [])
        gain: tuple[list, list, list] = ([], [], [])
        for j, placement in enumerate(placements):
            v = variants.get(f"{kind}_{placement}")
            x = j + (i - (len(kinds) - 1) / 2) * width
            if v and v["acc_mean"] is not None:
                for lst, val in zip(acc, (x, 100 * v["acc_mean"], 100 * (v["acc_std"] or 0.0))):
                    lst.append(val)
            p = v.get("vs_baseline") if v else None
            if p and p["gain_mean"] is not None:
                for lst, val in zip(gain, (x, 100 * p["gain_mean"], 100 * (p["gain_std"] or 0.0))):
                    lst.append(val)
        top.errorbar(*acc[:2], yerr=acc[2], fmt="o", capsize=3, color=f"C{i}", label=kind)
        bottom.errorbar(*gain[:2], yerr=gain[2], fmt="o", capsize=3, color=f"C{i}", label=kind)
    if base and base["acc_mean"] is not None:
        m, s = 100 * base["acc_mean"], 100 * (base["acc_std"] or 0.0)
        top.axhspan(m - s, m + s, color="0.85", zorder=0, label="baseline mean ± std")
        top.axhline(m, color="0.5", lw=1, zorder=0)
    bottom.axhline(0, color="0.5", lw=1, zorder=0)
    bottom.set_xticks(range(len(placements)), placements)
    top.set(ylabel="test accuracy (%)",
            title=f"{summary['recipe_name']}: {summary['backbone']}, mean ± std over {len(summary['seeds'])} seeds")
    bottom.set(xlabel="where the attention sits", ylabel="gain over baseline (pp, paired by seed)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

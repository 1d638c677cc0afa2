"""`mindvl plan`'s report as a table (the plan and `--against`, side by side), and as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mindvl.plotting import pyplot

_TOTALS = (
    ("graphs", lambda p: f"{p['graphs']}"),
    ("memory: weights + KV caches",
     lambda p: f"{p['memory_bytes'] / 2**30:.2f} GB (KV {p['kv_bytes'] / 2**20:.0f} MB)"),
    ("disk", lambda p: "unknown" if p["disk_bytes"] is None else f"{p['disk_bytes'] / 2**30:.2f} GB"),
    ("export time (predicted)", lambda p: "unknown" if p["export_s"] is None else f"{p['export_s']:.0f} s"),
    ("GFLOP per request", lambda p: f"{p['per_request']['gflop']:.3g}"),
    ("GFLOP off native per request", lambda p: f"{p['per_request']['off_native_gflop']:.3g}"),
    ("visual tokens per request", lambda p: f"{p['per_request']['visual_tokens']:.1f}"),
    ("wasted vision tokens per request", lambda p: f"{p['per_request']['waste_tokens']:.1f}"),
    ("vision tokens lost below native per request", lambda p: f"{p['per_request']['lost_tokens']:.1f}"),
    ("padded prompt tokens per request", lambda p: f"{p['per_request']['padding_tokens']:.1f}"),
    ("inputs below the floor", lambda p: f"{p['below_floor']:.1%}"),
    ("requests refused", lambda p: f"{p['refused']:.1%}"),
)


def format_report(report: dict[str, Any]) -> str:
    plans = report["plans"]
    w = report["workload"]
    lines = [f"workload: {w['source']}: {w['requests']:g} requests, {w['images']:g} images, {w['videos']:g} videos; "
             f"fidelity floor {report['floor']}", ""]
    names = list(plans)
    lines += [_row(["", *names]), _row(["---"] * (len(names) + 1))]
    lines += [_row([label, *(show(plans[n]) for n in names)]) for label, show in _TOTALS]
    for name in names:
        p = plans[name]
        spec = p["spec"]
        lines += ["", f"{name}: prefill {spec['prefill']}, cache {spec['cache']}, batch {spec['batch']}", "",
                  _row(["bucket", "share of its inputs", "waste tokens / input", "lost tokens / input",
                        "below floor", "aspect distortion"]), _row(["---"] * 6)]
        lines += [_row([b["bucket"], f"{b['share']:.1%}", f"{b['waste_tokens_per_input']:.1f}",
                        f"{b['lost_tokens_per_input']:.1f}", f"{b['below_floor']:.0%}",
                        f"{b['aspect_distortion']:.2f}"]) for b in p["buckets"]]
        lines += [f"refused: {reason}" for reason in p["refusals"]]
    return "\n".join(lines)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """Per bucket of each plan: its share of the inputs, and its waste and lost tokens per input."""
    plt = pyplot()
    plans = report["plans"]
    fig, axes = plt.subplots(len(plans), 2, figsize=(12, 3.5 * len(plans)), squeeze=False)
    for row, (name, p) in zip(axes, plans.items(), strict=True):
        labels = [b["bucket"] for b in p["buckets"]]
        row[0].bar(labels, [100 * b["share"] for b in p["buckets"]], color="tab:blue")
        row[0].set_title(f"{name}: share of its inputs (%)")
        x = range(len(labels))
        row[1].bar([i - 0.2 for i in x], [b["waste_tokens_per_input"] for b in p["buckets"]], 0.4,
                   label="wasted (upscaled, stretched)", color="tab:orange")
        row[1].bar([i + 0.2 for i in x], [b["lost_tokens_per_input"] for b in p["buckets"]], 0.4,
                   label="lost below native", color="tab:red")
        row[1].set_xticks(list(x), labels)
        row[1].set_title(f"{name}: vision tokens per input, {p['graphs']} graphs")
        row[1].legend()
        for ax in row:
            ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Results out: the JSON document, a markdown table, and the figure (TBT CDF per target, P99 TBT
and median TTFT against request rate, capacity bars). Reads only the results dict, so a saved
results.json can be re-plotted."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.0f}"


def seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


COLUMNS = ["target", "req/s", "TTFT P50 (s)", "TTFT P99 (s)", "TBT P50 (ms)", "TBT P99 (ms)", "TBT max (ms)",
           "sched. delay P50 (s)", "output tok/s", "SLO attainment", "failed"]


def point_row(label: str, point: dict) -> list[str]:
    s = point["summary"]
    attainment = s.get("slo_attainment")
    return [label, f"{point['qps']:g}", seconds(s["ttft_p50"]), seconds(s["ttft_p99"]), ms(s["tbt_p50"]), ms(s["tbt_p99"]),
            ms(s["tbt_max"]), seconds(s["scheduling_delay_p50"]), f"{s['output_token_throughput'] or 0:.1f}",
            "–" if attainment is None else f"{attainment:.0%}", str(s["num_failed"])]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def points_table(results: dict) -> str:
    rows = [point_row(t["label"], p) for t in results["targets"] for p in t["points"]]
    rows += [[t["label"], f"failed: {t['error']}"] + [""] * (len(COLUMNS) - 2)
             for t in results["targets"] if t.get("error")]
    return markdown_table(COLUMNS, rows) if rows else ""


def curve(target: dict) -> list[tuple[float, dict]]:
    """(rate, summary) of every run of a target, fixed rates and capacity probes alike, by rate."""
    runs = [(p["qps"], p["summary"]) for p in target["points"]]
    runs += [(p["qps"], p["summary"]) for p in (target.get("capacity") or {}).get("probes", [])]
    return sorted(runs, key=lambda run: run[0])


def capacity_table(results: dict) -> str:
    targets = [t for t in results["targets"] if t.get("capacity")]
    if not targets:
        return ""
    base = next((t["capacity"]["capacity"] for t in targets if t.get("policy") == "vllm"), None)
    rows = []
    for t in targets:
        cap = t["capacity"]
        ratio = f"{cap['capacity'] / base:.2f}x" if base else "–"
        probes = ", ".join(f"{p['qps']:.3g}{'✓' if p['passed'] else '✗'}" for p in cap["probes"])
        rows.append([t["label"], f"{cap['capacity']:.3g}", ratio, ms(cap["tbt_slo"]), probes])
    return markdown_table(["target", "capacity (req/s)", "vs vllm policy", "P99 TBT SLO (ms)", "probes (req/s)"],
                          rows)


def tbt_values(point: dict) -> np.ndarray:
    gaps = [np.diff(r["token_times"]) for r in point.get("records", []) if r["error"] is None]
    return np.concatenate(gaps) if gaps else np.zeros(0)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = results["targets"]
    slo = results["meta"].get("tbt_slo_s")
    with_cap = [t for t in targets if t.get("capacity")]
    panels = ["cdf"] * any(t["points"] for t in targets) + ["p99", "ttft"] + ["capacity"] * bool(with_cap)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    ax = dict(zip(panels, axes))
    cdf, p99, ttft = ax.get("cdf"), ax["p99"], ax["ttft"]
    for i, t in enumerate(targets):
        if cdf and t["points"]:
            values = np.sort(tbt_values(t["points"][0])) * 1000
            if values.size:
                cdf.plot(values, np.arange(1, values.size + 1) / values.size, color=f"C{i}",
                         label=f"{t['label']} @ {t['points'][0]['qps']:g} req/s")
        runs = curve(t)
        qps = [q for q, _ in runs]
        p99.plot(qps, [(s["tbt_p99"] or np.nan) * 1000 for _, s in runs], "o-", color=f"C{i}", label=t["label"])
        ttft.plot(qps, [s["ttft_p50"] or np.nan for _, s in runs], "o-", color=f"C{i}", label=t["label"])
    if cdf:
        # Gaps of 0 (tokens that arrived together) would stretch a log axis to nothing useful.
        cdf.set(xscale="log", xlim=(1, None), xlabel="time between tokens (ms)", ylabel="fraction of gaps",
                title="TBT CDF")
    p99.set(xscale="log", yscale="log", xlabel="request rate (req/s)", ylabel="P99 TBT (ms)",
            title="P99 TBT vs load (runs and probes)")
    ttft.set(xscale="log", yscale="log", xlabel="request rate (req/s)", ylabel="median TTFT (s)",
             title="Median TTFT vs load")
    if slo:
        p99.axhline(slo * 1000, color="grey", linestyle="--", label="SLO")
        if cdf:
            cdf.axvline(slo * 1000, color="grey", linestyle="--", label="SLO")
    if with_cap:
        bars = ax["capacity"].bar([t["label"] for t in with_cap], [t["capacity"]["capacity"] for t in with_cap],
                                  color=[f"C{targets.index(t)}" for t in with_cap])
        ax["capacity"].bar_label(bars, fmt="%.3g")
        ax["capacity"].set(ylabel="req/s", title=f"Capacity (P99 TBT <= {ms(slo)} ms)")
        ax["capacity"].tick_params(axis="x", rotation=20)
    for a in (cdf, p99, ttft):
        if a:
            a.grid(True, which="both", alpha=0.3)
            a.legend(fontsize=7)
    fig.suptitle(results["meta"].get("title", ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

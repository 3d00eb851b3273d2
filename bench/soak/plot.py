#!/usr/bin/env python3
"""Draws a soak-bench run's CSVs (samples.csv, freshness.csv, kills.csv,
parts.csv in RUN_DIR) as PNGs with matplotlib: resident memory, consumer lag,
freshness, storage, and ingest's memory beside its produce time over time,
with the aggregator's SIGKILLs marked.

    python3 bench/soak/plot.py RUN_DIR --prefix distributed --out bench/soak [--warmup-min 10]
        [--loadavg FILE --start-epoch SECONDS]

--loadavg draws the machine's 1-minute load average (a CSV of epoch,load1,...,
sampled beside the run) on the lag and freshness plots, to show when other
work shared the cores; --start-epoch is the soak's t = 0 in Unix seconds.

matplotlib is not in the dev image: `python3 -m venv RUN_DIR/venv &&
RUN_DIR/venv/bin/pip install matplotlib`, then run this with that python.
"""

import argparse
import csv
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PROCESSES = ["ingest", "aggregator", "query_api", "all_in_one", "tansu", "clickhouse"]


def read(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(v):
    return float(v) if v not in (None, "") else None


def series(rows, key, scale=1.0):
    pts = [(float(r["t_s"]) / 60.0, num(r.get(key))) for r in rows]
    pts = [(t, v * scale) for t, v in pts if v is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def marks(ax, kills, warmup_min):
    for i, k in enumerate(kills):
        ax.axvline(float(k["t_s"]) / 60.0, color="red", linestyle=":", linewidth=1, label="aggregator SIGKILL" if i == 0 else None)
    if warmup_min:
        ax.axvspan(0, warmup_min, color="grey", alpha=0.12, label="warm-up")
    ax.set_xlabel("minutes into the soak")
    ax.grid(True, alpha=0.3)


def load_overlay(ax, loadavg, start_epoch):
    """The machine's 1-minute load average on a second axis."""
    if not loadavg:
        return
    t = [(float(r["epoch"]) - start_epoch) / 60.0 for r in loadavg]
    v = [float(r["load1"]) for r in loadavg]
    ax2 = ax.twinx()
    ax2.plot(t, v, color="grey", linewidth=0.8, alpha=0.6, label="load average, 1 min (2 cores)")
    ax2.set_ylabel("load average (1 min)", color="grey")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8, loc="upper right")


def save(fig, out, prefix, name):
    path = os.path.join(out, f"{prefix}-{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=64)
    plt.close(fig)
    print(path)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--prefix", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--warmup-min", type=float, default=10.0)
    p.add_argument("--loadavg")
    p.add_argument("--start-epoch", type=float, default=0.0)
    a = p.parse_args()
    loadavg = read(a.loadavg) if a.loadavg else []
    if loadavg and a.run_dir:
        # Only the part of the load-average log that overlaps the run.
        last = max((float(r["t_s"]) for r in read(os.path.join(a.run_dir, "samples.csv"))), default=0.0)
        loadavg = [r for r in loadavg if 0 <= float(r["epoch"]) - a.start_epoch <= last]
    samples = read(os.path.join(a.run_dir, "samples.csv"))
    fresh = read(os.path.join(a.run_dir, "freshness.csv"))
    kills = read(os.path.join(a.run_dir, "kills.csv"))
    parts = read(os.path.join(a.run_dir, "parts.csv"))
    os.makedirs(a.out, exist_ok=True)

    fig, ax = plt.subplots(figsize=(11, 4.5))
    for name in PROCESSES + ["bench"]:
        t, v = series(samples, f"rss_{name}_kib", 1 / 1024)
        if v:
            ax.plot(t, v, label="soak-bench (load generator)" if name == "bench" else name, linewidth=1.2)
    marks(ax, kills, a.warmup_min)
    ax.set_ylabel("resident memory (MiB)")
    ax.set_yscale("log")
    ax.set_title(f"{a.prefix}: resident memory per process (VmRSS every 10 s)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save(fig, a.out, a.prefix, "memory")

    t, v = series(samples, "lag_messages")
    if v:
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.plot(t, v, label="high watermark - committed offset (broker)", linewidth=1.2)
        t2, v2 = series(samples, "lag_metric_messages")
        if v2:
            ax.plot(t2, v2, label="aggregator's consumer_lag_messages", linewidth=1, alpha=0.7)
        marks(ax, kills, a.warmup_min)
        ax.set_ylabel("consumer lag (messages, 4 partitions)")
        ax.set_title(f"{a.prefix}: consumer lag")
        ax.legend(fontsize=8, loc="upper left")
        load_overlay(ax, loadavg, a.start_epoch)
        save(fig, a.out, a.prefix, "lag")

    if fresh:
        fig, ax = plt.subplots(figsize=(10, 4))
        pts = [(float(r["t_s"]) / 60.0, num(r["visible_ms"])) for r in fresh]
        ax.scatter([p[0] for p in pts if p[1] is not None], [p[1] for p in pts if p[1] is not None], s=6, label="probe: sent to visible")
        windows = defaultdict(list)
        for t_min, ms in pts:
            if ms is not None:
                windows[int(t_min // 5)].append(ms)
        xs, ys = [], []
        for w in sorted(windows):
            vals = sorted(windows[w])
            rank = max(1, -(-len(vals) * 99 // 100))
            xs += [w * 5, w * 5 + 5]
            ys += [vals[rank - 1]] * 2
        ax.plot(xs, ys, color="black", linewidth=1.5, label="p99 per 5 minutes")
        marks(ax, kills, a.warmup_min)
        ax.set_yscale("log")
        ax.set_ylabel("freshness (ms)")
        ax.set_title(f"{a.prefix}: freshness, probe sent to visible in the query API")
        ax.legend(fontsize=8, loc="upper left")
        load_overlay(ax, loadavg, a.start_epoch)
        save(fig, a.out, a.prefix, "freshness")

    t, v = series(samples, "ingest_produce_ms")
    t_rss, rss = series(samples, "rss_ingest_kib", 1 / 1024)
    if v and rss:
        # Ingest holds a request's records until the broker acks them: its
        # memory beside how long that takes.
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.plot(t_rss, rss, color="tab:blue", linewidth=1.2, label="ingest resident memory")
        ax.set_ylabel("ingest resident memory (MiB)", color="tab:blue")
        marks(ax, kills, a.warmup_min)
        ax.legend(fontsize=8, loc="upper left")
        ax2 = ax.twinx()
        ax2.plot(t, v, color="tab:orange", linewidth=0.8, alpha=0.8, label="ingest's mean produce time per 10 s (handed to broker to acked)")
        ax2.set_ylabel("produce time (ms)", color="tab:orange")
        ax2.set_ylim(bottom=0)
        ax2.legend(fontsize=8, loc="lower right")
        ax.set_title(f"{a.prefix}: ingest's memory and the broker's ack time")
        save(fig, a.out, a.prefix, "ingest")

    fig, ax = plt.subplots(figsize=(10, 4))
    drawn = False
    if parts:
        by_table = defaultdict(list)
        for r in parts:
            by_table[r["table"]].append((float(r["t_s"]) / 60.0, int(r["parts"])))
        for table, pts in sorted(by_table.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=table, linewidth=1.2)
        ax.set_ylabel("active parts (system.parts)")
        ax.set_title(f"{a.prefix}: ClickHouse active parts per table")
        drawn = True
    else:
        t, v = series(samples, "db_bytes", 1 / 1048576)
        if v:
            ax.plot(t, v, label="data directory", linewidth=1.2)
            ax.set_ylabel("MiB on disk")
            ax.set_title(f"{a.prefix}: embedded database size")
            drawn = True
    if drawn:
        marks(ax, kills, a.warmup_min)
        ax.legend(fontsize=8, ncol=2)
        save(fig, a.out, a.prefix, "storage")
    else:
        plt.close(fig)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Recomputes a soak-bench run's verdicts from its CSVs (samples.csv,
freshness.csv, kills.csv), with the same definitions as soak-bench's
verdict.rs, and prints them as Markdown: for a run whose process ended before
its own summary (the distributed hour of bench/SOAK.md, stopped at the end of
its load so that the drain could be finished by hand).

    python3 bench/soak/summarize.py RUN_DIR --rate 15000 --load-s 3600 [--warmup-s 600] [--window-s 600]

- memory: a least-squares line through each process's VmRSS samples from the
  end of warm-up to the end of the load; flat if it rises by at most 10%.
- lag: in every window (the kill interval) after warm-up the lag comes back
  to at most 5 s of traffic (rate x 5) at least once.
- freshness: nearest-rank p50/p99/max of the probes sent in each 5 minutes.
"""

import argparse
import csv
import math
import os

SERVICES = {"ingest", "aggregator", "query_api", "all_in_one"}


def read(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def quantile(sorted_values, q):
    if not sorted_values:
        return None
    rank = min(max(math.ceil(len(sorted_values) * q), 1), len(sorted_values))
    return sorted_values[rank - 1]


def fit(points, t0, t1):
    n = len(points)
    mt = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mt) ** 2 for p in points)
    sxy = sum((p[0] - mt) * (p[1] - my) for p in points)
    slope = sxy / sxx if sxx else 0.0
    return my + slope * (t0 - mt), my + slope * (t1 - mt)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--load-s", type=float, required=True)
    p.add_argument("--warmup-s", type=float, default=600)
    p.add_argument("--window-s", type=float, default=600)
    a = p.parse_args()
    samples = read(os.path.join(a.run_dir, "samples.csv"))
    probes = read(os.path.join(a.run_dir, "freshness.csv"))
    kills = [float(k["t_s"]) for k in read(os.path.join(a.run_dir, "kills.csv"))]

    print("### Resident memory after warm-up\n")
    print("| process | first MiB (fit) | last MiB (fit) | growth | min MiB | max MiB | max per 10 min (MiB) | flat (≤ 10%)? |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    names = [c[4:-4] for c in samples[0] if c.startswith("rss_")] if samples else []
    for name in names:
        pts = [(float(s["t_s"]), float(s[f"rss_{name}_kib"]) / 1024) for s in samples
               if s[f"rss_{name}_kib"] and a.warmup_s <= float(s["t_s"]) <= a.load_s]
        if len(pts) < 2:
            continue
        first, last = fit(pts, pts[0][0], pts[-1][0])
        growth = (last - first) / first * 100
        per_window = []
        start = a.warmup_s
        while start < a.load_s - 1:
            vals = [v for t, v in pts if start <= t < start + 600]
            if vals:
                per_window.append(f"{max(vals):.0f}")
            start += 600
        judged = name in SERVICES
        verdict = ("**yes**" if growth <= 10 else "**no**") if judged else "(not judged)"
        label = "soak-bench (load generator)" if name == "bench" else name
        print(f"| {label} | {first:.1f} | {last:.1f} | {growth:+.1f}% | {min(v for _, v in pts):.1f} | {max(v for _, v in pts):.1f} | {', '.join(per_window)} | {verdict} |")

    lags = [(float(s["t_s"]), int(s["lag_messages"])) for s in samples if s.get("lag_messages")]
    if lags:
        threshold = a.rate * 5
        print(f"\n### Consumer lag (high watermark minus committed offset)\n\n| window | max messages | min messages | caught up (≤ {threshold:.0f})? |\n|---|---:|---:|---|")
        ok_all = True
        start = a.warmup_s
        while start < a.load_s - 1:
            end = min(start + a.window_s, a.load_s)
            vals = [v for t, v in lags if start <= t < end]
            if vals:
                ok = min(vals) <= threshold
                ok_all &= ok
                print(f"| {start / 60:.0f}-{end / 60:.0f} min | {max(vals)} | {min(vals)} | {'yes' if ok else '**no**'} |")
            start = end
        print(f"\nMax {max(v for _, v in lags)} messages. **Caught up in every window: {'yes' if ok_all else 'no'}**.")

    print("\n### Freshness (probe sent to visible in the query API), per 5 minutes\n")
    print("| window | probes | p50 ms | p99 ms | max ms | not visible in 10 min | kill in window |\n|---|---:|---:|---:|---:|---:|---|")
    start = 0.0
    while start < a.load_s - 1:
        end = start + 300
        inside = [r for r in probes if start <= float(r["t_s"]) < end]
        ms = sorted(float(r["visible_ms"]) for r in inside if r["visible_ms"])
        missing = sum(1 for r in inside if not r["visible_ms"])
        q = lambda x: "-" if quantile(ms, x) is None else f"{quantile(ms, x):.0f}"
        kill = "yes" if any(start <= k < end for k in kills) else ""
        print(f"| {start / 60:.0f}-{end / 60:.0f} min | {len(ms)} | {q(0.5)} | {q(0.99)} | {q(1.0)} | {missing} | {kill} |")
        start = end


if __name__ == "__main__":
    main()

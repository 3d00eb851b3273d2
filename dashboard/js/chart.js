// Draws time series with the vendored uPlot (a global from uPlot.iife.min.js), sized to its container.
// Plotted values are floats: the chart is a picture; the exact numbers are in the tables beside it.

const COLORS = ["#2457c5", "#0a7a3d", "#b42318", "#7a4cc2", "#c77700", "#0f7c8c"];
const charts = new Set();

/**
 * A line chart in `el`: `times` in Unix seconds, `series` as [{label, values, money}].
 * Money series are labelled in dollars on the axis and in the legend; `from`/`to`
 * (Unix seconds) fix the x axis to the range asked for.
 */
export function lineChart(el, times, series, { money = true, from, to } = {}) {
  el.classList.add("chart");
  const width = Math.max(280, el.clientWidth || 600);
  const fmt = (v) => (v === null || v === undefined ? "—" : money ? "$" + v.toFixed(v !== 0 && Math.abs(v) < 1 ? 4 : 2) : v.toLocaleString("en-US"));
  const opts = {
    width,
    height: width < 500 ? 200 : 260,
    cursor: { drag: { x: false, y: false } },
    // The x axis spans the range asked for, not just the buckets with data:
    // one day of usage is a point in its month, not a year-wide axis.
    // A day or hour bucket may start before the range does: include it.
    scales: { x: { time: true, range: from && to ? () => [Math.min(from, times[0] ?? from), to] : undefined } },
    axes: [
      { stroke: "#5b6475", grid: { stroke: "#eef0f4" } },
      { stroke: "#5b6475", grid: { stroke: "#eef0f4" }, size: 70, values: (u, vals) => vals.map((v) => (money ? "$" + v.toLocaleString("en-US") : v.toLocaleString("en-US"))) },
    ],
    series: [
      { value: (u, ts) => (ts === null ? "—" : new Date(ts * 1000).toISOString().slice(0, 16).replace("T", " ") + " UTC") },
      ...series.map((s, i) => ({ label: s.label, stroke: COLORS[i % COLORS.length], width: 2, value: (u, v) => fmt(v), points: { show: times.length < 60 } })),
    ],
  };
  const data = [times, ...series.map((s) => s.values)];
  // eslint-disable-next-line no-undef
  const chart = new uPlot(opts, data, el);
  charts.add(chart);
  return chart;
}

/** Forgets the charts of the view being left. */
export function dropCharts() {
  for (const c of charts) c.destroy();
  charts.clear();
}

// Charts follow the window's width (a phone turned sideways, a resized window).
window.addEventListener("resize", () => {
  for (const c of charts) {
    const parent = c.root.parentElement;
    if (parent) c.setSize({ width: Math.max(280, parent.clientWidth), height: c.height });
  }
});

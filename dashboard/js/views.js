// The dashboard's views: each reads its range and filters from the URL, calls the public API and renders.

import * as api from "./api.js";
import { count, countText, durationText, exact, money, percentText, timeText, tokensOf } from "./format.js";
import { lineChart } from "./chart.js";

// ---- building blocks --------------------------------------------------------

/** An element: h("a", {href: "#"}, "text", child). Attributes starting with "on" are listeners. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** A view URL: "#/top-spenders?range=7d&metric=cost". */
export function href(path, params = {}) {
  return "#" + path + api.query(params);
}

/** `params` with `changes` applied (null removes a key): for links that change one filter. */
function withParams(params, changes) {
  const next = { ...params };
  for (const [k, v] of Object.entries(changes)) {
    if (v === null) delete next[k];
    else next[k] = v;
  }
  return next;
}

/** A table: `columns` as [{label, num, cell(row) -> Node|string, sortKey}]. */
function table(id, columns, rows, { rowClass, sort } = {}) {
  const head = h("tr", {}, columns.map((c) => {
    const cls = c.num ? "num" : undefined;
    if (!sort || !c.sortKey) return h("th", { class: cls, scope: "col" }, c.label);
    const active = sort.key === c.sortKey;
    const dir = active && sort.dir === "desc" ? "asc" : "desc";
    return h("th", { class: cls, scope: "col", "aria-sort": active ? (sort.dir === "asc" ? "ascending" : "descending") : undefined },
      h("button", { type: "button", class: "sort", "aria-pressed": active ? "true" : "false", onclick: () => sort.go(c.sortKey, dir) },
        c.label + (active ? (sort.dir === "asc" ? " ▲" : " ▼") : "")));
  }));
  const body = rows.map((r) => h("tr", { class: rowClass ? rowClass(r) : undefined }, columns.map((c) => h("td", { class: c.num ? "num" : c.cls }, c.cell(r)))));
  return h("table", { id }, h("thead", {}, head), h("tbody", {}, body));
}

function empty(text) {
  return h("p", { class: "state empty" }, text);
}

function card(label, valueNode, id) {
  return h("div", { class: "card", "data-measure": id }, h("div", { class: "label" }, label), h("div", { class: "value" }, valueNode));
}

function userLink(id, params) {
  return h("a", { href: href("/user/" + encodeURIComponent(id), { range: params.range, from: params.from, to: params.to }), class: "subject" }, id);
}

const MONEY_COLUMNS = [
  { label: "Cost", num: true, sortKey: "cost", cell: (r) => money(r.cost_usd) },
  { label: "Revenue", num: true, sortKey: "revenue", cell: (r) => money(r.revenue_usd) },
  { label: "Margin", num: true, sortKey: "margin", cell: (r) => money(r.margin_usd) },
];
const COUNT_COLUMNS = [
  { label: "Events", num: true, sortKey: "events", cell: (r) => count(r.events) },
  { label: "Tokens", num: true, sortKey: "tokens", cell: (r) => count(tokensOf(r)) },
];

// ---- ranges -----------------------------------------------------------------

export const RANGES = [["24h", "24 hours"], ["7d", "7 days"], ["30d", "30 days"], ["month", "This month"], ["custom", "Custom"]];

const iso = (d) => d.toISOString().replace(/\.\d{3}Z$/, "Z");

/** The range's from/to (RFC 3339, `to` exclusive) from the URL's range, from and to. */
export function bounds(params, fallback) {
  const range = params.range || fallback;
  // To the next whole minute: windows are minutes, and this minute's counts.
  const to = new Date(Math.ceil((Date.now() + 1) / 60000) * 60000);
  const back = (hours) => ({ from: iso(new Date(to - hours * 3600000)), to: iso(to) });
  switch (range) {
    case "24h": return back(24);
    case "7d": return back(24 * 7);
    case "30d": return back(24 * 30);
    case "month": return { from: iso(new Date(Date.UTC(to.getUTCFullYear(), to.getUTCMonth(), 1))), to: iso(to) };
    case "custom": {
      // Custom dates are whole UTC days, the `to` day included.
      const day = (s) => new Date(s + "T00:00:00Z");
      const from = params.from ? day(params.from) : new Date(to - 7 * 86400000);
      const end = params.to ? new Date(day(params.to).getTime() + 86400000) : to;
      return { from: iso(from), to: iso(end) };
    }
    default: return back(24 * 30);
  }
}

/** The range picker: preset links, and date inputs for a custom range. */
function rangePicker(path, params, fallback) {
  const current = params.range || fallback;
  const links = RANGES.map(([id, label]) =>
    h("a", { href: href(path, withParams(params, { range: id, cursor: null, ...(id === "custom" ? {} : { from: null, to: null }) })), "aria-current": id === current ? "true" : "false" }, label));
  const box = h("div", { class: "ranges", role: "group", "aria-label": "Range" }, links);
  if (current !== "custom") return box;
  const b = bounds(params, fallback);
  const from = h("input", { type: "date", value: params.from || b.from.slice(0, 10), "aria-label": "From (UTC day)" });
  const to = h("input", { type: "date", value: params.to || b.to.slice(0, 10), "aria-label": "To (UTC day, included)" });
  const apply = h("button", { type: "button", onclick: () => { location.hash = href(path, withParams(params, { range: "custom", from: from.value, to: to.value, cursor: null })); } }, "Apply");
  return h("div", { class: "controls" }, box, h("label", {}, "From", from), h("label", {}, "To", to), apply);
}

/** A select that rewrites one URL parameter. */
function select(label, name, options, path, params, fallback) {
  const el = h("select", { onchange: (e) => { location.hash = href(path, withParams(params, { [name]: e.target.value, cursor: null })); } },
    options.map(([v, text]) => h("option", { value: v, selected: (params[name] || fallback) === v ? "selected" : undefined }, text)));
  return h("label", {}, label, el);
}

/** An API answer's range in Unix seconds, for a chart's x axis. */
function secs(range) {
  return { from: Date.parse(range.from) / 1000, to: Date.parse(range.to) / 1000 };
}

function rangeNote(range) {
  // The exact range asked for, on the element too: a reader (or a test) can
  // ask the API the same question.
  return h("p", { class: "sub", id: "range", "data-from": range.from, "data-to": range.to }, `${timeText(range.from)} to ${timeText(range.to)} (end excluded)`);
}

// ---- Overview -----------------------------------------------------------------

const FILTERS = ["customer_id", "feature", "model"];

export async function overview(params) {
  const range = params.range || "7d";
  const granularity = params.granularity || (range === "24h" ? "hour" : "day");
  const filters = Object.fromEntries(FILTERS.filter((f) => params[f]).map((f) => [f, params[f]]));
  const q = { ...bounds(params, "7d"), ...filters };
  const [series, totals, byModel, byFeature] = await Promise.all([
    api.get("/v1/usage", { ...q, granularity }),
    api.get("/v1/usage", { ...q, granularity: "total" }),
    api.get("/v1/usage", { ...q, granularity: "total", group_by: "model" }),
    api.get("/v1/usage", { ...q, granularity: "total", group_by: "feature" }),
  ]);
  const t = totals.body.rows[0];
  const out = [h("h1", {}, "Overview"), rangeNote(totals.body.range)];
  out.push(h("div", { class: "controls" }, rangePicker("/overview", params, "7d"),
    select("By", "granularity", [["hour", "Hour"], ["day", "Day"]], "/overview", params, granularity)));
  const chips = Object.entries(filters).map(([k, v]) => h("a", { class: "button secondary", href: href("/overview", withParams(params, { [k]: null })), title: "Remove this filter" }, `${k} = ${v} ✕`));
  if (chips.length) out.push(h("p", {}, "Filtered: ", chips));
  if (!t) {
    out.push(empty("No usage in this range. Events appear here within seconds of being posted to /v1/events."));
    return out;
  }
  out.push(h("div", { class: "cards", id: "overview-totals" },
    card("Cost", money(t.cost_usd), "cost_usd"), card("Revenue", money(t.revenue_usd), "revenue_usd"), card("Margin", money(t.margin_usd), "margin_usd"),
    card("Events", count(t.events), "events"), card("Tokens", count(tokensOf(t)), "tokens")));
  if (t.unpriced_events > 0) {
    out.push(h("p", { class: "notice", id: "unpriced" }, h("span", { class: "badge warn" }, "Unpriced"), " ",
      exact(countText(t.unpriced_events), t.unpriced_events), " events had no cost and no catalog price: their cost counts as $0."));
  }
  const rows = series.body.rows;
  const times = rows.map((r) => Date.parse(r.window_start) / 1000);
  const num = (k) => rows.map((r) => Number(r[k]));
  const moneyChart = h("div", { class: "panel", id: "overview-chart" });
  const tokenChart = h("div", { class: "panel", id: "overview-tokens-chart" });
  out.push(h("h2", {}, `Cost, revenue and margin per ${granularity}`), moneyChart, h("h2", {}, `Tokens and events per ${granularity}`), tokenChart);
  // Charts need their container's width: draw once the view is in the page.
  const span = secs(totals.body.range);
  const draw = () => {
    lineChart(moneyChart, times, [{ label: "Cost", values: num("cost_usd") }, { label: "Revenue", values: num("revenue_usd") }, { label: "Margin", values: num("margin_usd") }], span);
    lineChart(tokenChart, times, [{ label: "Tokens", values: rows.map(tokensOf) }, { label: "Events", values: num("events") }], { ...span, money: false });
  };
  const by = (label, key, answer) => {
    const list = answer.body.rows.slice().sort((a, b) => Number(b.cost_usd) - Number(a.cost_usd));
    const cols = [
      { label, cell: (r) => (r[key] ? h("a", { href: href("/overview", withParams(params, { [key]: r[key] })) }, r[key]) : "(none)") },
      ...MONEY_COLUMNS, ...COUNT_COLUMNS,
      { label: "Unpriced", num: true, cell: (r) => (r.unpriced_events > 0 ? h("span", { class: "badge warn" }, count(r.unpriced_events)) : "0") },
    ];
    return h("div", { class: "panel" }, h("h2", {}, "By " + label.toLowerCase()), list.length ? table("by-" + key, cols, list) : empty("None."));
  };
  out.push(h("div", { class: "grid2" }, by("Model", "model", byModel), by("Feature", "feature", byFeature)));
  return { nodes: out, after: draw };
}

// ---- Top spenders -----------------------------------------------------------

const METRICS = [["cost", "Cost"], ["revenue", "Revenue"], ["margin", "Margin"], ["tokens", "Tokens"]];
const SORT_VALUE = { cost: (r) => Number(r.cost_usd), revenue: (r) => Number(r.revenue_usd), margin: (r) => Number(r.margin_usd), tokens: tokensOf, events: (r) => r.events, share: (r) => Number(r.share ?? 0) };

function sorter(path, params, rows) {
  const sort = params.sort ? { key: params.sort, dir: params.dir === "asc" ? "asc" : "desc" } : { key: null, dir: "desc" };
  sort.go = (key, dir) => { location.hash = href(path, withParams(params, { sort: key, dir })); };
  if (sort.key && SORT_VALUE[sort.key]) {
    const f = SORT_VALUE[sort.key];
    rows.sort((a, b) => (sort.dir === "asc" ? f(a) - f(b) : f(b) - f(a)));
  }
  return sort;
}

export async function topSpenders(params) {
  const by = params.by === "customer_id" ? "customer_id" : "user_id";
  const metric = params.metric || "cost";
  const { body } = await api.get("/v1/top-spenders", { ...bounds(params, "30d"), by, metric, order: params.order, limit: params.limit || 100 });
  const path = "/top-spenders";
  const out = [h("h1", {}, "Top spenders"), rangeNote(body.range)];
  out.push(h("div", { class: "controls" }, rangePicker(path, params, "30d"),
    select("Who", "by", [["user_id", "Users"], ["customer_id", "Customers"]], path, params, "user_id"),
    select("Ranked by", "metric", METRICS, path, params, "cost"),
    select("Order", "order", [["desc", "Highest first"], ["asc", "Lowest first"]], path, params, "desc")));
  out.push(h("div", { class: "cards" }, card("Total cost", money(body.total.cost_usd)), card("Total revenue", money(body.total.revenue_usd)),
    card("Total margin", money(body.total.margin_usd)), card("Total tokens", count(tokensOf(body.total)))));
  if (!body.rows.length) {
    out.push(empty("Nobody has spent anything in this range."));
    return out;
  }
  const rows = body.rows.map((r, i) => ({ ...r, rank: i + 1 }));
  const sort = sorter(path, params, rows);
  const who = (r) => {
    const id = r[by];
    if (by === "user_id") return userLink(id, params);
    if (!id) return h("span", { class: "subject" }, "(no customer)");
    return h("a", { class: "subject", href: href("/overview", { range: params.range, from: params.from, to: params.to, customer_id: id }) }, id);
  };
  const share = (r) => h("div", { title: r.share === null ? "no total" : r.share }, percentText(r.share),
    h("div", { class: "bar" }, h("span", { style: `width:${Math.max(0, Math.min(100, Number(r.share ?? 0) * 100))}%` })));
  const cols = [{ label: "#", num: true, cell: (r) => String(r.rank) }, { label: by === "user_id" ? "User" : "Customer", cls: "who", cell: who },
    { label: `Share of ${metric}`, sortKey: "share", cell: share }, ...MONEY_COLUMNS, ...COUNT_COLUMNS];
  out.push(h("div", { class: "panel" }, table("top-spenders", cols, rows, { sort })));
  if (body.truncated) out.push(h("p", { class: "sub" }, `Showing the top ${rows.length}; more exist.`));
  return out;
}

// ---- Money-losing users -------------------------------------------------------

export async function losing(params) {
  const by = params.by === "customer_id" ? "customer_id" : "user_id";
  const all = params.all === "1";
  const { body } = await api.get("/v1/margins", { ...bounds(params, "30d"), group_by: by, negative_only: all ? undefined : "true", limit: 200 });
  const path = "/losing";
  const out = [h("h1", {}, "Money-losing " + (by === "user_id" ? "users" : "customers")), rangeNote(body.range)];
  out.push(h("div", { class: "controls" }, rangePicker(path, params, "30d"),
    select("Who", "by", [["user_id", "Users"], ["customer_id", "Customers"]], path, params, "user_id"),
    select("Show", "all", [["0", "Only those losing money"], ["1", "Everyone, lowest margin first"]], path, params, "0")));
  out.push(h("div", { class: "cards" },
    card("Losing money", exact(String(body.negative_margin_groups), body.negative_margin_groups), "negative"),
    card("Total margin", money(body.total.margin_usd)), card("Total revenue", money(body.total.revenue_usd)), card("Total cost", money(body.total.cost_usd))));
  if (!body.rows.length) {
    out.push(empty(all ? "No usage in this range." : "Nobody is losing money in this range."));
    return out;
  }
  const rows = body.rows.slice();
  const sort = sorter(path, params, rows);
  const who = (r) => (by === "user_id" ? userLink(r.user_id, params) : h("a", { href: href("/overview", { range: params.range, customer_id: r.customer_id || undefined }) }, r.customer_id || "(no customer)"));
  const cols = [{ label: by === "user_id" ? "User" : "Customer", cell: who }, ...MONEY_COLUMNS,
    { label: "Margin %", num: true, cell: (r) => h("span", { class: Number(r.margin_pct) < 0 ? "neg" : undefined, title: r.margin_pct ?? "no revenue" }, r.margin_pct === null ? "no revenue" : Number(r.margin_pct).toFixed(1) + "%") },
    ...COUNT_COLUMNS];
  out.push(h("div", { class: "panel" }, table("losing", cols, rows, { sort })));
  if (body.truncated) out.push(h("p", { class: "sub" }, `Showing ${rows.length}; more exist.`));
  return out;
}

// ---- Runaway alerts -------------------------------------------------------------

function alertTable(id, alerts, params, withUser = true) {
  const cols = [
    ...(withUser ? [{ label: "User", cell: (a) => userLink(a.user_id, params) }] : []),
    { label: "State", cell: (a) => h("span", { class: "badge " + (a.state === "open" ? "open" : "") }, a.state) },
    { label: "Rule", cell: (a) => a.rule },
    { label: "Observed", num: true, cell: (a) => money(a.observed_usd) },
    { label: "Threshold", num: true, cell: (a) => money(a.threshold_usd) },
    { label: "Window", num: true, cell: (a) => exact(durationText(a.window_secs), a.window_secs + " s") },
    { label: "Opened", cell: (a) => timeText(a.opened_at) },
    { label: "Updated", cell: (a) => timeText(a.updated_at) },
    { label: "Resolved", cell: (a) => timeText(a.resolved_at) },
  ];
  return table(id, cols, alerts, { rowClass: (a) => (a.state === "open" ? "open" : undefined) });
}

export async function alerts(params) {
  const path = "/alerts";
  const { body } = await api.get("/v1/alerts", { ...bounds(params, "30d"), state: params.state || "all", rule: params.rule, limit: 200, cursor: params.cursor });
  const out = [h("h1", {}, "Runaway alerts"), rangeNote(body.range)];
  out.push(h("div", { class: "controls" }, rangePicker(path, params, "30d"),
    select("State", "state", [["all", "Open and resolved"], ["open", "Open"], ["resolved", "Resolved"]], path, params, "all"),
    select("Rule", "rule", [["", "Every rule"], ["absolute", "absolute"], ["peers", "peers"], ["self", "self"], ["margin", "margin"]], path, params, "")));
  const open = body.alerts.filter((a) => a.state === "open");
  const resolved = body.alerts.filter((a) => a.state !== "open");
  out.push(h("h2", {}, "Open ", h("span", { class: "badge " + (open.length ? "open" : "") }, String(open.length))));
  out.push(open.length ? h("div", { class: "panel" }, alertTable("alerts-open", open, params)) : empty("No open alerts."));
  if ((params.state || "all") !== "open") {
    out.push(h("h2", {}, "Resolved"));
    out.push(resolved.length ? h("div", { class: "panel" }, alertTable("alerts-resolved", resolved, params)) : empty("No resolved alerts in this range."));
  }
  if (body.next_cursor) out.push(h("p", { class: "pager" }, h("a", { class: "button secondary", href: href(path, withParams(params, { cursor: body.next_cursor })) }, "Older alerts →")));
  return out;
}

// ---- A user -------------------------------------------------------------------

function limitsPanel(answer) {
  if (answer.status === 404) return empty("This server does not serve limits (the limits service does, over Redis); nothing to show here.");
  if (answer.status === 403) return empty("This key may not read limits.");
  if (answer.status === 503) return empty("The limits store is not answering right now.");
  const limits = answer.body.limits || [];
  if (!limits.length) return empty(`On plan “${answer.body.plan}”, which sets no limits.`);
  const amount = (l, v) => (l.measure === "cost_usd" || l.measure === "cost" ? money(v) : exact(v, v));
  const cols = [
    { label: "Limit", cell: (l) => l.name },
    { label: "Plan", cell: (l) => l.plan },
    { label: "Measure", cell: (l) => l.measure + " / " + l.period },
    { label: "Limit", num: true, cell: (l) => amount(l, l.limit) },
    { label: "Used", num: true, cell: (l) => amount(l, l.used) },
    { label: "Reserved", num: true, cell: (l) => amount(l, l.reserved) },
    { label: "Remaining", num: true, cell: (l) => amount(l, l.remaining) },
    { label: "Resets", cell: (l) => timeText(l.resets_at) },
    { label: "", cell: (l) => (l.exhausted ? h("span", { class: "badge open" }, "exhausted") : l.hard ? "hard" : "soft") },
  ];
  return h("div", {}, h("p", { class: "sub" }, `Plan “${answer.body.plan}”`), table("user-limits", cols, limits, { rowClass: (l) => (l.exhausted ? "open" : undefined) }));
}

export async function user(id, params) {
  const path = "/user/" + encodeURIComponent(id);
  const range = bounds(params, "month");
  const [statement, trail, userAlerts, limits] = await Promise.all([
    api.get(`/v1/users/${encodeURIComponent(id)}/usage`, range),
    api.get("/v1/events", { ...range, user_id: id, limit: 50, cursor: params.cursor }),
    api.get("/v1/alerts", { state: "all", user_id: id, limit: 100 }),
    api.get(`/v1/users/${encodeURIComponent(id)}/limits`, {}, { allow: [403, 404, 503] }),
  ]);
  const s = statement.body;
  const t = s.totals;
  const out = [h("h1", {}, "User ", h("code", {}, id)), rangeNote(s.range), h("div", { class: "controls" }, rangePicker(path, params, "month"))];
  out.push(h("div", { class: "cards", id: "user-totals" },
    card("Cost", money(t.cost_usd), "cost_usd"), card("Revenue", money(t.revenue_usd), "revenue_usd"), card("Margin", money(t.margin_usd), "margin_usd"),
    card("Events", count(t.events), "events"), card("Tokens", count(tokensOf(t)), "tokens")));
  const open = userAlerts.body.alerts.filter((a) => a.state === "open");
  if (open.length) out.push(h("p", { class: "state error" }, `${open.length} open runaway alert${open.length > 1 ? "s" : ""} for this user (see below).`));
  const daily = h("div", { class: "panel", id: "user-chart" });
  out.push(h("h2", {}, "Daily"), s.daily.length ? daily : empty("No usage in this range."));
  const byCols = (label, key) => [{ label, cell: (r) => r[key] || "(none)" }, ...MONEY_COLUMNS, ...COUNT_COLUMNS];
  out.push(h("div", { class: "grid2" },
    h("div", { class: "panel" }, h("h2", {}, "By feature"), s.by_feature.length ? table("user-by-feature", byCols("Feature", "feature"), s.by_feature) : empty("None.")),
    h("div", { class: "panel" }, h("h2", {}, "By model"), s.by_model.length ? table("user-by-model", byCols("Model", "model"), s.by_model) : empty("None."))));
  out.push(h("h2", {}, "Limits"), h("div", { class: "panel" }, limitsPanel(limits)));
  out.push(h("h2", {}, "Alerts"), userAlerts.body.alerts.length ? h("div", { class: "panel" }, alertTable("user-alerts", userAlerts.body.alerts, params, false)) : empty("No alerts for this user in the last 30 days."));
  const events = trail.body.events;
  const evCols = [
    { label: "Time", cell: (e) => timeText(e.timestamp) },
    { label: "Key", cell: (e) => h("code", {}, e.idempotency_key) },
    { label: "Feature", cell: (e) => e.feature },
    { label: "Model", cell: (e) => e.model },
    { label: "Customer", cell: (e) => e.customer_id || "—" },
    { label: "Tokens", num: true, cell: (e) => count(tokensOf(e)) },
    { label: "Cost", num: true, cell: (e) => money(e.cost_usd) },
    { label: "Source", cell: (e) => (e.cost_source === "unpriced" ? h("span", { class: "badge warn" }, "unpriced") : e.cost_source) },
    { label: "Revenue", num: true, cell: (e) => money(e.revenue_usd) },
  ];
  out.push(h("h2", {}, "Audit trail"), events.length ? h("div", { class: "panel" }, table("user-events", evCols, events)) : empty("No events in this range."));
  const pager = h("p", { class: "pager" });
  if (params.cursor) pager.append(h("a", { class: "button secondary", href: href(path, withParams(params, { cursor: null })) }, "← Newest"));
  if (trail.body.next_cursor) pager.append(h("a", { class: "button secondary", id: "events-next", href: href(path, withParams(params, { cursor: trail.body.next_cursor })) }, "Older events →"));
  out.push(pager);
  const draw = () => {
    if (!s.daily.length) return;
    const times = s.daily.map((r) => Date.parse(r.window_start) / 1000);
    lineChart(daily, times, [{ label: "Cost", values: s.daily.map((r) => Number(r.cost_usd)) }, { label: "Revenue", values: s.daily.map((r) => Number(r.revenue_usd)) }], secs(s.range));
  };
  return { nodes: out, after: draw };
}

// ---- Limits -------------------------------------------------------------------

const READS = [
  ["/v1/usage", "Usage over time, by user, customer, feature, model", { granularity: "total" }],
  ["/v1/top-spenders", "Top spenders", { limit: 1 }],
  ["/v1/margins", "Margins", { limit: 1 }],
  ["/v1/alerts", "Runaway alerts", { limit: 1 }],
];

export async function limits(params) {
  const probes = await Promise.all([
    ...READS.map(([path, , q]) => api.get(path, q, { allow: [403, 404] })),
    api.get("/v1/plans", {}, { allow: [403, 404, 503] }),
    api.get("/v1/limits/nearest", { limit: 20 }, { allow: [403, 404, 503] }),
  ]);
  const nearest = probes.pop();
  const plans = probes.pop();
  const out = [h("h1", {}, "Limits"), h("p", { class: "sub" }, "Plans and their limits, who is nearest their caps, and what the signed-in read key can see.")];
  const lookup = h("input", { id: "limits-user", type: "text", placeholder: "user id", "aria-label": "User id", value: params.user || "" });
  const go = (e) => {
    e.preventDefault();
    if (lookup.value.trim()) location.hash = href("/user/" + encodeURIComponent(lookup.value.trim()));
  };
  out.push(h("form", { class: "controls", onsubmit: go }, h("label", {}, "A user's limits (used, reserved, remaining)", lookup), h("button", { type: "submit" }, "Show")));
  const rows = READS.map(([path, what], i) => ({ path, what, status: probes[i].status }));
  rows.push({ path: "/v1/users/{id}/limits", what: "A user's limits and balances", status: "see the user's page" });
  rows.push({ path: "/v1/plans", what: "Plans and subscriptions", status: plans.status });
  rows.push({ path: "/v1/limits/nearest", what: "Who is nearest their caps", status: nearest.status });
  const cols = [
    { label: "Endpoint", cell: (r) => h("code", {}, r.path) },
    { label: "What", cell: (r) => r.what },
    { label: "This key", cell: (r) => (r.status === 200 ? h("span", { class: "badge" }, "can read") : typeof r.status === "string" ? r.status : h("span", { class: "badge warn" }, r.status === 404 ? "not served here" : "needs another key")) },
  ];
  out.push(h("div", { class: "panel" }, table("key-reach", cols, rows)));
  if (plans.status === 401 || plans.status === 403) {
    out.push(h("p", { class: "notice", id: "plans-need-admin" }, "Plans and subscriptions need an admin key; this dashboard signs in with a read key, so it shows each user's limits on the user's page instead."));
  } else if (plans.status === 200) {
    const list = plans.body.plans || [];
    out.push(h("h2", {}, "Plans"), list.length ? h("div", { class: "panel" }, plansTable(list)) : empty("No plans: every user is on the default plan, which sets no limits."));
  } else if (plans.status === 404) {
    out.push(h("p", { class: "notice" }, "This server does not serve plans: the limits service does."));
  } else if (plans.status === 503) {
    out.push(h("h2", {}, "Plans"), h("p", { class: "state error", id: "plans-unavailable" }, "The limits store is not answering (or this server has none configured)."));
  }
  out.push(h("h2", {}, "Nearest their caps"), h("p", { class: "sub" }, "Users and customers whose usage this period is the largest share of a limit, hard or soft."), nearestPanel(nearest, params));
  return out;
}

/** A limit's amount as an element: money for USD measures, else the exact count; the exact decimal in its title. */
function limitAmount(measure, v) {
  return measure === "cost_usd" || measure === "revenue_usd" ? money(v) : exact(v, v);
}

/** Every plan's limits, one row per limit. */
function plansTable(list) {
  const rows = list.flatMap((p) => ((p.limits || []).length ? p.limits.map((l) => ({ plan: p.plan_id, ...l })) : [{ plan: p.plan_id, none: true }]));
  const filterText = (f) => Object.entries(f || {}).map(([k, v]) => `${k}=${v}`).join(", ") || "all events";
  const cols = [
    { label: "Plan", cell: (r) => h("code", {}, r.plan) },
    { label: "Limit", cell: (r) => (r.none ? "(no limits)" : r.name) },
    { label: "Scope", cell: (r) => r.scope || "" },
    { label: "Measure", cell: (r) => (r.none ? "" : r.measure + " / " + r.period) },
    { label: "Amount", num: true, cell: (r) => (r.none ? "" : limitAmount(r.measure, r.amount)) },
    { label: "Counts", cell: (r) => (r.none ? "" : filterText(r.filter)) },
    { label: "", cell: (r) => (r.none ? "" : r.hard ? "hard" : "soft") },
  ];
  return table("plans", cols, rows);
}

/** `/v1/limits/nearest`'s answer as a table, or why there is none. */
function nearestPanel(answer, params) {
  if (answer.status === 404) return empty("This server does not rank limits (the limits service does, over Redis).");
  if (answer.status === 403) return empty("This key may not read limits.");
  if (answer.status === 503) return h("p", { class: "state error", id: "nearest-unavailable" }, "The limits store is not answering (or this server has none configured).");
  const subjects = answer.body.subjects || [];
  if (!subjects.length) return empty("Nobody has used any of a limit this period.");
  const cols = [
    { label: "Subject", cell: (r) => (r.scope === "user" ? userLink(r.subject_id, params) : h("code", { class: "subject" }, r.subject_id)) },
    { label: "Scope", cell: (r) => r.scope },
    { label: "Limit", cell: (r) => `${r.name} (${r.plan})` },
    { label: "Used", num: true, cell: (r) => limitAmount(r.measure, r.used) },
    { label: "Of", num: true, cell: (r) => limitAmount(r.measure, r.limit) },
    { label: "Share", num: true, cell: (r) => exact(percentText(r.ratio), r.ratio) },
    { label: "Reserved", num: true, cell: (r) => limitAmount(r.measure, r.reserved) },
    { label: "Remaining", num: true, cell: (r) => limitAmount(r.measure, r.remaining) },
    { label: "Resets", cell: (r) => timeText(r.resets_at) },
    { label: "", cell: (r) => (r.exhausted ? h("span", { class: "badge open" }, "exhausted") : r.hard ? "hard" : "soft") },
  ];
  return h("div", { class: "panel" }, table("nearest", cols, subjects, { rowClass: (r) => (r.exhausted ? "open" : undefined) }));
}

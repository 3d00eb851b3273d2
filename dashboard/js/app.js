// Starts the dashboard: signs in (by form or by #key=), routes the URL's hash to a view, shows loading and errors.

import * as api from "./api.js";
import * as views from "./views.js";
import { dropCharts } from "./chart.js";

const { h } = views;
const main = document.getElementById("main");
const nav = document.getElementById("nav");
const signOutButton = document.getElementById("sign-out");
let generation = 0;

// A machine-readable "this view's data is in": the dashboard benchmark
// (bench/src/bin/dashboard-bench.rs) and tests wait on it instead of guessing
// from elements. After a view's API calls resolved and it rendered (charts
// included), body[data-loaded] becomes "<view>:<sequence>" (":error" appended
// when it failed), and window.__meterlineTimings gets {view, seq, ms, route_ms}:
// ms from the document's navigation start, route_ms from this route's start.
window.__meterlineTimings = window.__meterlineTimings || [];
let loadedSeq = 0;
function markLoaded(view, routeStarted, failed) {
  const now = performance.now();
  const seq = ++loadedSeq;
  window.__meterlineTimings.push({ view, seq, ms: now, route_ms: now - routeStarted, failed: !!failed });
  document.body.dataset.loaded = view + ":" + seq + (failed ? ":error" : "");
}

/** The hash as a view path and its parameters: "#/top-spenders?range=7d" -> ["/top-spenders", {range: "7d"}]. */
function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/overview";
  const [path, search = ""] = raw.split("?");
  return [path, Object.fromEntries(new URLSearchParams(search))];
}

function signInForm(message) {
  generation++;
  dropCharts();
  nav.hidden = true;
  signOutButton.hidden = true;
  document.title = "Sign in · Meterline";
  const input = h("input", { id: "signin-key", type: "password", autocomplete: "off", spellcheck: "false", required: true });
  const error = message ? h("p", { class: "state error", id: "signin-error", role: "alert" }, message) : null;
  const submit = async (e) => {
    e.preventDefault();
    const k = input.value.trim();
    const problem = await api.check(k);
    if (problem) return signInForm(problem);
    api.signIn(k);
    if (!location.hash || location.hash === "#") location.hash = "#/overview";
    else route();
  };
  main.replaceChildren(h("form", { class: "signin", id: "signin", onsubmit: submit },
    h("h1", {}, "Sign in"),
    h("p", { class: "sub" }, "With a read key of your tenant. It stays in this browser tab (sessionStorage) and goes only to this server's API."),
    h("label", { for: "signin-key" }, "Read key"), input,
    h("button", { type: "submit" }, "Sign in"), error));
  input.focus();
}

const ROUTES = [
  [/^\/overview$/, "overview", "Overview", (m, p) => views.overview(p)],
  [/^\/top-spenders$/, "top-spenders", "Top spenders", (m, p) => views.topSpenders(p)],
  [/^\/losing$/, "losing", "Money-losing users", (m, p) => views.losing(p)],
  [/^\/alerts$/, "alerts", "Runaway alerts", (m, p) => views.alerts(p)],
  [/^\/limits$/, "limits", "Limits", (m, p) => views.limits(p)],
  [/^\/user\/(.+)$/, "user", "User", (m, p) => views.user(decodeURIComponent(m[1]), p)],
];

async function route() {
  if (!api.key()) return signInForm();
  const [path, params] = parseHash();
  const found = ROUTES.map(([re, id, title, render]) => [path.match(re), id, title, render]).find(([m]) => m);
  const mine = ++generation;
  const routeStarted = performance.now();
  delete document.body.dataset.loaded;
  dropCharts();
  nav.hidden = false;
  signOutButton.hidden = false;
  for (const a of nav.querySelectorAll("a")) a.setAttribute("aria-current", found && a.dataset.view === found[1] ? "page" : "false");
  if (!found) {
    main.replaceChildren(h("p", { class: "state error" }, "No such view. ", h("a", { href: "#/overview" }, "Go to the overview.")));
    return;
  }
  const [match, , title, render] = found;
  document.title = title + " · Meterline";
  main.replaceChildren(h("p", { class: "state loading", id: "loading", "aria-live": "polite" }, "Loading…"));
  try {
    const result = await render(match, params);
    if (mine !== generation) return; // a newer navigation won
    const { nodes, after } = Array.isArray(result) ? { nodes: result, after: null } : result;
    main.replaceChildren(...nodes);
    main.dataset.view = found[1];
    if (after) after();
    markLoaded(found[1], routeStarted, false);
  } catch (e) {
    if (mine !== generation) return;
    markLoaded(found[1], routeStarted, true);
    if (e instanceof api.AuthError) {
      api.signOut();
      return signInForm(e.status === 401
        ? "Your key was refused: it is wrong, revoked or expired. Sign in again."
        : "This key may not read usage (" + e.message + "). Sign in with a read key.");
    }
    main.replaceChildren(h("div", { class: "state error", id: "view-error", role: "alert" },
      h("p", {}, "Could not load this view: " + e.message + (e.code ? ` (${e.code})` : "")),
      h("button", { type: "button", onclick: route }, "Retry")));
  }
}

signOutButton.addEventListener("click", () => {
  api.signOut();
  signInForm();
});

/** `#key=<read key>` signs in directly; the key then leaves the address bar and history. */
async function takeKey() {
  const m = location.hash.match(/^#key=(.+)$/);
  if (!m) return route();
  const k = decodeURIComponent(m[1]);
  history.replaceState(null, "", location.pathname + location.search + "#/overview");
  const problem = await api.check(k);
  if (problem) {
    api.signOut();
    return signInForm(problem);
  }
  api.signIn(k);
  route();
}

window.addEventListener("hashchange", async () => {
  await takeKey();
  main.focus({ preventScroll: true });
});
takeKey();


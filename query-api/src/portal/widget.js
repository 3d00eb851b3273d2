/*! Meterline usage widget: served at /widget.js by the all-in-one binary and
 * the query API. Plain JavaScript, no dependencies.
 *
 *   <div id="usage"></div>
 *   <script src="https://METERLINE_HOST/widget.js" data-token="PORTAL_TOKEN" data-target="usage"></script>
 *
 * Attributes: data-token (required: a portal token), data-target (required:
 * the id of the element to render into), data-unit (noun for event-count
 * limits, default "events"), data-limit (render only the limit with this
 * name), data-api (the Meterline origin; default: this script's origin).
 * The target gets data-meterline-state="loading|ok|unavailable" and a
 * "meterline:rendered" event once drawn. Style with CSS variables on it or
 * any ancestor: --meterline-bar-color, --meterline-over-color,
 * --meterline-track-color, --meterline-bar-height, --meterline-bar-radius,
 * --meterline-text-color, --meterline-font, --meterline-font-size,
 * --meterline-gap. Money is formatted from the API's exact decimal strings.
 */
(function () {
  "use strict";

  var PERIOD = { minute: "this minute", hour: "this hour", day: "today", month: "this month", cycle: "this billing period" };
  var NOUN = {
    input_tokens: "input tokens", output_tokens: "output tokens", cached_input_tokens: "cached input tokens",
    reasoning_tokens: "reasoning tokens", total_tokens: "tokens", credits: "credits"
  };

  // Adds one to a string of decimal digits.
  function increment(digits) {
    var out = "", carry = 1;
    for (var i = digits.length - 1; i >= 0; i--) {
      var d = digits.charCodeAt(i) - 48 + carry;
      carry = d > 9 ? 1 : 0;
      out = String(d % 10) + out;
    }
    return carry ? "1" + out : out;
  }

  function group(whole) {
    return whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  }

  // "3.415000001" -> "$3.42": rounded half up on the digits themselves, so
  // no binary float ever touches an amount.
  function formatMoney(text) {
    var m = /^(-?)(\d+)(?:\.(\d+))?$/.exec(String(text));
    if (!m) return "$" + text;
    var frac = (m[3] || "") + "000";
    var digits = m[2] + frac.slice(0, 2);
    if (frac.charAt(2) >= "5") digits = increment(digits);
    digits = digits.replace(/^0+/, "");
    while (digits.length < 3) digits = "0" + digits;
    var zero = /^0+$/.test(digits);
    if (zero && /[1-9]/.test(m[2] + (m[3] || ""))) return (m[1] ? "-" : "") + "<$0.01";
    return (m[1] && !zero ? "-" : "") + "$" + group(digits.slice(0, -2)) + "." + digits.slice(-2);
  }

  // Counts ("1234" -> "1,234") and credits ("12.500000000" -> "12.5").
  function formatNumber(text) {
    var m = /^(-?)(\d+)(?:\.(\d*?)0*)?$/.exec(String(text));
    if (!m) return String(text);
    return m[1] + group(m[2]) + (m[3] ? "." + m[3] : "");
  }

  function periodWords(period, answer) {
    if (period === "cycle" && answer.period && answer.period.kind !== "cycle") return PERIOD.month;
    return PERIOD[period] || "this " + period;
  }

  // One limit as a sentence: "$3.42 used this month, $1.58 remaining" or
  // "7 of 10 generations today".
  function describe(limit, answer, unit) {
    var when = periodWords(limit.period, answer);
    if (limit.measure === "cost_usd" || limit.measure === "revenue_usd") {
      var over = String(limit.remaining).charAt(0) === "-";
      return formatMoney(limit.used) + " used " + when + ", " +
        (over ? formatMoney(limit.overage) + " over the limit" : formatMoney(limit.remaining) + " remaining");
    }
    var noun = limit.measure === "events" ? (unit || "events") : (NOUN[limit.measure] || limit.measure);
    return formatNumber(limit.used) + " of " + formatNumber(limit.limit) + " " + noun + " " + when;
  }

  function percent(used, limit) {
    var u = Number(used), l = Number(limit);
    if (!(l > 0)) return u > 0 ? 100 : 0;
    return Math.max(0, Math.min(100, Math.round((u / l) * 1000) / 10));
  }

  function el(tag, cls, style) {
    var node = document.createElement(tag);
    node.className = cls;
    if (style) node.setAttribute("style", style);
    return node;
  }

  function row(text, pct, exhausted) {
    var box = el("div", "meterline-limit", "margin-bottom:var(--meterline-gap,4px)");
    var label = el("div", "meterline-text", "color:var(--meterline-text-color,inherit);font-family:var(--meterline-font,inherit);font-size:var(--meterline-font-size,14px);margin-bottom:var(--meterline-gap,4px)");
    label.textContent = text;
    box.appendChild(label);
    if (pct !== null) {
      var bar = el("div", "meterline-bar", "background:var(--meterline-track-color,#e6e6e6);height:var(--meterline-bar-height,8px);border-radius:var(--meterline-bar-radius,4px);overflow:hidden");
      bar.setAttribute("role", "progressbar");
      bar.setAttribute("aria-valuemin", "0");
      bar.setAttribute("aria-valuemax", "100");
      bar.setAttribute("aria-valuenow", String(pct));
      bar.setAttribute("aria-label", text);
      var color = exhausted ? "var(--meterline-over-color,#d93025)" : "var(--meterline-bar-color,#2f6fed)";
      bar.appendChild(el("div", "meterline-fill", "height:100%;width:" + pct + "%;background:" + color));
      box.appendChild(bar);
    }
    box.setAttribute("data-exhausted", exhausted ? "true" : "false");
    return box;
  }

  function finish(target, state) {
    target.setAttribute("data-meterline-state", state);
    if (typeof CustomEvent === "function") target.dispatchEvent(new CustomEvent("meterline:rendered", { detail: { state: state } }));
  }

  // Draws `answer` (a /v1/portal/usage body) into `target`.
  function render(target, answer, options) {
    options = options || {};
    var root = el("div", "meterline-usage");
    var limits = (answer.limits || []).filter(function (l) { return !options.limit || l.name === options.limit; });
    limits.forEach(function (l) {
      var node = row(describe(l, answer, options.unit), percent(l.used, l.limit), !!l.exhausted);
      node.setAttribute("data-limit", l.name);
      root.appendChild(node);
    });
    if (!limits.length) {
      var kind = answer.period && answer.period.kind === "cycle" ? PERIOD.cycle : PERIOD.month;
      root.appendChild(row(formatMoney(answer.totals ? answer.totals.cost_usd : "0") + " used " + kind, null, false));
    }
    target.textContent = "";
    target.appendChild(root);
    finish(target, "ok");
  }

  function unavailable(target) {
    var note = el("span", "meterline-unavailable", "color:var(--meterline-text-color,inherit);opacity:0.6;font-family:var(--meterline-font,inherit);font-size:var(--meterline-font-size,14px)");
    note.textContent = "unavailable";
    target.textContent = "";
    target.appendChild(note);
    finish(target, "unavailable");
  }

  window.MeterlineWidget = { render: render, describe: describe, formatMoney: formatMoney, formatNumber: formatNumber };

  var script = document.currentScript;
  if (!script || !script.getAttribute("data-token")) return;
  var target = document.getElementById(script.getAttribute("data-target") || "");
  if (!target) {
    if (window.console) console.warn("meterline widget: no element with id " + script.getAttribute("data-target"));
    return;
  }
  var api = script.getAttribute("data-api") || new URL(script.src, document.baseURI).origin;
  var options = { unit: script.getAttribute("data-unit"), limit: script.getAttribute("data-limit") };
  target.setAttribute("data-meterline-state", "loading");
  fetch(api + "/v1/portal/usage", { headers: { Authorization: "Bearer " + script.getAttribute("data-token") }, credentials: "omit" })
    .then(function (response) {
      if (!response.ok) throw new Error("HTTP " + response.status);
      return response.json();
    })
    .then(function (answer) { render(target, answer, options); })
    .catch(function () { unavailable(target); });
})();

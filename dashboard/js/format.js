// Formats the API's exact numbers for people, keeping the exact value in a hover title.
// Money arrives as exact decimal strings; it is rounded here with BigInt
// arithmetic on nano-dollars, never through a float, so $0.005 rounds as a
// bookkeeper would.

const NANOS = 1_000_000_000n;

/** The nano-dollars in a decimal string ("-12.3456" -> -12345600000n). */
export function nanos(text) {
  const s = String(text ?? "0").trim();
  const negative = s.startsWith("-");
  const [whole, frac = ""] = s.replace(/^[-+]/, "").split(".");
  const value = BigInt(whole || "0") * NANOS + BigInt((frac + "000000000").slice(0, 9));
  return negative ? -value : value;
}

function groups(digits) {
  return digits.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

/** "$1,234.57" from "1234.567"; amounts under a cent keep their first digits. */
export function moneyText(text) {
  const n = nanos(text);
  const negative = n < 0n;
  const abs = negative ? -n : n;
  let body;
  if (abs !== 0n && abs < 10_000_000n) {
    // Under a cent: six decimals (AI calls often cost fractions of a cent).
    const micros = (abs + 500n) / 1000n;
    body = micros === 0n ? "<0.000001" : "0." + String(micros).padStart(6, "0").replace(/0+$/, "");
  } else {
    const cents = (abs + 5_000_000n) / 10_000_000n;
    body = groups(String(cents / 100n)) + "." + String(cents % 100n).padStart(2, "0");
  }
  return (negative ? "-$" : "$") + body;
}

/** "1.2M" from 1234567; exact below a thousand. */
export function countText(value) {
  const n = Number(value ?? 0);
  const abs = Math.abs(n);
  const units = [[1e12, "T"], [1e9, "B"], [1e6, "M"], [1e3, "k"]];
  for (const [size, suffix] of units) {
    if (abs >= size) {
      const scaled = n / size;
      return (abs >= size * 100 ? scaled.toFixed(0) : scaled.toFixed(1).replace(/\.0$/, "")) + suffix;
    }
  }
  return String(n);
}

/** "12.3%" from a share "0.123456". */
export function percentText(share) {
  if (share === null || share === undefined) return "—";
  return (Number(share) * 100).toFixed(1) + "%";
}

/** An element showing `shown` with `exact` on hover. */
export function exact(shown, exactValue, tag = "span") {
  const el = document.createElement(tag);
  el.textContent = shown;
  el.title = String(exactValue);
  el.dataset.exact = String(exactValue);
  return el;
}

/** Money as an element: the rounded text, the exact decimal in its title, red if negative. */
export function money(text) {
  const el = exact(moneyText(text), (text ?? "0") + " USD");
  el.dataset.exact = String(text ?? "0");
  if (nanos(text) < 0n) el.className = "neg";
  return el;
}

/** A count (events, tokens) as an element: "1.2M" with the exact count in its title. */
export function count(value) {
  const el = exact(countText(value), groups(String(value ?? 0)));
  el.dataset.exact = String(value ?? 0);
  return el;
}

/** "2026-11-27 14:05 UTC" from an RFC 3339 time. */
export function timeText(rfc3339) {
  if (!rfc3339) return "—";
  return rfc3339.replace("T", " ").replace(/:\d\d(\.\d+)?Z$/, " UTC");
}

/** "1 h" / "5 min" / "30 s" from seconds. */
export function durationText(secs) {
  if (secs % 86400 === 0) return secs / 86400 + " d";
  if (secs % 3600 === 0) return secs / 3600 + " h";
  if (secs % 60 === 0) return secs / 60 + " min";
  return secs + " s";
}

/** The tokens of a row of sums, as the API's `metric=tokens` ranks them: all four kinds. */
export function tokensOf(row) {
  return ["input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens"].reduce((sum, k) => sum + Number(row[k] ?? 0), 0);
}

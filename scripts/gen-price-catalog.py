#!/usr/bin/env python3
"""Generate the versioned model price catalog from litellm's price map.

Usage:
    gen-price-catalog.py LITELLM_JSON OUT_CATALOG_JSON [LITELLM_VERSION]

LITELLM_JSON is litellm's model_prices_and_context_window(_backup).json
(MIT License, https://github.com/BerriAI/litellm). If LITELLM_VERSION is not
given it is read from the litellm-*.dist-info/METADATA that sits next to the
litellm package directory (i.e. an unpacked wheel).

Per-token USD floats are converted to exact per-million-token decimal strings
via decimal.Decimal(repr(x)) * 1000000, so no binary float drift is introduced.
Values are printed in plain (non-exponent) notation. Meterline holds prices as
integer nano-USD per million tokens, so a value with more than 9 decimal places
(a float artefact in the source, such as 2.9999900000000002) is rounded half-even
to 9 places; the generator prints how many were.

Python 3.11, stdlib only.
"""

import datetime
import decimal
import glob
import json
import math
import os
import sys

FORMAT_VERSION = 1
RETRIEVED = "2026-11-23"
UNIT = "USD per 1,000,000 tokens"
MODES = {"chat", "completion", "responses"}
SKIP_KEYS = {"sample_spec"}

# catalog field -> litellm field
FIELDS = {
    "input": "input_cost_per_token",
    "output": "output_cost_per_token",
    "cached_input": "cache_read_input_token_cost",
    "reasoning": "output_cost_per_reasoning_token",
}
REQUIRED = ("input", "output")

MILLION = decimal.Decimal(1000000)
ROUNDED = [0]


def is_number(x):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    return not (isinstance(x, float) and not math.isfinite(x))


def per_million(x):
    """Exact per-million-token decimal string for a per-token number."""
    with decimal.localcontext() as ctx:
        ctx.prec = 100  # far more than any float repr needs; no rounding
        d = (decimal.Decimal(repr(x)) * MILLION).normalize()
        q = d.quantize(decimal.Decimal("1e-9"), rounding=decimal.ROUND_HALF_EVEN)
        if q != d:
            ROUNDED[0] += 1
        d = q.normalize()
    if d == 0:
        return "0"
    s = format(d, "f")
    assert "e" not in s.lower(), s
    return s


def detect_version(json_path):
    pkg_dir = os.path.dirname(os.path.abspath(json_path))
    root = os.path.dirname(pkg_dir)
    for meta in sorted(glob.glob(os.path.join(root, "litellm-*.dist-info", "METADATA"))):
        with open(meta, encoding="utf-8") as f:
            for line in f:
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
                if not line.strip():
                    break
    sys.exit(
        "error: cannot determine litellm version; pass it as the third argument"
    )


def build(prices):
    models = {}
    skipped = {"mode": 0, "costs": 0, "not_object": 0}
    for key, entry in prices.items():
        if key in SKIP_KEYS:
            continue
        if not isinstance(entry, dict):
            skipped["not_object"] += 1
            continue
        mode = entry.get("mode")
        # Entries without a mode are provider size tiers, not models.
        if mode not in MODES:
            skipped["mode"] += 1
            continue
        if not all(is_number(entry.get(FIELDS[f])) for f in REQUIRED):
            skipped["costs"] += 1
            continue
        model = {}
        for out_field, src_field in FIELDS.items():
            value = entry.get(src_field)
            if value is None:
                continue
            if not is_number(value):
                print(
                    f"warning: {key}: {src_field}={value!r} is not a number; omitted",
                    file=sys.stderr,
                )
                continue
            model[out_field] = per_million(value)
        provider = entry.get("litellm_provider")
        if isinstance(provider, str):
            model["provider"] = provider
        models[key] = model
    return models, skipped


def render(header, models):
    """JSON text with the header fields first and one model per line."""
    dump = lambda v: json.dumps(v, ensure_ascii=False)  # noqa: E731
    lines = ["{"]
    for k, v in header.items():
        lines.append(f"  {dump(k)}: {dump(v)},")
    lines.append('  "models": {')
    items = sorted(models.items())
    for i, (k, v) in enumerate(items):
        sep = "," if i < len(items) - 1 else ""
        body = json.dumps(v, ensure_ascii=False, sort_keys=True, separators=(", ", ": "))
        lines.append(f"    {dump(k)}: {body}{sep}")
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) not in (3, 4):
        sys.exit(__doc__)
    src, out = argv[1], argv[2]
    version = argv[3] if len(argv) == 4 else detect_version(src)

    with open(src, encoding="utf-8") as f:
        prices = json.load(f)

    models, skipped = build(prices)
    today = datetime.date.today().isoformat()
    header = {
        "format_version": FORMAT_VERSION,
        "catalog_version": f"{today}-litellm-{version}",
        "source": (
            f"litellm {version} model_prices_and_context_window.json "
            "(MIT License, https://github.com/BerriAI/litellm), "
            f"PyPI wheel litellm-{version}"
        ),
        "retrieved": RETRIEVED,
        "unit": UNIT,
    }
    text = render(header, models)
    json.loads(text)  # sanity: output must be valid JSON

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)

    print(
        f"included {len(models)} models; skipped {sum(skipped.values())} "
        f"(mode: {skipped['mode']}, missing/non-numeric input/output cost: "
        f"{skipped['costs']}, non-object: {skipped['not_object']}); "
        f"excluded keys: {', '.join(sorted(SKIP_KEYS))}; "
        f"rounded to 9 decimal places: {ROUNDED[0]}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main(sys.argv)

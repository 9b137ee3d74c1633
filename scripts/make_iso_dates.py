"""Generate velotune's bundled demo dataset: dates written in many styles -> ISO 8601 (YYYY-MM-DD).

SmolLM2-135M-Instruct answers these with prose and often the wrong digits; a short LoRA run teaches it the
exact format. Deterministic: `python scripts/make_iso_dates.py` rewrites velotune/datasets/iso_dates*.jsonl.
"""

import calendar
import json
import random
from pathlib import Path

MONTHS = list(calendar.month_name)[1:]
ABBR = list(calendar.month_abbr)[1:]
ORD = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd", 31: "st"}
STYLES = [
    lambda y, m, d: f"{MONTHS[m - 1]} {d}, {y}",
    lambda y, m, d: f"{d} {MONTHS[m - 1]} {y}",
    lambda y, m, d: f"{ABBR[m - 1]} {d} {y}",
    lambda y, m, d: f"the {d}{ORD.get(d, 'th')} of {MONTHS[m - 1]}, {y}",
    lambda y, m, d: f"{MONTHS[m - 1]} {d}{ORD.get(d, 'th')} {y}",
]
ASKS = [
    "Convert this date to ISO 8601 format (YYYY-MM-DD): {}",
    "Write {} as an ISO date.",
    "What is {} in YYYY-MM-DD form?",
    "ISO 8601 date for: {}",
]


def rows(n: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(n):
        y, m = rng.randint(1950, 2049), rng.randint(1, 12)
        d = rng.randint(1, calendar.monthrange(y, m)[1])
        text = rng.choice(STYLES)(y, m, d)
        out.append({"instruction": rng.choice(ASKS).format(text), "output": f"{y:04d}-{m:02d}-{d:02d}"})
    return out


def main() -> None:
    rng = random.Random(20261123)
    data = rows(640, rng)
    root = Path(__file__).resolve().parents[1] / "velotune" / "datasets"
    for name, part in (("iso_dates.jsonl", data[:600]), ("iso_dates_eval.jsonl", data[600:])):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in part))


if __name__ == "__main__":
    main()

"""Generate velotune's bundled preference demo: date-conversion requests with a correct ISO 8601 answer (chosen) and
a plausible wrong one (rejected).

The prompts are those of the SFT demo (scripts/make_iso_dates.py). Rejected answers are what SmolLM2-135M-Instruct
gets wrong: most often the date echoed back as it was asked (which the base model rates above the ISO answer about
half the time), or restated in a sentence, in slashes, or as an ISO date with the month and day swapped, the wrong
year or the wrong day (which it already rates below the right one; they keep the digits honest). Measured on the
held-out pairs, the base model prefers the chosen answer in about two pairs of three (sum of the answer's token
log-probs). Deterministic: `python scripts/make_preference_dates.py` rewrites velotune/datasets/iso_dates_pref*.jsonl.
"""

import calendar
import json
import random
from pathlib import Path

from make_iso_dates import ASKS, STYLES


def iso(y: int, m: int, d: int) -> str:
    return f"{y:04d}-{m:02d}-{d:02d}"


def swapped(y: int, m: int, d: int, rng: random.Random) -> str:
    """Month and day swapped (YYYY-DD-MM); when the day is no month, or both are equal, another month."""
    if d <= 12 and d != m:
        return iso(y, d, m)
    return iso(y, rng.choice([k for k in range(1, 13) if k != m]), d)


def wrong_year(y: int, m: int, d: int, rng: random.Random) -> str:
    """The year off by one or ten, or in the other century."""
    other = rng.choice([y - 1, y + 1, y - 10, y + 10, y + 100 if y < 2000 else y - 100])
    return iso(other, m, min(d, calendar.monthrange(other, m)[1]))  # 29 February only where it exists


def wrong_day(y: int, m: int, d: int, rng: random.Random) -> str:
    """The day off by one (or two)."""
    days = calendar.monthrange(y, m)[1]
    return iso(y, m, rng.choice([k for k in (d - 2, d - 1, d + 1, d + 2) if 1 <= k <= days]))


def slashes(y: int, m: int, d: int, rng: random.Random) -> str:
    """US or European slashes."""
    return rng.choice([f"{m:02d}/{d:02d}/{y}", f"{d:02d}/{m:02d}/{y}"])


def echo(text: str, rng: random.Random) -> str:
    """The date given back as it was asked, the base model's most likely wrong answer."""
    return rng.choice([text, f"{text}."])


def restated(text: str, rng: random.Random) -> str:
    return f"The date is {text}."


# Rejected answers by kind, in twentieths: half the date echoed back, which the base model prefers to the ISO answer
# about half the time; the rest other formats and ISO-shaped dates with wrong digits, which it mostly gets right.
PROSE, DIGITS = (echo, restated), (slashes, swapped, wrong_year, wrong_day)
MIX = [echo] * 10 + [restated] * 3 + [slashes] * 3 + [swapped] * 2 + [wrong_year, wrong_day]


def pairs(n: int, rng: random.Random, seen: set[tuple[int, int, int]]) -> list[dict]:
    """n pairs of dates not in `seen` (which they are added to), rejected answers cycling through MIX."""
    out = []
    while len(out) < n:
        y, m = rng.randint(1950, 2049), rng.randint(1, 12)
        d = rng.randint(1, calendar.monthrange(y, m)[1])
        if (y, m, d) in seen:
            continue
        seen.add((y, m, d))
        text = rng.choice(STYLES)(y, m, d)
        kind = MIX[len(out) % len(MIX)]
        rejected = kind(text, rng) if kind in PROSE else kind(y, m, d, rng)
        out.append({"prompt": rng.choice(ASKS).format(text), "chosen": iso(y, m, d), "rejected": rejected})
    return out


def main() -> None:
    rng = random.Random(20261218)
    seen: set[tuple[int, int, int]] = set()
    train, held_out = pairs(400, rng, seen), pairs(40, rng, seen)
    root = Path(__file__).resolve().parents[1] / "velotune" / "datasets"
    for name, part in (("iso_dates_pref.jsonl", train), ("iso_dates_pref_eval.jsonl", held_out)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in part))


if __name__ == "__main__":
    main()

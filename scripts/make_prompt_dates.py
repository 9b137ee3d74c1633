"""Generate velotune's bundled GRPO demo: the SFT demo's date-conversion requests as prompts, with their ISO 8601 date
as the answer column a reward function checks (velotune.train.rewards.iso_date).

Each row is {"prompt": [{"role": "user", "content": instruction}], "answer": output}, one per row of
velotune/datasets/iso_dates.jsonl and iso_dates_eval.jsonl, in their order. Deterministic:
`python scripts/make_prompt_dates.py` rewrites velotune/datasets/iso_dates_prompts*.jsonl.
"""

import json
from pathlib import Path

PAIRS = (("iso_dates.jsonl", "iso_dates_prompts.jsonl"), ("iso_dates_eval.jsonl", "iso_dates_prompts_eval.jsonl"))


def prompt_row(row: dict) -> dict:
    return {"prompt": [{"role": "user", "content": row["instruction"]}], "answer": row["output"]}


def main() -> None:
    root = Path(__file__).resolve().parents[1] / "velotune" / "datasets"
    for source, target in PAIRS:
        rows = [json.loads(line) for line in (root / source).read_text().splitlines() if line.strip()]
        (root / target).write_text("".join(json.dumps(prompt_row(r)) + "\n" for r in rows))


if __name__ == "__main__":
    main()

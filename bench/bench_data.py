"""Tokenization throughput and memory: N generated alpaca rows through build_datasets, cold and from the cache.

    python bench/bench_data.py                 # 1,000,000 rows
    python bench/bench_data.py --rows 200000 --num_proc 2

Rows are short (an instruction of 5-15 words, an output of 5-30), tokenized with the embedded SmolLM2 tokenizer
and its chat template (responses masked). Reports rows/s (wall and per CPU-second, which is what an idle machine
would give when other processes share the cores), tokens/s, peak RSS while tokenizing, the cache size, and the
time to load the same data again from the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = (
    "the of and to in is was for on that with as by at from his it an were are which this be or has had but not "
    "what all when there can more if about out so up said one time new year work data model train test"
).split()


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            instruction = " ".join(rng.choices(WORDS, k=rng.randint(5, 15))).capitalize() + "?"
            output = " ".join(rng.choices(WORDS, k=rng.randint(5, 30))).capitalize() + "."
            f.write(json.dumps({"instruction": instruction, "input": "", "output": output}) + "\n")


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last reset_peak() (Linux), else since it started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def directory_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--num_proc", type=int, default=1)
    parser.add_argument("--max_seq_length", type=int, default=2048)
    parser.add_argument("--workdir", default=None, help="where the data and cache go (default: a temporary dir)")
    args = parser.parse_args()

    from velotune.cli.data import load_tokenizer
    from velotune.data import DataConfig, build_datasets

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"alpaca_{args.rows}.jsonl"
    if not data.exists():
        t = time.perf_counter()
        generate(data, args.rows)
        print(f"generated {args.rows:,} rows ({data.stat().st_size / 2**20:.0f} MB) in {time.perf_counter() - t:.1f} s")
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    tokenizer = load_tokenizer(None)
    cfg = DataConfig(path=str(data), max_seq_length=args.max_seq_length, cache_dir=str(cache), num_proc=args.num_proc)
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; num_proc {args.num_proc}")

    reset_peak()
    before = peak_rss_mb()
    cpu, wall = time.process_time(), time.perf_counter()
    train, _ = build_datasets(cfg, tokenizer, progress=sys.stderr.isatty())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu += children.ru_utime + children.ru_stime
    s = train.stats
    print(f"cold: {s.rows_read:,} rows, {s.tokens:,} tokens in {wall:.1f} s")
    print(f"  {s.rows_read / wall:,.0f} rows/s, {s.tokens / wall:,.0f} tokens/s (wall)")
    print(f"  {s.rows_read / cpu:,.0f} rows per CPU-second ({cpu:.1f} CPU-seconds, all threads and processes)")
    print(f"  peak RSS {peak_rss_mb():,.0f} MB ({before:,.0f} MB before tokenizing)")
    print(f"  cache {directory_mb(cache):,.0f} MB at {cache}")

    reset_peak()
    wall = time.perf_counter()
    again, _ = build_datasets(cfg, tokenizer, progress=False)
    wall = time.perf_counter() - wall
    assert again.stats.cache_hit and len(again) == len(train)
    print(f"cached: {wall:.2f} s to load {len(again):,} examples; peak RSS {peak_rss_mb():,.0f} MB")
    wall = time.perf_counter()
    n = min(len(again), 100_000)
    tokens = sum(len(again[i]["input_ids"]) for i in range(n))
    wall = time.perf_counter() - wall
    print(f"reading examples: {n / wall:,.0f} examples/s ({tokens:,} tokens)")
    print(train.report())
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

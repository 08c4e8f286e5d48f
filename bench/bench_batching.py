"""How full the token-budget micro-batches are, and how much of them is padding, by data-set size and padding
multiple: on the CPU, through the same data preparation and TokenBudgetBatches that train_unsloth.py uses, on the
generated sets bench_train.py trains on. The GPU's time grows with the padded tokens of a step, its output with the
real ones, so these shares carry over to real tokens/s.

    python bench/bench_batching.py                        # 250 and 2,000 rows, multiples 1, 8, 16, 64
    python bench/bench_batching.py --rows 8000 --multiple 8   # sample_rows makes at most 8,836 different rows

Prints a markdown table for bench/RESULTS.md.
"""

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora import fixtures  # noqa: E402  (after the path insert, like the scripts it measures)
from qlora.batching import TokenBudgetBatches, padded  # noqa: E402
from qlora.config import Config  # noqa: E402
from qlora.data import load_prepared  # noqa: E402
from qlora.prepare import prepare_dataset  # noqa: E402
import standins  # noqa: E402

SETS = {"guanaco_shaped": standins.guanaco_shaped_rows, "sample": fixtures.sample_rows}


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[250, 2000], help="rows of each generated set")
    parser.add_argument("--multiple", type=int, nargs="+", default=[1, 8, 16, 64], help="pad_to_multiple_of values")
    parser.add_argument("--budget", type=int, default=12288, help="padded tokens a micro-batch (the default plan's)")
    return parser.parse_args()


def lengths_of(name: str, rows: int, workdir: Path) -> list[int]:
    """Token lengths of the training rows, prepared as train_unsloth.py prepares them (real Mistral tokenizer)."""
    data = fixtures.write_jsonl(workdir / f"{name}-{rows}.jsonl", SETS[name](rows))
    config = Config(dataset=str(data), model_name=str(workdir / fixtures.TINY_MODEL), eval_fraction=0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        prepare_dataset(config, workdir / f"{name}-{rows}")
    return [len(ids) for ids in load_prepared(workdir / f"{name}-{rows}")["train"]["input_ids"]]


def epoch_shares(lengths: list[int], budget: int, multiple: int) -> dict:
    batches = TokenBudgetBatches(lengths, budget, seed=0, multiple=multiple).batches()
    padded_tokens = sum(len(b) * max(padded(lengths[i], multiple) for i in b) for b in batches)
    real_tokens = sum(lengths[i] for b in batches for i in b)
    return {"batches": len(batches), "filled": padded_tokens / (len(batches) * budget),
            "padding": 1 - real_tokens / padded_tokens, "real_per_batch": real_tokens / len(batches)}


def main():
    args = parse()
    print("| data | rows | pad multiple | micro-batches an epoch | budget filled | padding "
          "| real tokens a micro-batch |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        fixtures.build(workdir)
        for name in SETS:
            for rows in args.rows:
                lengths = lengths_of(name, rows, workdir)
                for multiple in args.multiple:
                    s = epoch_shares(lengths, args.budget, multiple)
                    print(f"| {name} | {len(lengths):,} | {multiple} | {s['batches']} | {s['filled']:.0%} | "
                          f"{s['padding']:.1%} | {s['real_per_batch']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()

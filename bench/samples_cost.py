"""What the samples during training cost (train_unsloth.py --sample_count), from two runs that differ only in it.

    python bench/samples_cost.py RUN_WITH RUN_WITHOUT [--default_eval_steps 100]

Both runs evaluate at the same steps; the samples' time per evaluation is the difference of their wall times (from
the start of training to its end, metrics.json's wall_time_s) over the evaluations the run with samples made (each
holds one sample round, the start's included). Its share of a run at the default evaluation frequency is that time
over the time of default_eval_steps optimizer steps: the shortest step after the warm-up of the run without samples
(metrics.json's step times run from one step's end to the next, so a step after an evaluation holds it), which
leaves evaluation out of the denominator: the share is if anything overstated. Prints a markdown row for
bench/RESULTS.md.
"""

import argparse
import json
from pathlib import Path


def shortest_step(steps: list[dict], warmup: int) -> float:
    """The shortest time between two optimizer steps' ends after the first `warmup` steps (metrics.json's `steps`:
    seconds since training started at each step's end)."""
    ends = [s["seconds"] for s in steps[warmup - 1:]]
    return min(b - a for a, b in zip(ends, ends[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("with_samples", type=Path)
    parser.add_argument("without_samples", type=Path)
    parser.add_argument("--default_eval_steps", type=int, default=100, help="save_steps' default, which eval_steps "
                        "follows")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    with_, without = (json.loads((run / "metrics.json").read_text()) for run in (args.with_samples,
                                                                                 args.without_samples))
    rounds = len(with_["samples"])
    per_round = (with_["wall_time_s"] - without["wall_time_s"]) / rounds
    step = shortest_step(without["steps"], args.warmup)
    share = per_round / (args.default_eval_steps * step)
    print("| steps | evaluations | wall with / without samples | samples a round | s a step | share at every "
          f"{args.default_eval_steps} steps |")
    print("|---|---|---|---|---|---|")
    print(f"| {with_['global_step']} | {rounds} | {with_['wall_time_s']:.1f} / {without['wall_time_s']:.1f} s | "
          f"{per_round:.1f} s | {step:.2f} s | {share:.1%} |")


if __name__ == "__main__":
    main()

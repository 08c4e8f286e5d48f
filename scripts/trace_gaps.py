"""Where the GPU waits: the idle gaps between kernels in a torch profiler trace, and the host code behind each.

    python train_unsloth.py ... --profile_steps 3          # writes output_dir/profile.trace.json.gz (with stacks)
    python scripts/trace_gaps.py OUTPUT_DIR/profile.trace.json.gz

For every gap of at least --min_ms between GPU work, the host code that ran between the start of the gap and the launch
of the kernel that ended it (the innermost Python frame covering most of that time, with its callers); gaps are summed
by that code. Then every host synchronisation (cudaStreamSynchronize, cudaDeviceSynchronize, a blocking copy) with its
Python stack, since each one drains the GPU's queue before the host goes on.
"""

import argparse
import bisect
import collections
import gzip
import itertools
import json
import sys

GPU = {"kernel", "gpu_memcpy", "gpu_memset"}
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cuStreamSynchronize")


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def busy_intervals(kernels: list[dict]) -> list[tuple[float, float]]:
    merged = []
    for e in sorted(kernels, key=lambda e: e["ts"]):
        start, end = e["ts"], e["ts"] + e.get("dur", 0)
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class Frames:
    """The Python frames of the trace (with_stack=True): innermost frame covering a time window, and its callers."""

    def __init__(self, events: list[dict]):
        self.frames = sorted((e for e in events if e.get("cat") == "python_function"), key=lambda e: e["ts"])
        self.by_id = {e["args"].get("Python id"): e for e in self.frames}
        self.starts = [e["ts"] for e in self.frames]

    def covering(self, start: float, end: float, share: float = 0.5) -> dict | None:
        """The shortest frame that overlaps at least `share` of [start, end]."""
        best = None
        for e in self.frames[:bisect.bisect_right(self.starts, end)]:
            overlap = min(end, e["ts"] + e["dur"]) - max(start, e["ts"])
            if overlap >= share * (end - start) and (best is None or e["dur"] < best["dur"]):
                best = e
        return best

    def stack(self, frame: dict | None, depth: int) -> list[str]:
        names = []
        while frame is not None and len(names) < depth:
            names.append(frame["name"])
            frame = self.by_id.get(frame["args"].get("Python parent id"))
        return names


def idle_by_code(events: list[dict], kernels: list[dict], busy, frames: Frames, min_ms: float, depth: int):
    """Idle microseconds of every gap of at least `min_ms`, summed by the host code that ran until the launch of the
    kernel that ended the gap (the innermost frame covering most of that time, with its callers)."""
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    kernels = sorted(kernels, key=lambda e: e["ts"])
    starts = [e["ts"] for e in kernels]
    by_code = collections.Counter()
    for (_, gap_start), (gap_end, _) in itertools.pairwise(busy):
        if gap_end - gap_start < min_ms * 1e3:
            continue
        kernel = kernels[bisect.bisect_left(starts, gap_end)]  # the kernel that ended the gap
        launch = launches.get(kernel["args"].get("correlation"))
        host_end = launch["ts"] if launch and launch["ts"] > gap_start else gap_end
        frame = frames.covering(gap_start, host_end)
        key = " <- ".join(frames.stack(frame, depth)) if frame else f"(no Python frame) before {kernel['name'][:60]}"
        by_code[key] += gap_end - gap_start
    return by_code


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", help="profile.trace.json(.gz) from --profile_steps")
    parser.add_argument("--min_ms", type=float, default=0.2, help="smallest gap to attribute")
    parser.add_argument("--depth", type=int, default=4, help="Python frames shown per gap or synchronisation")
    args = parser.parse_args()

    events = load(args.trace)
    kernels = [e for e in events if e.get("cat") in GPU]
    if not kernels:
        sys.exit(f"{args.trace}: no GPU kernels in this trace (a run on the CPU has no idle GPU to explain)")
    busy, frames = busy_intervals(kernels), Frames(events)
    span = busy[-1][1] - busy[0][0]
    work = sum(b - a for a, b in busy)
    print(f"GPU span {span / 1e3:.1f} ms, busy {work / 1e3:.1f} ms ({work / span:.1%}), {len(kernels)} kernels")

    by_code = idle_by_code(events, kernels, busy, frames, args.min_ms, args.depth)
    print(f"idle {(span - work) / 1e3:.1f} ms; in gaps of {args.min_ms} ms or more: "
          f"{sum(by_code.values()) / 1e3:.1f} ms\n")
    print("idle ms | host code running while the GPU waited (innermost frame first)")
    for key, total in by_code.most_common(25):
        print(f"{total / 1e3:7.1f} | {key}")

    print("\nhost synchronisations (ms the host waited | Python stack)")
    for e in sorted((e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and e["name"] in SYNCS),
                    key=lambda e: e["ts"]):
        stack = frames.stack(frames.covering(e["ts"], e["ts"] + max(e["dur"], 1), share=1.0), args.depth + 4)
        print(f"{e['dur'] / 1e3:7.1f} | {e['name']} <- " + " <- ".join(stack))


if __name__ == "__main__":
    main()

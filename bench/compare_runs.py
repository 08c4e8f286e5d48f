"""Compare two training output folders: the adapters' tensors (max abs diff) and the exports' verdicts, file by file.

    python bench/compare_runs.py RUN_A RUN_B [--tolerance 1e-6]

Exit 0 when the adapters agree within the tolerance and every exported file has the same verdict; 1 otherwise.
(bench/compare_smoke_run.sh runs the smoke run on two commits and calls this.)
"""

import argparse
import json
import sys
from pathlib import Path

from safetensors.numpy import load_file


def max_abs_diff(a: Path, b: Path) -> float:
    left, right = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    if left.keys() != right.keys():
        sys.exit(f"the adapters hold other tensors: {sorted(left.keys() ^ right.keys())[:5]}")
    return max(float(abs(left[k].astype("float64") - right[k].astype("float64")).max()) for k in left)


def verdicts(run: Path) -> dict[str, str]:
    """Each exported file's verdict as the report table gives it: FAIL, ok, reported or not checked."""
    report = json.loads((run / "export" / "export_report.json").read_text())
    out = {}
    for f in report["files"]:
        if "not_checked" in f:
            out[f["file"]] = "not checked"
        elif f["problems"]:
            out[f["file"]] = "FAIL"
        else:
            out[f["file"]] = "ok" if f.get("strict", True) else "reported"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs=2, type=Path)
    parser.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args()
    a, b = args.runs
    diff = max_abs_diff(a, b)
    va, vb = verdicts(a), verdicts(b)
    print(f"adapter max abs diff: {diff:.3g} (tolerance {args.tolerance:g})")
    for name in sorted(va.keys() | vb.keys()):
        print(f"  {name}: {va.get(name, '-')} / {vb.get(name, '-')}")
    same = diff <= args.tolerance and va == vb
    print("same" if same else "DIFFERENT")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()

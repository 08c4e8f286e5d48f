"""Host time of a bf16 matrix product the first time its shape is seen, against a shape seen before (CUDA).

A training step's micro-batch has a new number of tokens almost every step, so every projection's product has a new
row count M, and the profile (scripts/trace_gaps.py) shows a few products a step costing milliseconds of host time while
the GPU waits. This measures that cost alone, for Mistral-7B's projection shapes. Every shape is tried at the same
`--new` row counts, in the order of SHAPES: the first row of the table is the first product at each new row count;
the later rows meet row counts that an earlier shape already used, and the last repeats the first shape at them.

    python bench/bench_matmul_shapes.py            # the default library (TORCH_BLAS_PREFER_CUBLASLT unset)
    TORCH_BLAS_PREFER_CUBLASLT=1 python bench/bench_matmul_shapes.py
    python bench/bench_matmul_shapes.py --fp32_reduction
    CUBLAS_WORKSPACE_CONFIG=:16:8 python bench/bench_matmul_shapes.py
"""

import argparse
import os
import statistics
import time

import torch

# (K, N) of Mistral-7B's projections (q/o, k/v, gate/up, down) and of a rank-8 LoRA's two factors
SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (4096, 8), (8, 4096), (8, 14336),
          (4096, 4096)]  # again last: is the first shape's cost its own, or the first one's?


def host_ms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Milliseconds the host spends in one product (the GPU drained before and after, so no queue hides it)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.mm(a, b)
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed * 1e3


def products(rows: int, k: int, n: int):
    """The forward product (M x K @ K x N) and the weight-gradient one (K x M @ M x N) for `rows` = M."""
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    return {"forward": (x, w), "weight gradient": (x.t(), grad)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=12288, help="largest M (tokens of a micro-batch)")
    parser.add_argument("--new", type=int, default=10, help="new row counts tried per shape")
    parser.add_argument("--fp32_reduction", action="store_true",
                        help="torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False")
    args = parser.parse_args()
    if args.fp32_reduction:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"{torch.backends.cuda.preferred_blas_library()}, fp32 reduction {args.fp32_reduction}, "
          f"CUBLAS_WORKSPACE_CONFIG {os.environ.get('CUBLAS_WORKSPACE_CONFIG')}")
    print("| product | K x N | first call, new M (median ms) | repeated M (median ms) |\n|---|---|---|---|")
    for k, n in SHAPES:
        new = [products(args.rows - 8 * (i + 1), k, n) for i in range(args.new)]
        for kind in new[0]:
            first = [host_ms(*p[kind]) for p in new]
            again = [host_ms(*new[0][kind]) for _ in range(args.new)]
            print(f"| {kind} | {k} x {n} | {statistics.median(first):.2f} | {statistics.median(again):.3f} |")


if __name__ == "__main__":
    main()

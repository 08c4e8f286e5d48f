"""Speed of the installed llama.cpp build on a q4_k_m file with Mistral-7B's matrices (a few of its 32 layers, random
weights: speed does not depend on the values), to compare builds (scripts/install_llama_cpp.sh's flags, others).

    python bench/bench_llama_cpp.py --workdir /tmp/bllama --layers 4

Prints llama.cpp's system info (the instructions the build uses) and prompt / generation tokens per second.
"""

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    import llama_cpp

    from qlora import probe

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--layers", type=int, default=4, help="of Mistral-7B's 32 (time scales with them)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens, evaluated as one batch")
    parser.add_argument("--generate", type=int, default=32, help="tokens generated one at a time")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    f16, q4 = workdir / f"mistral7b-{args.layers}l-f16.gguf", workdir / f"mistral7b-{args.layers}l-q4_k_m.gguf"
    if not q4.exists():
        probe.write_tiny_gguf(f16, dataclasses.replace(probe.MISTRAL_7B, layers=args.layers))
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        assert llama_cpp.llama_model_quantize(str(f16).encode(), str(q4).encode(), params) == 0
        f16.unlink()
    threads = len(os.sched_getaffinity(0))
    llm = llama_cpp.Llama(str(q4), n_ctx=256, n_batch=256, n_threads=threads, verbose=False)
    prompt = [1] + [300 + i for i in range(args.prompt - 1)]
    llm.eval(prompt[:8])  # warm-up
    llm.reset()
    started = time.perf_counter()
    llm.eval(prompt)
    prompt_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(args.generate):
        llm.eval([300])
    generate_seconds = time.perf_counter() - started
    print(llama_cpp.llama_print_system_info().decode().strip())
    print(f"| llama-cpp-python | layers | threads | prompt tokens/s | generation tokens/s |\n|---|---|---|---|---|\n"
          f"| {llama_cpp.__version__} | {args.layers} of 32 | {threads} | {args.prompt / prompt_seconds:.1f} | "
          f"{args.generate / generate_seconds:.2f} |")


if __name__ == "__main__":
    main()

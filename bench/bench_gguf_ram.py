"""What llama.cpp's greedy check of a GGUF costs when the file does not fit in RAM: a prompt, then one token at a time
(as qlora/gguf_check.py's `gguf_run`), in a child process in a memory cgroup of --ram_gib (page cache included: a
machine with that much RAM), beside the same without a limit. The page cache is dropped before each run, so both read
the file from disk at first.

    python bench/bench_gguf_ram.py --gguf /tmp/bm/export-32/model-f16.gguf --ram_gib 11.7 --tokens 4
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from peak_memory import memory_cgroup  # noqa: E402

PROMPT = [1, 733, 16289, 28793, 1824, 349, 272, 5565, 302, 4843, 28804, 733, 28748, 16289, 28793]  # 15 ids


def decode(gguf: str, tokens: int) -> None:
    """The child: load, evaluate the prompt, then `tokens` greedy tokens one by one; print each phase's seconds."""
    from qlora import gguf_check

    start = time.perf_counter()
    llm = gguf_check.load_gguf(Path(gguf), n_ctx=len(PROMPT) + tokens + 8)
    print(f"load {time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    llm.eval(PROMPT)
    print(f"prompt of {len(PROMPT)} ids {time.perf_counter() - start:.1f} s", flush=True)
    for n in range(tokens):
        start = time.perf_counter()
        llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
        print(f"token {n + 1} {time.perf_counter() - start:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--ram_gib", type=float, required=True)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return decode(args.gguf, args.tokens)
    if not Path(args.gguf).is_file() or args.ram_gib <= 0 or args.tokens < 1:
        parser.error("--gguf names a GGUF file, --ram_gib a limit above 0 GiB, --tokens at least 1")
    size = Path(args.gguf).stat().st_size / 2**30
    for limit in (None, args.ram_gib):
        subprocess.run(["sh", "-c", "sync && echo 1 > /proc/sys/vm/drop_caches"], check=True)
        print(f"== {Path(args.gguf).name} ({size:.1f} GiB), RAM: {'all' if limit is None else f'{limit:g} GiB'}",
              flush=True)
        with memory_cgroup(limit) as (prefix, _):
            subprocess.run(prefix + [sys.executable, __file__, "--gguf", args.gguf, "--tokens", str(args.tokens),
                                     "--ram_gib", str(args.ram_gib), "--child"], check=True, cwd=ROOT)


if __name__ == "__main__":
    main()

"""Generation speed on a CUDA host: Unsloth's fast inference against plain transformers generate, both on the
4-bit (bitsandbytes NF4) Mistral-7B-Instruct-v0.2 architecture, same prompts, batch 1 and batch 8.

    python bench/bench_infer.py --workdir /tmp/bench                 # builds the 7.24 B stand-in (random bf16 weights)
    python bench/bench_infer.py --workdir /tmp/bench --layers 2      # quick check on a 2-layer stand-in
    python bench/bench_infer.py --workdir /tmp/bench --variants unsloth hf hf-bf16   # + unquantized transformers

Speed does not depend on the weight values, so a randomly initialised model with v0.2's exact config stands in for
the real one (the same folder as bench_train.py's). Every answer is exactly --new_tokens long (min_new_tokens: a
random model's EOS does not cut it short). Each variant runs in its own process: Unsloth patches transformers when
imported, and must be imported before it. Prints a markdown table for bench/RESULTS.md.
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {"unsloth": "Unsloth fast inference, 4-bit", "hf": "transformers generate, 4-bit bitsandbytes",
            "hf-bf16": "transformers generate, bf16"}
PROMPTS = ["What is the capital of Arvenia?", "Write a haiku about autumn leaves.", "Explain QLoRA in two sentences.",
           "Count from 1 to 20.", "Reverse the words: apple river stone cloud", "Add 17 and 25.",
           "Give three tips for writing clear commit messages.", "Translate 'good morning' into French and German."]
RESULT = "RESULT "  # the worker's answer line; libraries print their own lines on stdout too


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="scratch folder for the stand-in model and the results")
    parser.add_argument("--model", help="model folder (default: build the 7.24 B stand-in in the workdir)")
    parser.add_argument("--layers", type=int, default=32, help="stand-in layers (fewer for a quick check)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["unsloth", "hf"])
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per answer, exactly")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls per batch size (median kept)")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)  # one variant, in this process
    return parser.parse_args(argv)


# ---------------------------------------------------------------- one variant (its own process)


def load(variant: str, model_dir: Path):
    if variant == "unsloth":
        from unsloth import FastLanguageModel  # first: it patches transformers

        model, _ = FastLanguageModel.from_pretrained(model_name=str(model_dir), load_in_4bit=True, dtype=None,
                                                     max_seq_length=2048)
        FastLanguageModel.for_inference(model)
        return model
    import torch
    from transformers import AutoModelForCausalLM

    from qlora.model import nf4_config

    quantization = nf4_config(torch.bfloat16) if variant == "hf" else None
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=quantization,
                                                device_map={"": 0}).eval()


def batch_inputs(model_dir: Path, batch_size: int):
    """The first `batch_size` prompts as Mistral ids (this project's PromptFormat), left-padded."""
    from qlora.chat import Message, load_prompt_format
    from qlora.engines import left_padded

    fmt = load_prompt_format(model_dir / "tokenizer.model")
    ids = [fmt.prompt_ids([Message("user", PROMPTS[i % len(PROMPTS)])]) for i in range(batch_size)]
    return (*left_padded(ids, fmt.eos, "cuda"), fmt.eos)


def timed_generate(model, input_ids, mask, eos: int, new_tokens: int) -> float:
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=eos, eos_token_id=eos)
    torch.cuda.synchronize()
    assert out.shape[1] - input_ids.shape[1] == new_tokens, "an answer came out shorter than --new_tokens"
    return time.perf_counter() - start


def worker(args) -> None:
    """Load one variant, then per batch size: a warm-up generate, then the timed ones; one JSON line per size."""
    model_dir = Path(args.model)
    model = load(args.worker, model_dir)
    import torch

    for batch_size in args.batch_sizes:
        input_ids, mask, eos = batch_inputs(model_dir, batch_size)
        timed_generate(model, input_ids, mask, eos, min(16, args.new_tokens))  # kernels compiled, caches allocated
        torch.cuda.reset_peak_memory_stats()
        seconds = statistics.median(timed_generate(model, input_ids, mask, eos, args.new_tokens)
                                    for _ in range(args.repeats))
        print(RESULT + json.dumps({"variant": args.worker, "batch": batch_size, "seconds": seconds,
                                   "prompt_tokens": int(mask.sum(1).max()),
                                   "peak_gib": torch.cuda.max_memory_allocated() / 2**30}), flush=True)


# ---------------------------------------------------------------- driver


def run_variant(variant: str, args, model_dir: Path, log: Path) -> list[dict]:
    command = [sys.executable, __file__, "--workdir", args.workdir, "--model", str(model_dir), "--worker", variant,
               "--new_tokens", str(args.new_tokens), "--repeats", str(args.repeats),
               "--batch_sizes", *map(str, args.batch_sizes)]
    result = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    rows = [json.loads(line[len(RESULT):]) for line in result.stdout.splitlines() if line.startswith(RESULT)]
    if result.returncode != 0:
        print(f"  {variant} failed (exit {result.returncode}); see {log}", flush=True)
    return rows


def header(args, model_dir: Path) -> str:
    import torch

    from qlora.report import versions_line

    versions = versions_line(("torch", "transformers", "unsloth", "bitsandbytes"))
    config = json.loads((model_dir / "config.json").read_text())
    return (f"device: {torch.cuda.get_device_name(0)}; date: {time.strftime('%Y-%m-%d')}; python "
            f"{platform.python_version()}; {versions}; model: {config['num_hidden_layers']} layers of "
            f"Mistral-7B-v0.2's architecture; greedy, {args.new_tokens} new tokens per answer, median of "
            f"{args.repeats} after a warm-up")


def table(rows: list[dict], new_tokens: int) -> str:
    head = ("| variant | batch | prompt tokens | s per generate | tokens/s (all answers) | tokens/s per answer "
            "| peak GiB |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        total = r["batch"] * new_tokens / r["seconds"]
        lines.append(f"| {VARIANTS[r['variant']]} | {r['batch']} | {r['prompt_tokens']} | {r['seconds']:.2f} | "
                     f"{total:,.1f} | {total / r['batch']:,.1f} | {r['peak_gib']:.1f} |")
    return "\n".join(lines)


def standin_name(layers: int) -> str:
    """bench_train.py's folder for the full model; a quick check's fewer layers get their own."""
    return "mistral-7b-v0.2-standin" + ("" if layers == 32 else f"-{layers}layers")


def main():
    args = parse()
    if args.worker:
        return worker(args)
    import standins

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else workdir / standin_name(args.layers)
    if not (model_dir / "config.json").exists():
        print(f"building the stand-in ({args.layers} layers) in {model_dir}", flush=True)
        standins.save_standin(model_dir, num_layers=args.layers)
    rows = []
    for variant in args.variants:
        print(f"{variant}: {VARIANTS[variant]}", flush=True)
        rows += run_variant(variant, args, model_dir, workdir / f"bench_infer_{variant}.log")
    (workdir / "bench_infer.json").write_text(json.dumps(rows, indent=2))
    print("\n" + header(args, model_dir) + "\n\n" + table(rows, args.new_tokens))


if __name__ == "__main__":
    main()

"""Export speed at Mistral-7B-Instruct-v0.2's exact size: merge, f16 conversion and q4_k_m quantization, timed through
the same qlora.export functions export_gguf.py runs, on a random bf16 stand-in with a random r=8 adapter; or, with
--adapter_route, the whole `export_gguf.py --lora_only` (adapter.gguf + Modelfile), which needs the base's config alone.

    python bench/bench_export.py                         # 7.24 B: about 50 GB of disk, 16 GB of RAM
    python bench/bench_export.py --adapter_route         # 7.24 B adapter route: about 300 MB of disk, seconds
    python bench/bench_export.py --layers 2              # quick check of the bench itself
    python bench/bench_export.py --workdir /scratch/b    # keep the files there (default: a temporary folder)

Prints markdown table rows for bench/RESULTS.md. Needs llama.cpp's converter (sh scripts/get_llama_cpp_converter.sh).
"""

import argparse
import datetime
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora import export, export_job, fixtures, gguf_convert, hub  # noqa: E402  (after the path insert, like the scripts it benchmarks)
from qlora.chat import find_tokenizer_file, load_prompt_format  # noqa: E402
from qlora.config import LORA_TARGETS  # noqa: E402
from qlora.report import versions_line  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
import standins  # noqa: E402


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="stand-in layers (32: the full 7.24 B model)")
    parser.add_argument("--workdir", help="folder for the stand-in and its exports (default: temporary, removed)")
    parser.add_argument("--adapter_route", action="store_true",
                        help="time export_gguf.py --lora_only instead of the merge route")
    return parser.parse_args()


def build_inputs(workdir: Path, layers: int) -> tuple[Path, Path]:
    """The random stand-in (built in bf16, on the GPU when there is one) and a random r=8 adapter on all projections."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, adapter = workdir / "base", workdir / "adapter"
    if not (base / "config.json").exists():
        standins.save_standin(base, num_layers=layers, device="cuda" if torch.cuda.is_available() else "cpu")
    if not (adapter / "adapter_config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, init_lora_weights=False,
                          task_type="CAUSAL_LM")
        get_peft_model(model, lora).save_pretrained(adapter)
        del model
    return base, adapter


def build_adapter_alone(workdir: Path, layers: int) -> Path:
    """The stand-in's config.json and a random r=8 adapter on all projections, made by PEFT on a model without weights
    (meta device): the adapter route reads the base's config alone."""
    from transformers import MistralConfig

    base = workdir / "base-config"
    config = MistralConfig(**standins.MISTRAL_7B_V02_CONFIG | {"num_hidden_layers": layers},
                           architectures=["MistralForCausalLM"])  # as a checkout's config.json says
    config.save_pretrained(base)
    fixtures.save_tokenizer(base)  # the export writes the chat template of the base's tokenizer beside adapter.gguf
    return standins.save_random_adapter(base, workdir / "adapter-alone")


def bench_adapter_route(workdir: Path, layers: int) -> None:
    from qlora.config import Config

    adapter = build_adapter_alone(workdir, layers)
    out = workdir / "export-adapter"
    config = Config(adapter_dir=str(adapter), export_dir=str(out), lora_only=True,
                    ollama_base="mistral:7b-instruct-v0.2")
    seconds = timed(export.run_export, config)
    n = hub.parameter_count(str(workdir / "base-config"))
    lora = sum(t.numel() for t in load_file(adapter / "adapter_model.safetensors").values())
    rss = [resource.getrusage(who).ru_maxrss / 2**20 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    print("\n| device | date | layers | params | LoRA params | export_gguf.py --lora_only (adapter.gguf + Modelfile) "
          "| adapter.gguf | adapter_model.safetensors | peak RSS (bench / converter) | versions |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {device()} | {datetime.date.today()} | {layers} | {n / 1e9:.2f} B | {lora / 1e6:.1f} M | {seconds:.1f} s "
          f"| {(out / export_job.ADAPTER_GGUF).stat().st_size / 2**20:.1f} MiB "
          f"| {(adapter / 'adapter_model.safetensors').stat().st_size / 2**20:.1f} MiB "
          f"| {rss[0]:.1f} / {rss[1]:.1f} GiB | {versions()} |")


def timed(step, *args) -> float:
    start = time.perf_counter()
    step(*args)
    return time.perf_counter() - start


def device() -> str:
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    gpu = f"{torch.cuda.get_device_name()} + " if torch.cuda.is_available() else ""
    return f"{gpu}{cpu} ({os.cpu_count()} cores)"


def versions() -> str:
    return versions_line(("torch", "transformers", "peft", "llama-cpp-python"))


def bench(workdir: Path, layers: int) -> None:
    converter = gguf_convert.find_converter()
    base, adapter = build_inputs(workdir, layers)
    n = hub.parameter_count(str(base))
    out = workdir / "export"
    merged, f16, q4 = out / "merged", out / "model-f16.gguf", out / "model-q4_k_m.gguf"
    export.check_disk_space(out, {"merged": 2 * n, f16.name: 2 * n,
                                  q4.name: int(n * export_job.GGUF_BITS["q4_k_m"] / 8)})
    # the GGUF's chat template, as the export writes it: llama.cpp adds SentencePiece's space after special tokens
    template = load_prompt_format(find_tokenizer_file(str(base))).chat_template(space_after_special=False)
    seconds = {"merge": timed(export.merge, adapter, str(base), merged),
               "f16": timed(gguf_convert.convert_f16, merged, f16, converter, template),
               "q4_k_m": timed(gguf_convert.quantize, f16, q4, "q4_k_m")}
    rss = [resource.getrusage(who).ru_maxrss / 2**20 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    print("\n| device | date | layers | params | merge (load+merge+save) | f16 conversion | q4_k_m quantization "
          "| f16 file | q4_k_m file | peak RSS (bench / converter) | versions |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {device()} | {datetime.date.today()} | {layers} | {n / 1e9:.2f} B | {seconds['merge']:.0f} s "
          f"| {seconds['f16']:.0f} s | {seconds['q4_k_m']:.0f} s | {f16.stat().st_size / 2**30:.2f} GiB "
          f"| {q4.stat().st_size / 2**30:.2f} GiB | {rss[0]:.1f} / {rss[1]:.1f} GiB | {versions()} |")


if __name__ == "__main__":
    args = parse()
    try:
        run = bench_adapter_route if args.adapter_route else bench
        if args.workdir:
            run(Path(args.workdir), args.layers)
        else:
            with tempfile.TemporaryDirectory(prefix="bench_export-") as tmp:
                run(Path(tmp), args.layers)
    except export_job.ExportError as err:
        sys.exit(f"error: {err}")

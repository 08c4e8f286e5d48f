"""Merge a LoRA adapter into its 16-bit base, write GGUF files (f16 + quantized) and an Ollama Modelfile, and check
each file against the merged model (export_report.json).

    sh scripts/get_llama_cpp_converter.sh     # once: llama.cpp's converter from llama-cpp-python's sdist
    python export_gguf.py --adapter_dir outputs/mistral-qlora --gguf_types f16 q8_0 q4_k_m
    ollama create my-mistral -f outputs/mistral-qlora/export/Modelfile
"""

from qlora.config import EXPORT, parse, show
from qlora.errors import one_line_errors
from qlora.export import run_export
from qlora.export_job import ExportError
from qlora.hub import HubError
from qlora.model import WeightsError
from qlora.runfolder import Locked

if __name__ == "__main__":
    config, _ = parse(EXPORT, __doc__)
    show(config, EXPORT)
    with one_line_errors(ExportError, HubError, WeightsError, Locked):  # and FileNotFoundError, an OSError
        run_export(config)

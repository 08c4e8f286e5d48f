"""Answer prompts with a fine-tuned model: a training output / adapter folder, a merged model folder, a .gguf file, or
a base .gguf with --lora adapter.gguf.

    python infer.py outputs/mistral-qlora --prompt "What is QLoRA?"
    python infer.py outputs/mistral-qlora --chat
    python infer.py outputs/mistral-qlora/export/model-f16.gguf --input prompts.jsonl --output answers.jsonl
    python infer.py mistral-7b-instruct-v0.2.f16.gguf --lora outputs/mistral-qlora/export/adapter.gguf --chat
    python infer.py outputs/mistral-qlora --prompt "..." --compare_base --temperature 0
"""

import sys

from qlora.config import INFER, parse
from qlora.device import BackendError
from qlora.engines import InferError
from qlora.errors import one_line_errors
from qlora.hub import HubError
from qlora.infer import add_arguments, run

if __name__ == "__main__":
    config, args = parse(INFER, __doc__, extra=add_arguments)
    try:
        with one_line_errors(BackendError, HubError, InferError):
            run(config, args)
    except KeyboardInterrupt:
        sys.exit(130)

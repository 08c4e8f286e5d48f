"""Fine-tune Mistral-7B-Instruct with QLoRA: Unsloth's 4-bit model and fused kernels, TRL's SFTTrainer; or tune it
on preference pairs with TRL's DPOTrainer or ORPOTrainer (--method dpo, orpo).

    python train_unsloth.py                              # the default recipe on Guanaco 1k (CUDA GPU)
    python train_unsloth.py --config configs/smoke.yaml  # offline, on a CPU, in minutes
    python train_unsloth.py --config run/config.yaml --resume
    python train_unsloth.py --config configs/dpo.yaml --init_adapter outputs/mistral-qlora --dataset pairs.jsonl
    python train_unsloth.py --config configs/orpo.yaml --dataset pairs.jsonl
"""

import sys

from qlora.config import TRAIN, ConfigError, parse
from qlora.errors import one_line_errors

if __name__ == "__main__":
    config, _ = parse(TRAIN, __doc__)  # printed once resolved: backend, prepared data, the plan (qlora.train)

    from qlora.hub import HubError
    from qlora.device import BackendError, training_backend

    with one_line_errors(BackendError, HubError):
        backend = training_backend(config)  # before any weights are read
        if backend == "unsloth":
            import unsloth  # noqa: F401  (first, so that its patches reach transformers, trl and peft)

    from qlora.data import DataError
    from qlora.errors import RunError
    from qlora.model import WeightsError
    from qlora.train import run

    with one_line_errors(ConfigError, DataError, HubError, RunError, WeightsError):
        sys.exit(run(config, backend))

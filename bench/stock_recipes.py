"""The recipes users start from, as published, measured the same way as ours (bench/bench_train.py runs this).

    notebook   Unsloth's Mistral notebook: FastLanguageModel in 4 bits, LoRA r 16 / alpha 16 / dropout 0 on the 7
               projections, gradient checkpointing "unsloth", TRL SFTTrainer on the `text` column, batch 2 x
               accumulation 4, max_seq_length 2048, adamw_8bit, lr 2e-4, 5 warm-up steps; `--packing` adds TRL packing.
    blog       transformers + bitsandbytes nf4 + PEFT (r 8 / alpha 32 / dropout 0.1), rows rendered as
               "### Instruction: / ### Response:" and padded to 512, Trainer with DataCollatorForLanguageModeling,
               batch 1 x accumulation 8, lr 2e-4, mixed precision.

Writes a metrics.json with the same fields as train_unsloth.py's (steps timeline, padding share, peak memory, loss).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", choices=("notebook", "blog"))
    parser.add_argument("--data", required=True, help="instruction file in any format data_prep reads")
    parser.add_argument("--model", required=True, help="base model folder (bf16 checkpoint)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--out", required=True, help="folder for metrics.json")
    parser.add_argument("--profile_steps", type=int, default=0,
                        help="write profile.txt and profile.trace.json.gz over this many steps")
    return parser.parse_args()


def conversations(path: str):
    from qlora.data import read_records, to_conversation

    return [to_conversation(record, "auto", where) for where, record in read_records(path)]


def notebook(args, meter):
    import unsloth  # noqa: F401  (before trl/transformers, as the notebook does)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(args.model, max_seq_length=2048, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=16, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        random_state=3407)
    texts = [{"text": "".join(f"<s>[INST] {q.content} [/INST] {a.content} </s>" for q, a in zip(c[::2], c[1::2]))}
             for c in conversations(args.data)]
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(texts),
                         callbacks=[meter.callback], args=SFTConfig(
                             dataset_text_field="text", max_length=2048, packing=args.packing,
                             per_device_train_batch_size=2, gradient_accumulation_steps=4, warmup_steps=5,
                             max_steps=args.steps, learning_rate=2e-4, logging_steps=5, optim="adamw_8bit",
                             weight_decay=0.01, lr_scheduler_type="linear", seed=3407, output_dir=args.out,
                             report_to="none", save_strategy="no"))
    return trainer


def blog(args, meter):
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForLanguageModeling,
                              Trainer, TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.eos_token
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant, device_map={"": 0})
    model = get_peft_model(prepare_model_for_kbit_training(model), LoraConfig(
        r=8, lora_alpha=32, lora_dropout=0.1, bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    texts = ["\n\n".join(f"### Instruction:\n{q.content}\n\n### Response:\n{a.content}" for q, a in zip(c[::2], c[1::2]))
             for c in conversations(args.data)]
    rows = Dataset.from_dict(dict(tokenizer(texts, truncation=True, max_length=512, padding="max_length")))
    return Trainer(model=model, train_dataset=rows, callbacks=[meter.callback],
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), args=TrainingArguments(
                       output_dir=args.out, per_device_train_batch_size=1, gradient_accumulation_steps=8,
                       learning_rate=2e-4, max_steps=args.steps, bf16=True, logging_steps=5, report_to="none",
                       save_strategy="no", gradient_checkpointing=True))


def main():
    from qlora.report import Meter, StepProfiler, metrics

    args = parse()
    meter = Meter()
    trainer = (notebook if args.recipe == "notebook" else blog)(args, meter)
    if args.profile_steps:
        trainer.add_callback(StepProfiler(Path(args.out) / "profile.txt", args.profile_steps).callback)
    trainer.data_collator = meter.counting(trainer.data_collator)
    started = time.time()
    trainer.train()
    result = metrics(trainer, meter, time.time() - started)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "metrics.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

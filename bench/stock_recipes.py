"""The recipes users start from, as published, measured the same way as ours (bench/bench_train.py runs this).

    notebook   Unsloth's Mistral notebook: FastLanguageModel in 4 bits, LoRA r 16 / alpha 16 / dropout 0 on the 7
               projections, gradient checkpointing "unsloth", TRL SFTTrainer on the `text` column, batch 2 x
               accumulation 4, max_seq_length 2048, adamw_8bit, lr 2e-4, 5 warm-up steps; `--packing` adds TRL packing.
    blog       transformers + bitsandbytes nf4 + PEFT (r 8 / alpha 32 / dropout 0.1), rows rendered as
               "### Instruction: / ### Response:" and padded to 512, Trainer with DataCollatorForLanguageModeling,
               batch 1 x accumulation 8, lr 2e-4, mixed precision.
    dpo_notebook   Unsloth's Zephyr (7B) DPO notebook (unslothai/notebooks nb/Zephyr_(7B)-DPO.ipynb, 2026-08-18):
               FastLanguageModel in 4 bits with max_seq_length 4096, LoRA r 64 / alpha 64 / dropout 0 on the 7
               projections, gradient checkpointing "unsloth", random_state 3407; rows rendered with the tokenizer's
               chat template as text (prompt with the generation prompt; each answer as the template renders it
               after that prompt); TRL DPOTrainer with ref_model None (the adapter disabled is the reference), batch
               2 x accumulation 4, lr 5e-6, beta 0.1, max_length 1024, adamw_8bit, weight decay 0, linear schedule,
               10% warm-up, seed 42, logging every step, the data shuffled with seed 42.
    orpo_notebook  Unsloth's Llama3 (8B) ORPO notebook (nb/Llama3_(8B)-ORPO.ipynb, the same date): 4 bits with
               max_seq_length 4096, LoRA r 16 / alpha 16 / dropout 0 on the 7 projections, gradient checkpointing
               "unsloth", random_state 3407; prompts in the Alpaca template (the pair's prompt as the instruction, an
               empty input), the EOS token added to each answer; ORPOTrainer with max_length 4096,
               max_completion_length 2048, batch 2 x accumulation 4, beta 0.1, adamw_8bit, linear schedule, logging
               every step, ORPOConfig's defaults for the rest (TRL 1.15's: lr 1e-6, no warm-up, seed 42).

The preference notebooks pin TRL 0.22.2 and transformers 4.56.2; here they run on TRL 1.15 and transformers 5, as
ours does, which takes these changes:
- DPO: beta, max_length, max_prompt_length and the tokenizer went to DPOTrainer itself; beta and max_length are
  DPOConfig's now, the tokenizer is `processing_class`. max_prompt_length (512) is gone from DPOConfig (TRL 0.29;
  the only truncation left is of the whole sequence, keeping its start): dropped, which changes nothing here, as no
  prompt of the pairs reaches 512 tokens (bench/standins.py: at most about 430).
- warmup_ratio 0.1 is gone from transformers 5: warmup_steps 0.1 (a value below 1 is a share of the steps).
- num_train_epochs 3 (DPO) and max_steps 30 (ORPO): max_steps is --steps.
- DPO's data: the notebook renders Zephyr's template; Mistral's refuses the empty system message it inserts and an
  assistant message without a user one before it (roles must alternate), so the system message is left out and each
  answer is the text the template renders after the prompt in the whole exchange (the notebook strips the
  assistant prefix from a rendering of the answer alone: the same text for Zephyr). The rendered prompt begins with
  <s> and TRL 1.15 tokenizes text with the special tokens, so each sequence begins with two BOS tokens (TRL 0.22.2
  tokenized it without them: one); a token a sequence, nothing to the speed.
- ORPO: ORPOConfig and ORPOTrainer moved to trl.experimental.orpo; max_prompt_length (2048) is gone from ORPOConfig:
  dropped (no prompt is near it); max_completion_length stays (TRL 1.15 reads it for encoder-decoder models only).
- PatchDPOTrainer(), which both notebooks call (the DPO one twice), does nothing in Unsloth 2026.10.9 (importing
  unsloth patches the trainers); it is called all the same, once.

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
    parser.add_argument("recipe", choices=RECIPES)
    parser.add_argument("--data", required=True, help="instruction file in any format data_prep reads; for "
                        "dpo_notebook and orpo_notebook, preference pairs ({prompt, chosen, rejected} rows)")
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


def pairs(path: str) -> list[dict]:
    from qlora.data import read_records

    return [{key: record[key] for key in ("prompt", "chosen", "rejected")} for _, record in read_records(path)]


def rendered_pair(tokenizer, row: dict) -> dict:
    """The notebook's apply_chat_template(task="dpo") on Mistral's template: the prompt with the generation prompt,
    each answer as the text the template renders after that prompt."""
    user = {"role": "user", "content": row["prompt"]}
    prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)

    def answer(text: str) -> str:
        whole = tokenizer.apply_chat_template([user, {"role": "assistant", "content": text}], tokenize=False)
        if not whole.startswith(prompt):
            sys.exit("error: the model's chat template renders a prompt differently alone and before an answer")
        return whole[len(prompt):]

    return {"prompt": prompt, "chosen": answer(row["chosen"]), "rejected": answer(row["rejected"])}


def dpo_notebook(args, meter):
    import unsloth  # noqa: F401  (before trl/transformers, as the notebook does)
    from datasets import Dataset
    from unsloth import FastLanguageModel, PatchDPOTrainer

    PatchDPOTrainer()
    model, tokenizer = FastLanguageModel.from_pretrained(args.model, max_seq_length=4096, dtype=None,
                                                         load_in_4bit=True)
    rows = Dataset.from_list([rendered_pair(tokenizer, row) for row in pairs(args.data)]).shuffle(seed=42)
    model = FastLanguageModel.get_peft_model(
        model, r=64, lora_alpha=64, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        random_state=3407, use_rslora=False, loftq_config=None)
    from trl import DPOConfig, DPOTrainer

    return DPOTrainer(model=model, ref_model=None, train_dataset=rows, processing_class=tokenizer,
                      callbacks=[meter.callback], args=DPOConfig(
                          per_device_train_batch_size=2, gradient_accumulation_steps=4, warmup_steps=0.1,
                          max_steps=args.steps, learning_rate=5e-6, logging_steps=1, optim="adamw_8bit",
                          weight_decay=0.0, lr_scheduler_type="linear", seed=42, output_dir=args.out,
                          report_to="none", save_strategy="no", beta=0.1, max_length=1024))


ALPACA_PROMPT = """Below is an instruction that describes a task, paired with an input that provides further context. \
Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""


def orpo_notebook(args, meter):
    import unsloth  # noqa: F401  (before trl/transformers, as the notebook does)
    from datasets import Dataset
    from unsloth import FastLanguageModel, PatchDPOTrainer

    model, tokenizer = FastLanguageModel.from_pretrained(args.model, max_seq_length=4096, dtype=None,
                                                         load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=16, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        random_state=3407, use_rslora=False, loftq_config=None)
    eos = tokenizer.eos_token
    rows = Dataset.from_list([{"prompt": ALPACA_PROMPT.format(row["prompt"], "", ""), "chosen": row["chosen"] + eos,
                               "rejected": row["rejected"] + eos} for row in pairs(args.data)])
    PatchDPOTrainer()
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOTrainer(model=model, train_dataset=rows, processing_class=tokenizer, callbacks=[meter.callback],
                       args=ORPOConfig(
                           max_length=4096, max_completion_length=2048, per_device_train_batch_size=2,
                           gradient_accumulation_steps=4, beta=0.1, logging_steps=1, optim="adamw_8bit",
                           lr_scheduler_type="linear", max_steps=args.steps, output_dir=args.out, report_to="none",
                           save_strategy="no"))


RECIPES = {"notebook": notebook, "blog": blog, "dpo_notebook": dpo_notebook, "orpo_notebook": orpo_notebook}


def main():
    from qlora.report import Meter, StepProfiler, metrics

    args = parse()
    meter = Meter()
    trainer = RECIPES[args.recipe](args, meter)
    if args.profile_steps:
        trainer.add_callback(StepProfiler(Path(args.out) / "profile.txt", args.profile_steps).callback)
    trainer.data_collator = meter.counting(trainer.data_collator)
    started = time.time()
    trainer.train()
    # the trainers' own log too: the preference trainers' reward margins and accuracies are in it
    result = metrics(trainer, meter, time.time() - started) | {"log_history": trainer.state.log_history}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "metrics.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

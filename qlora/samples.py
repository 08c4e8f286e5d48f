"""Samples during training: greedy answers to a few held-out prompts at the start and at each evaluation, so that a
run shows what it learns. The prompts are the first --sample_count rows of the eval split (the prompt part of each
row's ids, its answer the reference) or the file --sample_prompts names; each is rendered by the run's PromptFormat,
the renderer training used. Every sample is printed in one line, kept in metrics.json by step (and in each checkpoint,
so that a resumed run keeps the samples taken before it stopped), and logged to TensorBoard and W&B when --report_to
names them.

Taking samples leaves the training as it was: the model goes back to every module's mode, gradient checkpointing and
use_cache (Unsloth's inference mode and back), and torch's random state is restored, so that a run with samples
trains the adapter a run without them trains. Without an eval split, samples of a --sample_prompts file are taken at
the start, every --eval_steps steps (as --save_steps by default) and at the last step; without either, none.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from . import atomic
from .chat import (END_INST, IGNORE, INST, Conversation, Message, PromptFormat, TextTurns, find_tokenizer_file,
                   load_prompt_format)
from .config import Config
from .data import READERS, DataError, data_format, detect_format, read_records, to_conversation
from .device import compute_dtype, is_main_process
from .engines import GPU_BATCH, left_padded
from .infer import answer_text
from .pairs import PAIR_METHODS, PREFERENCE_FORMATS, PairColumns, is_pair_record, pair_format, to_pair

SAMPLES_STATE = "samples.json"  # in each checkpoint, written by the main process
WIDTH = 120  # of a printed sample line
PROMPT_WIDTH = 32  # of the prompt in it; the answer and the reference share the rest


@dataclass
class Asked:
    """A prompt read from --sample_prompts, before it is rendered: the conversation up to its last user turn."""

    conversation: Conversation
    reference: str | None


@dataclass
class Prompt:
    """A prompt the samples answer: its ids as training renders a row's prompt part, the text of its last user turn
    (what is shown and kept), and the reference answer where there is one."""

    ids: list[int]
    text: str
    reference: str | None


# ---------------------------------------------------------------- the prompts


def read_prompts(config: Config) -> list[Asked]:
    """The prompts of the --sample_prompts file (none without one): a .jsonl, .json, .csv or .parquet file is read
    like a data set (data_prep's readers, the run's --dataset_format and --prompt_field & co.), its rows with answers
    giving references (a preference pair's chosen answer), rows of infer.py's {"prompt": ...} none; any other file holds one prompt a line. Read before the
    run writes anything, so that a bad file is one error line."""
    if not config.sample_prompts:
        return []
    path = Path(config.sample_prompts)
    try:
        if not path.is_file():
            raise DataError(f"{path}: {'is a folder' if path.is_dir() else 'no such file'}")
        if path.suffix.lower() in READERS:
            fmt = pair_format(config) if config.method in PAIR_METHODS else data_format(config)
            asked = [_asked(record, fmt, location) for location, record in read_records(str(path))]
        else:
            asked = _lines(path)
        if not asked:
            raise DataError(f"{path}: no prompts in it")
    except DataError as err:
        raise DataError(f"--sample_prompts {err}") from None
    return asked


def _lines(path: Path) -> list[Asked]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # as data_prep reads: a byte-order mark is not content
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None
    return [Asked([Message("user", line.strip())], None) for line in text.splitlines() if line.strip()]


def _asked(record, fmt, location: str) -> Asked:
    if (isinstance(record, dict) and not is_pair_record(record) and detect_format(record) is None
            and isinstance(record.get("prompt"), str)):
        system = record.get("system")  # infer.py's --input rows
        opening = [Message("system", system.strip())] if isinstance(system, str) and system.strip() else []
        return Asked(opening + [Message("user", record["prompt"].strip())], None)
    pair_formats = isinstance(fmt, PairColumns) or fmt in PREFERENCE_FORMATS
    if pair_formats or is_pair_record(record):  # a preference pair: its chosen answer is the reference
        pair = to_pair(record, fmt if pair_formats else "auto", location)
        return Asked(pair.prompt, pair.chosen)
    conversation = to_conversation(record, fmt, location)
    if not conversation or conversation[-1].role != "assistant":
        raise DataError(f"{location}: no user turn with an answer")
    return Asked(conversation[:-1], conversation[-1].content)


def rendered(asked: list[Asked], fmt: PromptFormat, system_prompt: str | None) -> list[Prompt]:
    """File prompts as training renders a row's prompt part: the run's system prompt first where a row has none."""
    prompts = []
    for one in asked:
        conversation = one.conversation
        if system_prompt and conversation[0].role != "system":
            conversation = [Message("system", system_prompt.strip()), *conversation]
        prompts.append(Prompt(fmt.prompt_ids(conversation), conversation[-1].content, one.reference))
    return prompts


def from_eval_rows(rows, fmt: PromptFormat, count: int) -> list[Prompt]:
    """The first `count` eval rows as prompts: each row's ids before its last answer (the last span of trained
    labels), that answer the reference; a pair's prompt, its chosen answer the reference."""
    prompts = []
    for row in rows.select(range(min(count, len(rows)))):
        if "prompt_ids" in row:  # a preference pair: its chosen answer is the reference
            ids = row["prompt_ids"]
            prompts.append(Prompt(ids, last_user_text(fmt, ids), answer_text(fmt, row["chosen_ids"])))
            continue
        ids, labels = row["input_ids"], row["labels"]
        start = len(labels)
        while start > 0 and labels[start - 1] != IGNORE:
            start -= 1
        if start in (0, len(labels)):  # no prompt (trained whole) or no answer left after truncation
            continue
        prompts.append(Prompt(ids[:start], last_user_text(fmt, ids[:start]), answer_text(fmt, ids[start:])))
    return prompts


def last_user_text(fmt: PromptFormat, ids: list[int]) -> str:
    """The text of the last user turn in a rendered prompt, between the template's markers."""
    opening, closing = ((part.strip() for part in fmt.user_turn.split("{content}")) if isinstance(fmt, TextTurns)
                        else (INST, END_INST))
    text = fmt.decode(ids)
    start = text.rfind(opening)
    return text[start + len(opening):text.rfind(closing)].strip()


# ---------------------------------------------------------------- taking samples


class Samples:
    """Greedy answers to `prompts`, taken by `callback` at the start and at each evaluation (without an eval split:
    every `every` steps and at the last step); `taken` holds them by step."""

    def __init__(self, prompts: list[Prompt], fmt: PromptFormat | None, max_new_tokens: int, backend: str,
                 has_eval: bool, every: int, output_dir: Path):
        from transformers import TrainerCallback

        self.prompts, self.fmt, self.max_new_tokens, self.backend = prompts, fmt, max_new_tokens, backend
        self.output_dir, self.taken, self.writer = Path(output_dir), [], None
        outer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                if not has_eval and state.global_step == 0:
                    outer.take(model, args, state)

            def on_step_end(self, args, state, control, model=None, **kwargs):
                if not has_eval and (state.global_step % every == 0 or state.global_step == state.max_steps):
                    outer.take(model, args, state)

            def on_evaluate(self, args, state, control, model=None, **kwargs):
                outer.take(model, args, state)

        self.callback = Callback()

    @classmethod
    def for_run(cls, config: Config, data, asked: list[Asked], backend: str) -> Samples:
        """The run's samples: of the --sample_prompts file, else of the eval split; none (a callback that does
        nothing) where there is neither or --sample_count is 0."""
        has_eval = "eval" in data
        prompts, fmt = [], None
        if config.sample_count and (asked or has_eval):
            fmt = load_prompt_format(find_tokenizer_file(config.model_name, config.tokenizer_name), config.template)
            prompts = (rendered(asked, fmt, config.system_prompt) if asked
                       else from_eval_rows(data["eval"], fmt, config.sample_count))
        if config.sample_count and not prompts and is_main_process():
            why = ("the eval rows are trained whole (--train_on_prompt), so their prompts cannot be told from their "
                   "answers" if has_eval else "there is no eval split (--eval_fraction 0)")
            print(f"note: no samples during training: {why}; --sample_prompts FILE gives some")
        return cls(prompts, fmt, config.sample_max_new_tokens, backend, has_eval,
                   config.eval_steps or config.save_steps, Path(config.output_dir))

    def take(self, model, args, state) -> None:
        """Answer every prompt (on the main process), print, keep and log the answers at this step."""
        if not self.prompts or not state.is_world_process_zero:
            return
        answers = [answer_text(self.fmt, ids) for ids in self.generate(model)]
        entry = {"step": state.global_step,
                 "answers": [{"prompt": p.text, "answer": a, "reference": p.reference}
                             for p, a in zip(self.prompts, answers)]}
        self.taken.append(entry)
        from tqdm.auto import tqdm

        for answer in entry["answers"]:  # tqdm's write keeps the progress bar below the lines
            tqdm.write(line(entry["step"], answer))
        self.publish(entry, args.report_to)

    def generate(self, model) -> list[list[int]]:
        """Greedy answers (ids up to EOS) to every prompt, in batches of up to GPU_BATCH, left-padded."""
        import torch

        device = model.get_input_embeddings().weight.device
        # on a GPU in the precision the trainer's steps compute in (accelerate's autocast wraps only their forward)
        precision = torch.autocast("cuda", dtype=compute_dtype()) if device.type == "cuda" else nullcontext()
        generated = []
        with answering(model, self.backend), torch.no_grad(), precision:
            for start in range(0, len(self.prompts), GPU_BATCH):
                ids, mask = left_padded([p.ids for p in self.prompts[start:start + GPU_BATCH]], self.fmt.eos, device)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                     do_sample=False, use_cache=True, eos_token_id=self.fmt.eos,
                                     pad_token_id=self.fmt.eos)
                generated += [until_eos(row[ids.shape[1]:].tolist(), self.fmt.eos) for row in out]
        return generated

    def publish(self, entry: dict, report_to: list[str]) -> None:
        """A table of the answers to TensorBoard (a run of its own, `samples`, beside the trainer's) and to W&B."""
        if "tensorboard" in report_to:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                runs = os.environ.get("TENSORBOARD_LOGGING_DIR") or self.output_dir / "runs"
                self.writer = SummaryWriter(log_dir=str(Path(runs) / "samples"))
            self.writer.add_text("samples", markdown(entry["answers"]), entry["step"])
            self.writer.flush()
        if "wandb" in report_to:
            import wandb

            if wandb.run is not None:  # started by transformers' WandbCallback
                rows = [[entry["step"], a["prompt"], a["answer"], a["reference"]] for a in entry["answers"]]
                table = wandb.Table(columns=["step", "prompt", "answer", "reference"], data=rows)
                wandb.log({"samples": table, "train/global_step": entry["step"]})

    def save(self, checkpoint: Path, rank: int) -> None:
        """The samples taken so far into a checkpoint being written (the main process takes them all)."""
        if rank == 0 and self.prompts:
            atomic.write_text(Path(checkpoint) / SAMPLES_STATE, json.dumps(self.taken, ensure_ascii=False))

    def restore(self, checkpoint: Path) -> None:
        """Go on from the samples in `checkpoint` (none in one written without samples or by an older version)."""
        file = Path(checkpoint) / SAMPLES_STATE
        self.taken = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else []


@contextmanager
def answering(model, backend: str):
    """The model set to generate, then put back as training had it: each module's mode and gradient checkpointing,
    the configs' use_cache, torch's random state. On Unsloth through its inference mode and back: for_training also
    drops the copies of the LoRA weights that fast inference makes (`_fast_lora`), stale after the next step; it would
    turn gradient checkpointing on everywhere, hence each module's own put back."""
    import torch

    modules = list(model.modules())
    modes = [m.training for m in modules]
    checkpointing = {m: m.gradient_checkpointing for m in modules if hasattr(m, "gradient_checkpointing")}
    configs = {id(m.config): (m.config, m.config.use_cache) for m in modules
               if hasattr(getattr(m, "config", None), "use_cache")}
    device = model.get_input_embeddings().weight.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if backend == "unsloth":
            from unsloth import FastLanguageModel

            FastLanguageModel.for_inference(model)
        else:
            model.eval()
        try:
            yield
        finally:
            if backend == "unsloth":
                FastLanguageModel.for_training(model)
            for module, mode in zip(modules, modes):
                module.training = mode
            for module, on in checkpointing.items():
                module.gradient_checkpointing = on
            for config, use_cache in configs.values():
                config.use_cache = use_cache


def until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


# ---------------------------------------------------------------- showing them


def flat(text: str | None) -> str:
    return " ".join((text or "").split())


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def line(step: int, answer: dict) -> str:
    """One sample in one line of at most WIDTH characters: the prompt, the answer, the reference where there is one."""
    head = f"sample @ {step}: {shorten(flat(answer['prompt']), PROMPT_WIDTH)} -> "
    if answer["reference"] is None:
        return head + shorten(flat(answer["answer"]) or "(nothing)", WIDTH - len(head))
    room = WIDTH - len(head) - len("  (ref: )")
    said = shorten(flat(answer["answer"]) or "(nothing)", room // 2)
    return f"{head}{said}  (ref: {shorten(flat(answer['reference']), room - len(said))})"


def markdown(answers: list[dict]) -> str:
    """The answers as a Markdown table, as TensorBoard's text tab shows it."""
    def cell(text: str | None) -> str:
        return flat(text).replace("|", "\\|") or " "

    rows = [f"| {cell(a['prompt'])} | {cell(a['answer'])} | {cell(a['reference'])} |" for a in answers]
    return "\n".join(["| prompt | answer | reference |", "| --- | --- | --- |", *rows])

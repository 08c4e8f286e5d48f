"""Same computation whatever the batching: each example's loss is the same alone, in a padded length-grouped batch
(the token-budget default) and packed padding-free in one row (--packing), with the same responses-only labels."""

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from qlora.data import prepare_rows, read_records


def _token_losses(model, batch):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    # use_cache=False as in training: with a cache, transformers ignores the packed rows' boundaries
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return losses, labels != -100


def _mean(losses, trained):
    return (losses * trained).sum() / trained.sum()


def test_each_example_has_the_same_loss_alone_padded_and_packed(tiny_model, sample_data, prompt_format):
    rows = prepare_rows(read_records(str(sample_data)), "auto", prompt_format, 256, False, 0.0, 0, False,
                        "sample").train[:8]
    assert len({len(r["input_ids"]) for r in rows}) > 3, "want rows of different lengths"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()

    with torch.no_grad():
        alone = [_mean(*_token_losses(model, DataCollatorForLanguageModeling(pad_token_id=2)([r])))
                 for r in rows]
        losses, trained = _token_losses(model, DataCollatorForLanguageModeling(pad_token_id=2)(rows))
        padded = [_mean(losses[i], trained[i]) for i in range(len(rows))]
        batch = DataCollatorForLanguageModeling(pad_token_id=2, padding_free=True)(rows)
        assert "attention_mask" not in batch  # boundaries come from position_ids alone
        losses, trained = _token_losses(model, batch)
        starts = torch.cumsum(torch.tensor([0] + [len(r["input_ids"]) for r in rows]), 0)
        packed = [_mean(losses[0, a:b - 1], trained[0, a:b - 1]) for a, b in zip(starts[:-1], starts[1:])]

    for i, (a, p, k) in enumerate(zip(alone, padded, packed)):
        assert abs(a - p) <= 1e-5, f"example {i}: alone {a:.7f}, padded {p:.7f}"
        assert abs(a - k) <= 1e-5, f"example {i}: alone {a:.7f}, packed {k:.7f}"

"""Token-budget batches split across processes: every row once per epoch, every batch within the budget."""

import random

import pytest

from qlora.batching import TokenBudgetBatches


def _epoch(lengths, budget, world, epoch=0):
    per_rank = []
    for rank in range(world):
        sampler = TokenBudgetBatches(lengths, budget, seed=7, rank=rank, world=world)
        sampler.set_epoch(epoch)
        per_rank.append(sampler.batches())
    return per_rank


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_processes_share_every_row_once_within_the_budget(world):
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(301)]
    for epoch in range(5):
        per_rank = _epoch(lengths, 1024, world, epoch)
        assert len({len(batches) for batches in per_rank}) == 1  # no process waits for another at the epoch's end
        rows = [i for batches in per_rank for batch in batches for i in batch]
        assert sorted(rows) == list(range(len(lengths)))
        assert all(batch and len(batch) * max(lengths[i] for i in batch) <= 1024
                   for batches in per_rank for batch in batches)


def test_one_process_steps_see_the_same_rows_as_two():
    """One process accumulating 2 batches and 2 processes taking 1 each train on the same rows in every optimizer
    step, including the last step of an epoch with an odd number of batches."""
    lengths = [57 + i % 27 for i in range(200)]
    one = TokenBudgetBatches(lengths, 1024, seed=42).batches()
    assert len(one) % 2 == 1  # the case where the last step has a single batch
    steps_one = [sorted(sum(one[i:i + 2], [])) for i in range(0, len(one), 2)]
    rank0, rank1 = (TokenBudgetBatches(lengths, 1024, seed=42, rank=rank, world=2).batches() for rank in range(2))
    steps_two = [sorted(a + b) for a, b in zip(rank0, rank1)]
    assert steps_two == steps_one


def test_rows_too_few_to_go_round_are_dropped_rather_than_sent_empty():
    per_rank = _epoch([500, 500, 500], 1000, world=4)
    assert all(len(batches) == 0 for batches in per_rank)


def test_lengths_rounded_to_a_multiple_fit_the_budget_and_repeat_shapes():
    """With pad_to_multiple_of, TRL's collator pads each batch to a multiple of 64: the batches still fit the budget
    once padded so, and far fewer distinct shapes reach the GPU (its attention plans are reused)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rng = random.Random(1)
    lengths = [rng.randint(40, 2000) for _ in range(3000)]
    rows = [{"input_ids": [5] * n, "labels": [5] * n} for n in lengths]
    collate = DataCollatorForLanguageModeling(pad_token_id=0, pad_to_multiple_of=64)
    shapes = set()
    for batch in TokenBudgetBatches(lengths, 12288, seed=3, multiple=64).batches():
        padded = collate([rows[i] for i in batch])["input_ids"]
        assert padded.shape[1] % 64 == 0 and padded.numel() <= 12288
        shapes.add(tuple(padded.shape))
    exact = {(len(b), max(lengths[i] for i in b)) for b in TokenBudgetBatches(lengths, 12288, seed=3).batches()}
    assert len(shapes) < len(exact) / 2, (len(shapes), len(exact))

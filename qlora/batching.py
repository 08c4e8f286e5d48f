"""Token-budget micro-batches: rows of similar length, as many as fit in a budget of padded tokens.

Instruction rows vary from tens to thousands of tokens. A fixed number of rows per micro-batch either pads short rows
to long ones or starves the GPU with a few short rows; here short rows travel many to a batch and long rows few, so
every micro-batch gives the GPU about the same work with little padding, and attention never crosses rows.
"""

from __future__ import annotations

import random

from transformers.trainer_pt_utils import BatchRebalanceSampler

POOL = 4096  # rows sorted by length together: large enough to batch well, small enough to keep the order random
# What one more micro-batch costs, in padded tokens: the per-step work that does not grow with the batch. Measured on
# an H100 with Mistral-7B in 4 bits (bench/RESULTS.md): a step costs about 0.28 s plus 33 us per token, so a step is
# worth about 8,500 tokens. Splitting a batch pays only when it saves more padding than that.
STEP_COST_TOKENS = 8192


def padded(length: int, multiple: int | None) -> int:
    """A row's length once the collator pads it up to a multiple (pad_to_multiple_of)."""
    multiple = multiple or 1
    return -(-length // multiple) * multiple


def example_tokens(rows, multiple: int | None) -> list[int]:
    """The padded tokens each example puts in a micro-batch: an instruction row's length; a preference pair's two
    sequences (the prompt with each answer), both padded to the longer."""
    if "chosen_ids" in rows.column_names:
        return [2 * padded(len(p) + max(len(c), len(r)), multiple)
                for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"])]
    return [padded(len(ids), multiple) for ids in rows["input_ids"]]


class TokenBudgetBatches(BatchRebalanceSampler):
    """Yields lists of row indices, each list at most `budget` tokens once padded (rows x longest row).

    Subclassing transformers' BatchRebalanceSampler (without its batching) is what makes the Trainer use this as a
    batch sampler that is already split across processes: each process takes every `world`-th batch.
    """

    def __init__(self, lengths: list[int], budget: int, seed: int, rank: int = 0, world: int = 1, multiple: int = 1):
        # the collator pads a batch to its longest row rounded up to `multiple`: plan with the padded lengths
        lengths = [padded(length, multiple) for length in lengths]
        if max(lengths) > budget:
            raise ValueError(f"token_budget {budget} is smaller than the longest row ({max(lengths)} tokens); "
                             f"raise it to at least max_seq_length")
        self.lengths, self.budget, self.seed, self.rank, self.world = list(lengths), budget, seed, rank, world
        self.epoch = 0
        self._cached: tuple[int | None, list] = (None, [])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _pool_batches(self, pool: list[int]) -> list[list[int]]:
        """Cut the pool, sorted longest first, into runs that fit the budget with the least padding plus per-step
        cost (dynamic programming over the cut points: best[j] is the cheapest way to batch the first j rows)."""
        rows = sorted(pool, key=self.lengths.__getitem__, reverse=True)
        lengths = [self.lengths[i] for i in rows]
        best, cut = [0] + [float("inf")] * len(rows), [0] * (len(rows) + 1)
        for end in range(1, len(rows) + 1):
            start = end - 1
            while start >= 0 and (end - start) * lengths[start] <= self.budget:  # rows[start] is the longest
                cost = best[start] + (end - start) * lengths[start] + STEP_COST_TOKENS
                if cost < best[end]:
                    best[end], cut[end] = cost, start
                start -= 1
        batches, end = [], len(rows)
        while end:
            batches.append(rows[cut[end]:end])
            end = cut[end]
        return batches

    def batches(self) -> list[list[int]]:
        """This process's batches for the current epoch (the same on every call, for a given epoch)."""
        if self._cached[0] != self.epoch:
            self._cached = (self.epoch, self._make_batches())
        return self._cached[1]

    def _make_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        batches = [b for start in range(0, len(order), POOL) for b in self._pool_batches(order[start:start + POOL])]
        rng.shuffle(batches)
        return self._even_out(batches)[self.rank::self.world]

    def _even_out(self, batches: list[list[int]]) -> list[list[int]]:
        """Make the number of batches a multiple of the number of processes, so that every process takes the same
        number. The few left over are halved (fewer rows of the same lengths still fit the budget), the largest
        first, rather than dropped: then N processes see an epoch's last step on the same rows as one process does.
        Only when too few rows are left to go round are they dropped."""
        full = len(batches) - len(batches) % self.world
        tail = batches[full:]
        while tail and len(tail) < self.world and max(map(len, tail)) > 1:
            largest = max(tail, key=len)
            tail.remove(largest)
            half = len(largest) // 2
            tail += [largest[:half], largest[half:]]
        return batches[:full] + (tail if len(tail) == self.world else [])

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())

"""The planner's choices from given free memory and card figures: Mistral-7B in 4 bits, 12,288 tokens a step."""

import pytest

from qlora import planner

GIB = 2**30
STEP, LONGEST = 12288, 2048
# A slow card, as the T4-class setup of issue 24 measured (8% of an H200's SMs): the GPU's queue hides the host, so a
# micro-batch costs little besides its tokens, and recomputing costs a third more a token.
SLOW = planner.Figures({"false": 600e-6, "true": 810e-6, "unsloth": 830e-6}, 0.03, 0.02, source="slow card")
FAST = planner.DEFAULT_FIGURES["unsloth"]  # fitted on a whole H200: 0.23 s a micro-batch


@pytest.mark.parametrize("free_gib, checkpointing, skip, micro, accumulation", [
    (15, "true", 2, 12288, 1),    # a 16 GB card: recompute all but 2 layers, rather than accumulate 2,048-token batches
    (23, "true", 8, 12288, 1),    # a 24 GB card: 8 layers keep their activations
    (78, "false", 0, 12288, 1),   # an 80 GB card: the whole step's activations fit
])
def test_choice_at_each_card_size(free_gib, checkpointing, skip, micro, accumulation):
    chosen = planner.plan(free_gib * GIB, STEP, LONGEST, "unsloth")
    assert (chosen.checkpointing, chosen.skip_layers, chosen.micro_tokens, chosen.accumulation) == \
        (checkpointing, skip, micro, accumulation)
    assert chosen.micro_tokens * chosen.accumulation >= STEP and chosen.micro_tokens >= LONGEST


def test_each_layer_kept_costs_memory_and_saves_time():
    plans = [planner.plan(139 * GIB, STEP, LONGEST, "unsloth", "true", skip) for skip in (0, 8, 31)]
    assert [p.skip_layers for p in plans] == [0, 8, 31]
    assert plans[0].predicted_bytes < plans[1].predicted_bytes < plans[2].predicted_bytes
    assert plans[0].predicted_tokens_per_second < plans[1].predicted_tokens_per_second < \
        plans[2].predicted_tokens_per_second
    full = planner.plan(139 * GIB, STEP, LONGEST, "unsloth", "false")
    assert plans[2].predicted_bytes < full.predicted_bytes


@pytest.mark.parametrize("figures, free_gib, checkpointing, skip, micro, accumulation", [
    (SLOW, 15, "false", 0, 2458, 5),   # slow card: no recomputation, small micro-batches accumulated
    (SLOW, 23, "false", 0, 4096, 3),
    (FAST, 15, "true", 2, 12288, 1),   # fast card: one big micro-batch, recomputing all layers but those that fit
    (FAST, 23, "true", 8, 12288, 1),
])
def test_slow_and_fast_cards_plan_differently(figures, free_gib, checkpointing, skip, micro, accumulation):
    chosen = planner.plan(free_gib * GIB, STEP, LONGEST, "unsloth", figures=figures)
    assert (chosen.checkpointing, chosen.skip_layers, chosen.micro_tokens, chosen.accumulation) == \
        (checkpointing, skip, micro, accumulation)
    assert chosen.predicted_bytes <= planner.USABLE * free_gib * GIB


@pytest.mark.parametrize("free_gib", [8, 10, 12, 15, 20, 23, 30, 40, 60, 78, 139])
@pytest.mark.parametrize("backend, figures", [("unsloth", None), ("unsloth", SLOW), ("unsloth", FAST), ("hf", None)])
def test_a_choice_never_exceeds_the_memory_given_and_is_the_fastest_that_fits(free_gib, backend, figures):
    free = free_gib * GIB
    chosen = planner.plan(free, STEP, LONGEST, backend, figures=figures)
    figures = figures or planner.DEFAULT_FIGURES[backend]
    assert chosen.predicted_bytes <= planner.USABLE * free
    fitting = [p for p in planner.candidates(free, STEP, LONGEST, planner.modes_for(backend, figures=figures), figures)
               if p.predicted_bytes <= planner.USABLE * free]
    assert chosen.predicted_tokens_per_second == max(p.predicted_tokens_per_second for p in fitting)


def test_the_measured_allocator_slack_is_left_free():
    """A card whose allocator needs 5 GiB of slack: with 15 GiB free a plan may fill 10, not 13.5."""
    roomy = planner.plan(15 * GIB, STEP, LONGEST, "unsloth", figures=SLOW)
    tight = planner.plan(15 * GIB, STEP, LONGEST, "unsloth",
                         figures=planner.Figures(SLOW.seconds_per_token, 0.03, 0.02, reserve_bytes=5 * GIB))
    assert roomy.predicted_bytes > 10 * GIB >= tight.predicted_bytes
    assert tight.micro_tokens < roomy.micro_tokens


def test_offloading_says_how_much_host_memory_it_takes():
    """Offloading keeps each layer's input in host memory: 256 KiB a token (Colab has about 12.7 GB)."""
    chosen = planner.plan(int(5.3 * GIB), STEP, LONGEST, "unsloth", figures=SLOW)  # recomputing 2,048 does not fit
    assert chosen.checkpointing == "unsloth"
    assert chosen.host_bytes == chosen.micro_tokens * 256 * 2**10 and "GiB of host memory" in chosen.summary()


def test_without_checkpointing_small_cards_accumulate_smaller_micro_batches():
    chosen = planner.plan(15 * GIB, STEP, LONGEST, "unsloth", checkpointing="false")
    assert (chosen.checkpointing, chosen.micro_tokens, chosen.accumulation) == ("false", 2458, 5)
    assert chosen.predicted_bytes <= planner.USABLE * 15 * GIB


def test_nothing_fits_gives_the_plan_needing_least_memory():
    chosen = planner.plan(5 * GIB, STEP, LONGEST, "unsloth")
    assert chosen.checkpointing == "unsloth" and chosen.micro_tokens == LONGEST
    assert chosen.predicted_bytes == min(p.predicted_bytes for p in planner.candidates(
        5 * GIB, STEP, LONGEST, planner.modes_for("unsloth"), FAST))


def test_rows_longer_than_a_step_get_a_micro_batch_of_their_own():
    chosen = planner.plan(78 * GIB, 4096, 8192, "unsloth")
    assert chosen.micro_tokens == 8192 and chosen.accumulation == 1


def test_offloading_is_not_offered_without_unsloth():
    hf = planner.candidates(15 * GIB, STEP, LONGEST, planner.modes_for("hf"), planner.DEFAULT_FIGURES["hf"])
    assert all(p.checkpointing != "unsloth" and p.skip_layers == 0 for p in hf)
    with pytest.raises(ValueError, match="not available with --backend hf"):
        planner.plan(15 * GIB, STEP, LONGEST, "hf", checkpointing="unsloth")


def test_dpo_plans_pairs_with_the_reference_pass_in_the_time():
    """DPO's reference pass (a forward pass without gradients) costs time, not memory: the plan that fits stays the
    same, its predicted speed falls by the forward's share. With the figures calibrated on the T4-class card (8% of an
    H100's SMs, 15 GiB free; bench/RESULTS.md) and pairs of two 1,024-token sequences, DPO measured 1,239 padded
    tokens/s: within 15% of the prediction with the reference pass, 42% below the one without."""
    t4_class = planner.Figures({"false": 500.6e-6, "true": 731.0e-6, "unsloth": 740.6e-6}, 0.1608, 0.003,
                               909464576, source="8% of an H100")
    without, with_reference = (planner.plan(int(14.8 * GIB), STEP, 2 * 1024, "unsloth", figures=t4_class,
                                            reference_pass=reference) for reference in (False, True))
    assert (with_reference.checkpointing, with_reference.micro_tokens, with_reference.accumulation) == \
        (without.checkpointing, without.micro_tokens, without.accumulation) == ("false", 2458, 5)
    assert with_reference.predicted_bytes == without.predicted_bytes
    assert 1239 / with_reference.predicted_tokens_per_second > 0.85
    assert 1239 / without.predicted_tokens_per_second < 0.75

#!/usr/bin/env bash
# Preference tuning speed by card, in one device call of at most about 9.5 minutes: the 7.24 B stand-in built once,
# then as a T4-class card (8% of the SMs, 15 GiB free) and as a 4090-class card (20%, 23 GiB) our DPO (default plan,
# sequences of up to 1,024 tokens) beside Unsloth's DPO notebook as published (bench/stock_recipes.py dpo_notebook), on
# generated pairs of about 1,000 tokens (bench/standins.py preference_shaped_rows); then, if time is left, whether our
# ORPO fits the T4-class card (2 steps).
#   bash bench/dpo_speed_by_card.sh            # needs .gpu/bundle.tar.xz and .gpu/tokenizer.model (bench/gpu_host/)
#   CARDS=4090 bash bench/dpo_speed_by_card.sh # the 4090-class pair alone, 6 steps (2 untimed)
#   CARDS=t4 bash bench/dpo_speed_by_card.sh   # the T4-class pair alone, 4 steps (1 untimed), then ORPO
# Everything it prints, and the runs' metrics.json, config.yaml and logs, go to $OUT/dpo_speed_by_card.tar.gz.
set -uo pipefail
NAME=dpo_speed_by_card
DATA="--data preference_shaped --rows 600"
source bench/gpu_host/by_card.sh
DPO="ours dpo=--method dpo --max_seq_length 1024"

orpo_fit() {  # our ORPO on the T4-class card, 2 steps logged each: does it fit 15 GiB, what do its rewards do
    bench t4_class_orpo $(( $(left) - 15 )) --gpu_sm_percent 8 --gpu_memory_gib 15 --steps 2 --warmup 0 \
        --stock '' --ours "ours orpo=--method orpo --max_seq_length 1024 --logging_steps 1"
}

case ${CARDS:-both} in
4090)
    bench 4090_class $(( $(left) - 15 )) --gpu_sm_percent 20 --gpu_memory_gib 23 --steps 6 --warmup 2 \
        --stock dpo_notebook --ours "$DPO"
    finish ;;
t4)
    bench t4_class $(( $(left) - 200 )) --gpu_sm_percent 8 --gpu_memory_gib 15 --steps 4 --warmup 1 \
        --stock dpo_notebook --ours "$DPO"
    orpo_fit
    finish ;;
esac

# T4-class: a run's model load and setup take about 70 s, our first run on a card calibrates it (about 50 s more), and a
# DPO step does an SFT step's work and one forward pass more (the reference: the adapter disabled). Unsloth's SFT
# notebook took 14 s a step here for 16,384 tokens; its DPO recipe's steps hold about 16,000 with the padding (8 pairs
# as 16 sequences of up to 1,024 tokens): about 18 s. So 3 steps, the first untimed (about 275 s for the pair), and
# 200 s are kept for the 4090-class pair (about 230 s at its usual length: its runs end before their limit)
bench t4_class $(( $(left) - 200 )) --gpu_sm_percent 8 --gpu_memory_gib 15 --steps 3 --warmup 1 \
    --stock dpo_notebook --ours "$DPO"

bench 4090_class $(( $(left) - 15 )) --gpu_sm_percent 20 --gpu_memory_gib 23 --steps 4 --warmup 1 \
    --stock dpo_notebook --ours "$DPO"

if [ "$(left)" -gt 170 ]; then  # a load, 2 steps and a calibration unless it finds the DPO run's cached
    orpo_fit
fi

finish

"""The experiments' defaults, kept free of torch so that `python -m training --help` stays fast."""

# Depth: the default (CPU) set is 20 vs 56 layers, plain and residual. The 110-layer nets (`--nets ... resnet110
# plain110`) cost nearly as much as the other four together; the GPU recipe trains all six.
NETS = ("plain20", "plain56", "resnet20", "resnet56")
GRADNORM_EVERY = 5  # optimizer steps between gradient-norm records
TRAIN_EVAL_IMAGES = 4096  # training images scored after each epoch for the training error

# Attention placement ablation.
KINDS = ("se", "cbam", "non_local")
PLACEMENTS = {"stage1": [1], "stage2": [2], "stage3": [3], "stages2-3": [2, 3], "all": [1, 2, 3]}
SEEDS = (0, 1, 2)
# The CPU default trains every kind in every placement (16 variants with the baseline). A non-local block at
# 28 px (784 positions, `non_local_stage1`, `non_local_all`) costs about 7x the baseline's CPU time per run;
# `--skip non_local_stage1 non_local_all` leaves those two out.

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
# The default (CPU) placements: the first stage, the last stage, everywhere; `--placements` adds stage2, stages2-3.
CPU_PLACEMENTS = ("stage1", "stage3", "all")
# Left out of the CPU default: a non-local block at 28 px (784 positions) makes a run several times slower on the
# CPU than the whole backbone; `--skip` with no names trains them too.
CPU_SKIP = ("non_local_stage1", "non_local_all")

#!/usr/bin/env bash
# init-next: fresh balconies that start as copies of the base layer after the exit (`--init next`,
# the trunk continued) instead of the base's last layer (`copy`, the paper's and the default).
# The 60-step check of experiments/sparse-kl with the exact KL; its control is kl-exact there
# (seeds 0 and 1).
#
#   OUT=runs/default bash experiments/init-next/run.sh     # OUT: the recipes/default/make.sh folder
set -euo pipefail
KINDS=exact INIT=next bash experiments/sparse-kl/check.sh

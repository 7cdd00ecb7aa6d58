#!/usr/bin/env python3
"""timm-compatible training with Model Doctor.

    accelerate launch train_md.py --config configs/quickstart.yaml
    python train_md.py --model resnet32_cifar --dataset torch/cifar10 --data-dir DATA ...

Everything lives in ``md_plugin.train``; this file is only the entry point.
"""

import sys

from md_plugin.train.main import cli

if __name__ == "__main__":
    sys.exit(cli())

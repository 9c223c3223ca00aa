"""Pre-train CXR-CLIP: ``python train.py [hydra overrides]`` or ``torchrun --nproc_per_node=N train.py``."""

import logging
import sys

import hydra
from omegaconf import DictConfig

from cxrclip.exceptions import exit_on_user_error
from cxrclip.jobs import pretrain


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    logging.getLogger("cxrclip").setLevel(logging.INFO)
    with exit_on_user_error():
        pretrain(cfg)


if __name__ == "__main__":
    sys.exit(main())

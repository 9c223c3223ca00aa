"""Evaluate a linear probe: ``python evaluate_finetune.py data_test=X test.checkpoint=CKPT``."""

import logging

import hydra
from omegaconf import DictConfig

from cxrclip.eval.finetune import evaluate_finetune
from cxrclip.exceptions import exit_on_user_error


@hydra.main(version_base="1.3", config_path="configs", config_name="eval_finetune")
def main(cfg: DictConfig) -> None:
    logging.getLogger("cxrclip").setLevel(logging.INFO)
    with exit_on_user_error():
        evaluate_finetune(cfg)


if __name__ == "__main__":
    main()

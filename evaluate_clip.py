"""Zero-shot classification and image↔text retrieval: ``python evaluate_clip.py test.checkpoint=CKPT``."""

import logging

import hydra
from omegaconf import DictConfig

from cxrclip.eval.evaluate import evaluate
from cxrclip.exceptions import exit_on_user_error


@hydra.main(version_base="1.3", config_path="configs", config_name="eval_clip")
def main(cfg: DictConfig) -> None:
    logging.getLogger("cxrclip").setLevel(logging.INFO)
    with exit_on_user_error():
        evaluate(cfg)


if __name__ == "__main__":
    main()

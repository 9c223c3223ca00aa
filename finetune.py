"""Linear probing: ``python finetune.py --config-name finetune_10 model.load_backbone_weights=CKPT``."""

import logging

import hydra
from omegaconf import DictConfig

from cxrclip.exceptions import exit_on_user_error
from cxrclip.jobs import probe


@hydra.main(version_base="1.3", config_path="configs", config_name="finetune_100")
def main(cfg: DictConfig) -> None:
    logging.getLogger("cxrclip").setLevel(logging.INFO)
    with exit_on_user_error():
        probe(cfg)


if __name__ == "__main__":
    main()

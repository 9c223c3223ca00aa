"""Reading the Hydra config at the edge: compose it and turn its parts into typed objects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from cxrclip.data.schema import DataConfig
from cxrclip.paths import CONFIG_DIR


def compose(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a config of ``configs/`` as ``python <job>.py overrides...`` would (for tests and the CLI)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)


def to_plain(cfg: DictConfig | Mapping) -> dict:
    """A resolved plain-dict copy (what checkpoints store)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return dict(cfg)


def data_configs(cfg: DictConfig, group: str) -> list[DataConfig]:
    """The typed data configs of a group (``data_train``, ``data_valid``, ``data_test``)."""
    section = cfg.get(group)
    if section is None:
        return []
    plain = OmegaConf.to_container(section, resolve=True)
    return [DataConfig.from_mapping(key, value) for key, value in plain.items()]

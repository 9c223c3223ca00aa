"""The run spec: the Hydra config read once, at the edge, into typed settings that the trainer, the evaluators and
inference read instead of the raw config.

``RunSpec.from_config(cfg)`` checks and converts every section a job uses (run settings, data configs, model with a
required normalization, loaders, optimizer, schedule, test settings); a missing or malformed value fails here,
before any data is read, with the key's name.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cxrclip.config import to_plain
from cxrclip.data.preprocess import PreprocessSpec, image_normalization
from cxrclip.data.schema import DataConfig
from cxrclip.exceptions import ConfigError


def _section(config: Mapping, key: str) -> dict:
    value = config.get(key)
    return dict(value) if isinstance(value, Mapping) else {}


@dataclass(frozen=True)
class LoaderSpec:
    """One ``dataloader.<split>`` section."""

    batch_size: int
    shuffle: bool = False
    num_workers: int = 0
    drop_last: bool = False
    pin_memory: bool = False
    prefetch_factor: int | None = None

    @classmethod
    def from_mapping(cls, section: Mapping, where: str) -> LoaderSpec:
        if "batch_size" not in section:
            raise ConfigError(f"{where}.batch_size is not set")
        workers = int(section.get("num_workers") or 0)
        prefetch = section.get("prefetch_factor")
        return cls(
            batch_size=int(section["batch_size"]),
            shuffle=bool(section.get("shuffle", False)),
            num_workers=workers,
            drop_last=bool(section.get("drop_last", False)),
            pin_memory=bool(section.get("pin_memory", False)),
            prefetch_factor=int(prefetch) if prefetch is not None and workers > 0 else None,
        )


@dataclass(frozen=True)
class OptimizerSpec:
    """``optimizer``: the name, the torch options (lr, weight_decay, betas, fused ...), what gets no weight decay,
    and learning-rate multipliers per module prefix."""

    name: str
    options: dict
    no_decay: tuple[str, ...] = ("bias", "norm")
    lr_scale: dict = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, section: Mapping) -> OptimizerSpec:
        options = {k: float(v) if isinstance(v, str) else v for k, v in dict(section.get("config") or {}).items()}
        if isinstance(options.get("betas"), list):
            options["betas"] = tuple(options["betas"])
        return cls(
            name=str(section.get("name", "adamw")),
            options=options,
            no_decay=tuple(section.get("no_decay") or ("bias", "norm")),
            lr_scale={str(k): float(v) for k, v in dict(section.get("lr_scale") or {}).items()},
        )


@dataclass(frozen=True)
class ScheduleSpec:
    """``scheduler``: cosine (with linear warm-up) or constant, in epochs."""

    name: str
    total_epochs: int
    warmup_epochs: float = 0.0

    @classmethod
    def from_mapping(cls, section: Mapping) -> ScheduleSpec:
        options = dict(section.get("config") or {})
        if "total_epochs" not in options:
            raise ConfigError("scheduler.config.total_epochs is not set")
        return cls(
            name=str(section.get("name", "cosine")),
            total_epochs=int(options["total_epochs"]),
            warmup_epochs=float(options.get("warmup_epochs", 0) or 0),
        )


@dataclass(frozen=True)
class EvalSpec:
    """``test``: what evaluation reads."""

    checkpoint: str | None
    output_dir: Path | None = None
    seed: int = 1234
    auroc_ci: str = "delong"
    text_encoder: str | None = None
    image_encoder: str | None = None
    precision: str = "auto"  # the image encoder's: auto (= fp32), fp32, bf16 (opt-in, cxrclip/hardware.py)

    @classmethod
    def from_mapping(cls, section: Mapping) -> EvalSpec:
        return cls(
            checkpoint=section.get("checkpoint"),
            output_dir=Path(section["output_dir"]) if section.get("output_dir") else None,
            seed=int(section.get("seed", 1234)),
            auroc_ci=str(section.get("auroc_ci", "delong")),
            text_encoder=section.get("text_encoder"),
            image_encoder=section.get("image_encoder"),
            precision=str(section.get("precision") or "auto"),
        )


@dataclass(frozen=True)
class RunSpec:
    """Everything a job reads from its config, typed. ``plain`` is the resolved config as checkpoints store it."""

    plain: dict
    image_size: int | None  # None only in an evaluation config: each checkpoint's own test transform
    text_max_length: int
    model: dict
    tokenizer: dict
    transforms: dict
    loaders: dict
    loss: dict
    optimizer: OptimizerSpec | None
    schedule: ScheduleSpec | None
    test: EvalSpec | None
    calibration: dict
    data: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg) -> RunSpec:
        """From a composed Hydra config (a ``DictConfig``) or its plain-dict form."""

        plain = to_plain(cfg) if not isinstance(cfg, dict) else copy.deepcopy(cfg)
        base = _section(plain, "base")
        model = _section(plain, "model")
        if model.get("image_encoder"):
            model["image_encoder"] = {
                **model["image_encoder"],
                "normalize": image_normalization(model["image_encoder"]),
            }
        loaders = {
            split: LoaderSpec.from_mapping(section, f"dataloader.{split}")
            for split, section in _section(plain, "dataloader").items()
            if isinstance(section, Mapping)
        }
        image_size = base.get("image_size")
        if image_size is None and plain.get("optimizer"):
            raise ConfigError("base.image_size is null or not set: training needs a size (null: evaluation only)")
        data = {
            group: tuple(DataConfig.from_mapping(k, v) for k, v in _section(plain, group).items())
            for group in ("data_train", "data_valid", "data_test")
            if plain.get(group)
        }
        return cls(
            plain=plain,
            image_size=None if image_size is None else int(image_size),
            text_max_length=int(base.get("text_max_length", 256)),
            model=model,
            tokenizer=_section(plain, "tokenizer"),
            transforms=_section(plain, "transform"),
            loaders=loaders,
            loss=_section(plain, "loss"),
            optimizer=OptimizerSpec.from_mapping(plain["optimizer"]) if plain.get("optimizer") else None,
            schedule=ScheduleSpec.from_mapping(plain["scheduler"]) if plain.get("scheduler") else None,
            test=EvalSpec.from_mapping(plain["test"]) if plain.get("test") else None,
            calibration=_section(plain, "calibration"),
            data=data,
        )

    @property
    def base(self) -> dict:
        return _section(self.plain, "base")

    def loader(self, split: str) -> LoaderSpec:
        if split not in self.loaders:
            raise ConfigError(f"dataloader.{split} is not configured")
        return self.loaders[split]

    def transform_steps(self, split: str) -> dict:
        if split not in self.transforms:
            raise ConfigError(f"transform.{split} is not configured")
        return dict(self.transforms[split] or {})

    def test_preprocess(self, normalize, splits=("test", "valid")):
        """The :class:`~cxrclip.data.preprocess.PreprocessSpec` a run stores with its checkpoints."""
        steps = next((self.transforms[s] for s in splits if self.transforms.get(s)), None)
        if steps is None and self.image_size:
            steps = {"Resize": {"size": self.image_size}, "CenterCrop": {"size": self.image_size}}
        return PreprocessSpec.create(steps, normalize)

    @property
    def normalize(self):
        return self.model["image_encoder"]["normalize"]

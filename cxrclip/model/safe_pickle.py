"""A restricted unpickler for checkpoints written by the original CXR-CLIP trainer.

The original stores its Hydra config after ``OmegaConf.resolve``, with ListConfig leaves whose parent chain
carries a ``collections.defaultdict`` resolver cache. PyTorch's weights-only unpickler admits that class but
cannot fill it, so such files need another reader. This one is handed to ``torch.load`` as its pickle
module: every global the pickle names is looked up in an allowlist — PyTorch's own weights-only globals
(tensor rebuild functions, dtypes, plain containers), ``defaultdict``/``OrderedDict``, ``typing.Any`` and
OmegaConf's container, node and metadata classes — and anything else (a function, ``os.system``, an unknown
class) is refused by name before it could run.
"""

from __future__ import annotations

import _compat_pickle
import collections
import functools
import pickle
import typing


class RefusedGlobalError(pickle.UnpicklingError):
    """The pickle names a global outside the allowlist; nothing it names was called."""

    def __init__(self, qualified_name: str):
        self.qualified_name = qualified_name
        super().__init__(f"refusing to load global {qualified_name!r}: not a tensor, container or OmegaConf config")


def config_classes() -> list:
    """What a pickled OmegaConf config is made of (containers, value nodes, metadata, ``typing.Any``, the
    resolver cache's ``defaultdict``): data, no code. Shared by the weights-only allowlist and this reader."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, BytesNode, EnumNode, FloatNode, IntegerNode, PathNode, StringNode

    return [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, BooleanNode, BytesNode, EnumNode,
            FloatNode, IntegerNode, PathNode, StringNode, typing.Any, collections.defaultdict]  # fmt: skip


def _qualified(obj) -> str:
    return "typing.Any" if obj is typing.Any else f"{obj.__module__}.{obj.__qualname__}"


@functools.cache
def allowed_globals() -> dict[str, object]:
    """Qualified name → object, for every global a checkpoint may name."""
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = dict(_get_allowed_globals())
    allowed |= {_qualified(obj): obj for obj in config_classes()}
    allowed["collections.OrderedDict"] = collections.OrderedDict
    allowed |= {f"builtins.{t.__name__}": t for t in (dict, list, tuple, set, frozenset, int, float, str, bool, bytes)}
    return allowed


class Unpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only returns allowlisted globals."""

    def find_class(self, module: str, name: str):
        # protocol-2 pickles use Python 2 names (``__builtin__.long``): map them as pickle itself does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        allowed = allowed_globals()
        if qualified not in allowed:
            raise RefusedGlobalError(qualified)
        return allowed[qualified]


def load(file, **kwargs):
    """``pickle.load`` with the restricted :class:`Unpickler` (for PyTorch's legacy, non-zip format)."""
    return Unpickler(file, **kwargs).load()


def to_plain_data(value):
    """OmegaConf containers anywhere inside dicts/lists → plain dicts and lists (resolved)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: to_plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain_data(v) for v in value)
    return value

"""``timm.create_model("vitnas_subnet", ...)`` works after ``import nas``, yet ``import nas`` stays cheap.

timm learns a model when the module defining it is imported, and that module needs timm and torch
(seconds of imports that ``vitnas --help`` and ``vitnas space show`` never use). So ``install()``
imports ``nas.timm_model`` at once when timm is already imported, and otherwise leaves an import
hook that imports it right after timm's own import has finished.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_MODEL_MODULE = "nas.timm_model"


def install() -> None:
    if "timm" in sys.modules:
        importlib.import_module(_MODEL_MODULE)
    elif not any(isinstance(finder, _RegisterAfterTimm) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTimm())


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader the other finders give for ``timm``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # the one import it waits for: the other finders locate timm
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        importlib.import_module(_MODEL_MODULE)

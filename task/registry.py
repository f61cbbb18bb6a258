"""A registry of one extension point: its classes by the run-config ``name`` they carry.

A package (``strategies``, ``attacks``) owns one registry; each class that users may select is
decorated with ``@REGISTRY.register`` in its own module. The first lookup imports every module
of the package, so a new module is found without editing any list: adding a defense or an
attack is its module plus its test.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

from task.config import ConfigError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes of one kind by name; ``key`` is the run-config key that selects one."""

    def __init__(self, package: str, key: str) -> None:
        self.package, self.key = package, key
        self._classes: dict[str, T] = {}
        self._loaded = False

    def register(self, cls: T) -> T:
        """Class decorator: register ``cls`` under ``cls.name`` (a name is taken once)."""
        name = cls.__dict__.get("name")
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__qualname__} needs its own class attribute 'name' to be registered")
        if self._classes.get(name, cls) is not cls:
            raise ValueError(f"{self.key} name {name!r} is taken by {self._classes[name].__qualname__}")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._load()
        return sorted(self._classes)

    def get(self, name: str) -> T:
        """The class registered as ``name``; ``ConfigError`` naming the key and the choices."""
        self._load()
        try:
            return self._classes[name]
        except KeyError:
            raise ConfigError(f"{self.key}={name!r} is not one of {self.names()}") from None

    def _load(self) -> None:
        if self._loaded:
            return
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")
        self._loaded = True

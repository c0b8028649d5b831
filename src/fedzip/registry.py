"""The method registry: name -> method class. It imports no other fedzip module.

Methods register themselves (``@register_method`` on the class, as peft's tuners do); configs, engines and the
Flower apps look them up here. Keeping this module free of imports is what lets ``config.py`` validate a
method's options without importing the methods, and the methods import ``config.py`` without a cycle.
The built-in methods are imported by module name on the first lookup, so a lookup always sees them.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> class; aliases map to the same class. Filled by register_method as method modules are imported.
METHODS: dict[str, Any] = {}
_BUILTIN_PACKAGE = "fedzip.methods"


def register_method(cls: Any = None, *, aliases: tuple[str, ...] = ()):
    """Class decorator: make ``cls`` available under ``cls.name`` (and any ``aliases``) to configs.

    Used bare (``@register_method``) or with aliases (``@register_method(aliases=("centralized",))``).
    """

    def add(c):
        if not getattr(c, "name", ""):
            raise TypeError(f"{c.__name__} has no method name to register under")
        for name in (c.name, *aliases):
            if METHODS.get(name, c) is not c:
                raise ValueError(f"method name {name!r} is already taken by {METHODS[name].__name__}")
            METHODS[name] = c
        return c

    return add(cls) if cls is not None else add


def _load_builtins() -> None:
    importlib.import_module(_BUILTIN_PACKAGE)  # each method module registers itself on import


def method_names() -> list[str]:
    _load_builtins()
    return sorted(METHODS)


def method_class(name: str):
    """The class registered under ``name``; KeyError (with the known names) if there is none."""
    _load_builtins()
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]

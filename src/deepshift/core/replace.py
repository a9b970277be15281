"""Replacing submodules of a model in place: the one loop freezing, loading and export share."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def replace_modules(model: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Swap every submodule ``m`` of ``model`` for ``replacement(m)`` where that is not None.

    ``replacement`` is asked once per distinct module, so a module registered under two parents
    (or twice under one) is replaced by one shared new module, as the state dict expects. When
    ``model`` itself is replaced, the replacement is returned; always use the return value.
    """
    root = replacement(model)
    if root is not None:
        return root
    done: dict[int, nn.Module | None] = {}
    for parent in list(model.modules()):
        # _modules, not named_children(): the latter skips a child registered twice.
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in done:
                done[id(child)] = replacement(child)
            if done[id(child)] is not None:
                setattr(parent, name, done[id(child)])
    return model

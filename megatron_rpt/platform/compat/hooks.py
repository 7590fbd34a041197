"""How the CPU layer changes Megatron-Core: a post-import hook and attribute bookkeeping.

Patches to Megatron-Core modules are applied when the module is imported (`when_imported`: a
`sys.meta_path` finder that runs a callback right after the module executed, before importers bind
its names), or at once when it is already loaded; `rebind_everywhere` also replaces the copies that
`from x import f` made in megatron modules loaded earlier. So installing the layer works before and
after `import megatron.core`.

Every replaced attribute is recorded with its original (`set_attr`), so that a test can undo one
patch (`undo`) in a forked worker to show the failure it fixes. This module knows no patch; the
patch table is `registry.py`. See docs/megatron-core-on-cpu.md.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

__all__ = ["LOCK", "DISABLED", "HOOKS", "set_attr", "rebind_everywhere", "when_imported", "around_import", "undo"]

LOCK = threading.RLock()
# Ids uninstalled by a test: their import hooks stay registered but do nothing until reinstalled.
DISABLED: set[str] = set()
# patch id -> [(obj, attr, old, new)]; obj is HOOKS.around for an `around_import` registration.
_ORIGINALS: dict[str, list[tuple[Any, str, Any, Any]]] = {}
# (patch id, module name) -> the callback of the patch's latest installation.
_CALLBACKS: dict[tuple[str, str], Callable[[types.ModuleType], None]] = {}
_AROUND = "__around__"


class _Missing:
    pass


_MISSING = _Missing()


def set_attr(patch_id: str, obj: Any, name: str, value: Any) -> None:
    """setattr that remembers the original so a test can undo the patch."""
    _ORIGINALS.setdefault(patch_id, []).append((obj, name, getattr(obj, name, _MISSING), value))
    setattr(obj, name, value)


def new_with_config_flag_off(patch_id: str, cls: type, flag: str, finish: Callable[[Any, Any], Any]) -> None:
    """Replace `cls.__new__` (a factory taking `config` first, such as WrappedTorchNorm) so that a config with
    `flag` set builds with the flag off (upstream asserts it is off), restored after, and the result passes
    through `finish(built, config)`; configs without the flag build as before (P7, P17)."""
    previous = cls.__new__

    def __new__(klass: type, config: Any, *args: Any, **kwargs: Any) -> Any:
        if not getattr(config, flag, False):
            return previous(klass, config, *args, **kwargs)
        setattr(config, flag, False)
        try:
            built = previous(klass, config, *args, **kwargs)
        finally:
            setattr(config, flag, True)
        return finish(built, config)

    set_attr(patch_id, cls, "__new__", staticmethod(__new__))


def rebind_everywhere(patch_id: str, module: types.ModuleType, name: str, new: Any) -> None:
    """Replace module.name and every `from module import name` copy in loaded megatron modules.

    Needed when megatron.core was imported before the layer was installed.
    """
    old = getattr(module, name, _MISSING)
    set_attr(patch_id, module, name, new)
    if old is _MISSING:
        return
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or mod is module or not mod_name.startswith("megatron."):
            continue
        if getattr(mod, name, None) is old:
            set_attr(patch_id, mod, name, new)


class _PostImportHooks(importlib.abc.MetaPathFinder):
    """Runs callbacks right after a named module has executed (before importers bind names)."""

    def __init__(self) -> None:
        self.hooks: dict[str, list[Callable[[types.ModuleType], None]]] = {}
        # Context managers wrapped around a module's execution (P1 scopes its stub to one import).
        self.around: dict[str, list[Callable[[], Any]]] = {}

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.hooks and fullname not in self.around:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original_exec = loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            with contextlib.ExitStack() as stack:
                for make_context in self.around.get(fullname, ()):
                    stack.enter_context(make_context())
                original_exec(module)
            for hook in self.hooks.get(fullname, ()):
                hook(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


HOOKS = _PostImportHooks()


def _ensure_finder() -> None:
    if HOOKS not in sys.meta_path:
        sys.meta_path.insert(0, HOOKS)


def when_imported(patch_id: str, module_name: str, fn: Callable[[types.ModuleType], None]) -> None:
    """Apply fn(module) now if module_name is loaded, else right after it is imported.

    One hook per (patch, module): reinstalling a patch after `undo` replaces its callback instead
    of stacking a second one.
    """
    key = (patch_id, module_name)
    if key not in _CALLBACKS:

        def guarded(module: types.ModuleType) -> None:
            if patch_id not in DISABLED:
                _CALLBACKS[key](module)

        _ensure_finder()
        HOOKS.hooks.setdefault(module_name, []).append(guarded)
    _CALLBACKS[key] = fn
    if module_name in sys.modules and patch_id not in DISABLED:
        fn(sys.modules[module_name])


def around_import(patch_id: str, module_name: str, make_context: Callable[[], Any]) -> None:
    """Run module_name's own execution inside make_context() (only imports after this call)."""
    _ensure_finder()
    HOOKS.around.setdefault(module_name, []).append(make_context)
    _ORIGINALS.setdefault(patch_id, []).append((HOOKS.around, _AROUND, (module_name, make_context), None))


def undo(patch_id: str) -> None:
    """Restore every attribute the patch replaced (and the `from x import f` copies made after it)."""
    for obj, name, old, new in reversed(_ORIGINALS.pop(patch_id, [])):
        if obj is HOOKS.around and name == _AROUND:
            target, context = old
            with contextlib.suppress(KeyError, ValueError):
                HOOKS.around[target].remove(context)
            continue
        if old is _MISSING:
            with contextlib.suppress(AttributeError):
                delattr(obj, name)
            continue
        setattr(obj, name, old)
        if isinstance(obj, types.ModuleType):
            # Modules imported after the patch bound the new object by name: undo those too.
            for mod_name, mod in list(sys.modules.items()):
                if mod is not None and mod_name.startswith("megatron.") and getattr(mod, name, None) is new:
                    setattr(mod, name, old)
    DISABLED.add(patch_id)

"""Has a module tree changed since it was last walked? An exact answer without the walk.

Walking a model (``state_dict()``, ``named_parameters()``) builds a name for every tensor and
calls into every module: about 10 ms for 2,500 small layers, every snapshot and every check.
:class:`ModuleTree` walks once and then answers "is it still the same tree?" with a few C-level
passes over what the walk read (no Python code per module), or one C loop
(``tolaria._C.same_members``) when the extension is loaded:

* every module's non-persistent-buffer set and state-dict hook dicts have the same sizes;
* the values of its ``_parameters``, ``_buffers`` and ``_modules`` dicts are the same objects
  (a parameter or buffer replaced or re-registered, a child module added, removed, replaced or
  set to None, a parameter set to None: each changes one of them);
* no parameter, buffer or module was registered anywhere in the process since the walk
  (torch's global registration hooks bump :func:`generation`; ``load_state_dict(assign=True)``
  and ``module.x = ...`` go through them).

Not seen (they change no dict): ``p.data = other`` (the stores compare every tensor's dtype,
contiguity and byte size and every copied tensor's address at each capture; see
:mod:`tolaria.snapshot.native.layout`; the health check's plans key on the addresses), a
module's ``__class__`` or methods patched on the instance after the walk, and an entry renamed
by writing the private dicts by hand (same values under other keys).
"""

from __future__ import annotations

from itertools import chain
from operator import is_, itemgetter
from typing import Any

from torch import nn
from torch.nn.modules import module as torch_module

from tolaria import _ext

_generation = 0


def _bump(*_args: object) -> None:
    global _generation
    _generation += 1


# Installed once per process; they return None, so they never change what is registered.
torch_module.register_module_module_registration_hook(_bump)
torch_module.register_module_parameter_registration_hook(_bump)
torch_module.register_module_buffer_registration_hook(_bump)


# The compiled comparison, or None (no extension, or one built before it existed: the twin).
_same_members = _ext.compiled("same_members")


def generation() -> int:
    """How many parameters, buffers and modules were registered in this process so far."""
    return _generation


# Per module, read from its instance ``__dict__`` (a dict lookup; an attribute lookup walks the
# class hierarchy first): the three dicts whose values make its state, then the set and hook
# dicts whose sizes matter.
_VALUE_KEYS = ("_parameters", "_buffers", "_modules")
_SIZED_KEYS = ("_non_persistent_buffers_set", "_state_dict_hooks", "_state_dict_pre_hooks")
# What named_parameters() reads: a lighter test for the per-step listing of the health check.
_PARAMETER_KEYS = ("_parameters", "_modules")
_VALUE_HOLDERS = itemgetter(*_VALUE_KEYS)
_SIZED_HOLDERS = itemgetter(*_SIZED_KEYS)
_PARAMETER_HOLDERS = itemgetter(*_PARAMETER_KEYS)


def _nothing_sized(_module_dict: dict[str, Any]) -> tuple[()]:
    return ()


class ModuleTree:
    """What one walk of ``model`` read, and :meth:`unchanged` (see the module docstring)."""

    def __init__(self, model: nn.Module, *, parameters_only: bool = False) -> None:
        """``parameters_only``: watch only what ``named_parameters()`` reads (the parameter and
        child-module dicts), not buffers, non-persistent sets or state-dict hooks."""
        self.model = model
        self.generation = _generation
        self._valued = _PARAMETER_HOLDERS if parameters_only else _VALUE_HOLDERS
        self._sized = _nothing_sized if parameters_only else _SIZED_HOLDERS
        self._keys = (_PARAMETER_KEYS, ()) if parameters_only else (_VALUE_KEYS, _SIZED_KEYS)
        self.modules = tuple(model.modules())
        self._dicts = tuple(map(vars, self.modules))
        read = self._read()
        self.readable = read is not None  # a module without the usual attributes: never cached
        self._sizes, self._values = read if read is not None else ((), ())

    def _read(self) -> tuple[tuple[int, ...], tuple[object, ...]] | None:
        try:
            sized = tuple(map(len, chain.from_iterable(map(self._sized, self._dicts))))
            valued = chain.from_iterable(map(self._valued, self._dicts))
            return sized, tuple(chain.from_iterable(map(dict.values, valued)))
        except (KeyError, TypeError):
            return None

    def unchanged(self, model: nn.Module) -> bool:
        """Whether ``model`` is the tree this walk read, in everything the module docstring lists.
        A holder replaced by another object with the same values changes nothing a walk reads."""
        if model is not self.model or _generation != self.generation or not self.readable:
            return False
        if _same_members is not None:
            valued, sized = self._keys
            return bool(_same_members(self._dicts, valued, sized, self._values, self._sizes))
        return self.unchanged_in_python()

    def unchanged_in_python(self) -> bool:
        """The pure-Python twin of the compiled comparison in :meth:`unchanged` (the same answer;
        used without the extension, and by the tests as its oracle)."""
        read = self._read()
        if read is None or read[0] != self._sizes:
            return False
        values, kept = read[1], self._values
        return len(values) == len(kept) and all(map(is_, values, kept))

    def plain_state_dict(self) -> bool:
        """Whether ``state_dict()`` of this tree is what its dicts say: no module overrides how it
        saves its state or has a state-dict hook (else every capture walks, to stay exact)."""
        base_save, base_state = nn.Module._save_to_state_dict, nn.Module.state_dict
        if not self.readable or self._sized is _nothing_sized:
            return False
        for module in self.modules:
            kind, own = type(module), vars(module)
            if kind._save_to_state_dict is not base_save or kind.state_dict is not base_state:
                return False
            if "state_dict" in own or "_save_to_state_dict" in own:
                return False
        hooks = self._sizes[1::3] + self._sizes[2::3]
        return not any(hooks)


__all__ = ["ModuleTree", "generation"]

"""Has a module tree changed since it was last walked? An exact answer without the walk.

Walking a model (``state_dict()``, ``named_parameters()``) builds a name for every tensor and
calls into every module: about 10 ms for 2,500 small layers, every snapshot and every check.
:class:`ModuleTree` walks once and then answers "is it still the same tree?" with a few C-level
passes over what the walk read (no Python code per module):

* every module's ``_parameters``, ``_buffers`` and ``_modules`` dicts, its non-persistent-buffer
  set and its state-dict hook dicts are the same objects with the same sizes;
* the values of the three dicts are the same objects (a parameter or buffer replaced or
  re-registered, a child module added, removed, replaced or set to None, a parameter set to
  None: each changes one of them);
* no parameter, buffer or module was registered anywhere in the process since the walk
  (torch's global registration hooks bump :func:`generation`; ``load_state_dict(assign=True)``
  and ``module.x = ...`` go through them).

Not seen (they change no dict): ``p.data = other`` (the stores read every tensor's address,
dtype, device and byte size at each capture; see :mod:`tolaria.snapshot.native.layout`) and a
module's ``__class__`` or methods patched on the instance after the walk.
"""

from __future__ import annotations

from itertools import chain, compress, cycle
from operator import attrgetter, is_
from typing import Any

from torch import nn
from torch.nn.modules import module as torch_module

_generation = 0


def _bump(*_args: object) -> None:
    global _generation
    _generation += 1


# Installed once per process; they return None, so they never change what is registered.
torch_module.register_module_module_registration_hook(_bump)
torch_module.register_module_parameter_registration_hook(_bump)
torch_module.register_module_buffer_registration_hook(_bump)


def generation() -> int:
    """How many parameters, buffers and modules were registered in this process so far."""
    return _generation


# Per module: the three dicts whose values make its state (first), then the set and hook dicts
# whose sizes matter. One attrgetter pass reads all six.
_HOLDERS = attrgetter(
    "_parameters", "_buffers", "_modules",
    "_non_persistent_buffers_set", "_state_dict_hooks", "_state_dict_pre_hooks",
)  # fmt: skip
_PER_MODULE = 6
_VALUE_HOLDERS = (True, True, True, False, False, False)


def _values(holders: tuple[Any, ...]) -> tuple[object, ...]:
    dicts = compress(holders, cycle(_VALUE_HOLDERS))
    return tuple(chain.from_iterable(map(dict.values, dicts)))


class ModuleTree:
    """What one walk of ``model`` read, and :meth:`unchanged` (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.generation = _generation
        self.modules = tuple(model.modules())
        holders = tuple(chain.from_iterable(map(_HOLDERS, self.modules)))
        self._sizes = tuple(map(len, holders))
        self._values = _values(holders)

    def unchanged(self, model: nn.Module) -> bool:
        """Whether ``model`` is the tree this walk read, in everything the module docstring lists.
        A holder replaced by another object with the same values changes nothing a walk reads."""
        if model is not self.model or _generation != self.generation:
            return False
        holders = tuple(chain.from_iterable(map(_HOLDERS, self.modules)))
        if tuple(map(len, holders)) != self._sizes:
            return False
        values = _values(holders)
        return len(values) == len(self._values) and all(map(is_, values, self._values))

    def plain_state_dict(self) -> bool:
        """Whether ``state_dict()`` of this tree is what its dicts say: no module overrides how it
        saves its state or has a state-dict hook (else every capture walks, to stay exact)."""
        base_save, base_state = nn.Module._save_to_state_dict, nn.Module.state_dict
        for module in self.modules:
            kind, own = type(module), vars(module)
            if kind._save_to_state_dict is not base_save or kind.state_dict is not base_state:
                return False
            if "state_dict" in own or "_save_to_state_dict" in own:
                return False
        hooks = self._sizes[4::_PER_MODULE] + self._sizes[5::_PER_MODULE]
        return not any(hooks)


__all__ = ["ModuleTree", "generation"]

"""Import torchvision without loading TorchDynamo, which an inference actor never uses.

torchvision's ``ops/roi_align.py`` runs ``from torch._dynamo.utils import is_compile_supported``
at import time, for a fallback used only when torchvision's compiled ops are missing. That one
line loads TorchDynamo (and sympy, FSDP, ...): 1.9 of torchvision's 2.2 s import on our CPUs,
paid by every new actor process before its first batch (benchmarks/RESULTS.md, "The GPU's first
seconds"). The detection models never compile anything.

So while torchvision imports, ``torch._dynamo`` and ``torch._dynamo.utils`` are placeholders:
``is_compile_supported`` imports the real function when first called, and any other name read
from a placeholder loads the real module. Once torchvision is in, the placeholders leave
``sys.modules``, so a later ``import torch._dynamo`` (``torch.compile``) gets the real thing.
Should the deferred import fail in any way, torchvision is imported the plain way.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import types

_NAMES = ("torch._dynamo", "torch._dynamo.utils")
_lock = threading.Lock()


def _real(name: str) -> types.ModuleType:
    for stale in _NAMES:
        if isinstance(sys.modules.get(stale), _Placeholder):
            del sys.modules[stale]
    return importlib.import_module(name)


class _Placeholder(types.ModuleType):
    """Stands in for a module until a name is read from it (its own dunders excepted).

    The package's ``__path__`` is read too: the import system asks for it before importing a
    submodule, which needs the real package. ``torch._dynamo.utils`` is a plain module, and a
    ``from ... import`` checks it for ``__path__``: it must have none, as the real one has none.
    """

    def __init__(self, name: str, package: bool) -> None:
        super().__init__(name)
        self._package = package

    def __getattr__(self, attr: str):
        if attr.startswith("__") and not (attr == "__path__" and self._package):
            raise AttributeError(attr)
        return getattr(_real(self.__name__), attr)


def _is_compile_supported(device_type):
    from torch._dynamo.utils import is_compile_supported

    return is_compile_supported(device_type)


def import_torchvision() -> types.ModuleType:
    """``import torchvision``, deferring TorchDynamo when it is not loaded yet."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    with _lock:
        if "torchvision" in sys.modules or any(name in sys.modules for name in _NAMES):
            return importlib.import_module("torchvision")
        import torch  # noqa: F401 - the placeholders' parent package must be real

        package, utils = _Placeholder(_NAMES[0], True), _Placeholder(_NAMES[1], False)
        utils.is_compile_supported = _is_compile_supported
        sys.modules.update({_NAMES[0]: package, _NAMES[1]: utils})
        try:
            return importlib.import_module("torchvision")
        except Exception:
            pass  # a torchvision that reads more from torch._dynamo: import it plainly below
        finally:
            for name in _NAMES:
                if isinstance(sys.modules.get(name), _Placeholder):
                    del sys.modules[name]
        return importlib.import_module("torchvision")


def preload() -> None:
    """The inference actors' worker setup hook (``workarounds.actor_runtime_env``). It never
    raises: a failure here would kill the worker, and the actor's own import reports it."""
    try:
        import_torchvision()
    except Exception:  # noqa: BLE001
        logging.getLogger(__name__).warning("detectflow: the fast torchvision import failed; "
                                            "the actor imports it plainly", exc_info=True)

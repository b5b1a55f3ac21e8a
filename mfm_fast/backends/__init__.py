"""The backend registry: every backend of the library, declared in one place (registrations at the bottom).

A backend is a module that runs the library's ops (:data:`OPS`) on its own kind of code, plus one
:class:`Backend` declaration here: its name, the module's dotted path (imported on first use, never by this
file), the ops it implements, where ``auto`` ranks it, and the ops ``auto`` skips with the measured reason.
mfm_fast.dispatch reads only this registry; it names no backend.

Every backend module follows one protocol (:data:`PROTOCOL`, one signature each):

- ``unavailable_reason(device_type, size=None, build=True)``: None if it runs on `device_type` tensors ("cpu",
  "cuda", any when None) of images `size` = (C, H, W) (any when None) here, else why not; `build=False`
  reports a build that compiling on first use would make without compiling it;
- ``unsupported_reason(op, inputs, options)``: None if it runs these validated inputs with this options
  object (mfm_fast._options), else why not (an explicit request then runs the fallback backend);
- ``run(op, inputs, options)``: the op;
- optional ``auto_reason(op, inputs, options)``: why ``auto`` should not pick it for these inputs although it
  runs them (measured slower), or None.

This file imports no backend module, no triton and no compiled extension: answering what is declared
imports nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import types
from typing import Dict, Iterator, Mapping, Optional, Tuple

OPS = ("corrupt", "masked_freq_loss", "adaptive_masks")  # the library's ops, in the order reports list them
PROTOCOL = ("unavailable_reason", "unsupported_reason", "run")  # and optionally auto_reason


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend's declaration. A malformed one raises ValueError naming the field.

    name: what ``backend=`` takes. module: the dotted path of its module (imported on first use). ops: the
    ops of :data:`OPS` it implements. where: how messages name it ("the Triton backend (kernels/)").
    auto_rank: its place in ``auto``'s order on CUDA tensors (lower first; None: ``auto`` never picks it
    there). cpu_auto: ``auto`` tries it on CPU tensors (several: by auto_rank). fallback: it takes the inputs
    and options another backend does not support (exactly one backend, with every op). auto_skips: {op: the
    measured reason} for ops it runs that ``auto`` does not pick."""

    name: str
    module: str
    ops: frozenset
    where: str
    auto_rank: Optional[int] = None
    cpu_auto: bool = False
    fallback: bool = False
    auto_skips: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self):
        def bad(field: str, problem: str):
            return ValueError(f"Backend {self.name!r}: {field}: {problem}")

        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name == "auto":
            raise bad("name", "expected an identifier other than 'auto'")
        if not isinstance(self.module, str) or not all(p.isidentifier() for p in self.module.split(".")):
            raise bad("module", f"expected a dotted module path, got {self.module!r}")
        if isinstance(self.ops, str) or not all(isinstance(op, str) for op in self.ops):
            raise bad("ops", f"expected a set of op names, got {self.ops!r}")
        unknown = sorted(set(self.ops) - set(OPS))
        if unknown:
            raise bad("ops", f"{', '.join(map(repr, unknown))} is not an op of the library ({', '.join(OPS)})")
        if not isinstance(self.where, str) or not self.where:
            raise bad("where", "expected a non-empty description for messages")
        if self.auto_rank is not None and (isinstance(self.auto_rank, bool) or not isinstance(self.auto_rank, int)):
            raise bad("auto_rank", f"expected an int or None, got {self.auto_rank!r}")
        for field in ("cpu_auto", "fallback"):
            if not isinstance(getattr(self, field), bool):
                raise bad(field, f"expected True or False, got {getattr(self, field)!r}")
        if self.fallback and set(self.ops) != set(OPS):
            raise bad("fallback", f"the fallback takes every op's unsupported inputs: it needs ops {', '.join(OPS)}")
        if not isinstance(self.auto_skips, Mapping):
            raise bad("auto_skips", f"expected {{op: reason}}, got {self.auto_skips!r}")
        for op, reason in self.auto_skips.items():
            if op not in self.ops:
                raise bad("auto_skips", f"{op!r} is not one of its ops")
            if not isinstance(reason, str) or not reason:
                raise bad("auto_skips", f"{op!r}: expected the measured reason, got {reason!r}")
        object.__setattr__(self, "ops", frozenset(self.ops))
        object.__setattr__(self, "auto_skips", dict(self.auto_skips))  # a plain dict: torch.compile traces reads of it


_registry: Dict[str, Backend] = {}  # in registration order
_modules: Dict[str, types.ModuleType] = {}


def register(backend: Backend) -> Backend:
    """Add `backend` to the registry. ValueError naming the field for a name already registered, an auto_rank
    another backend has, or a second fallback."""
    if not isinstance(backend, Backend):
        raise ValueError(f"register: expected a Backend declaration, got {backend!r}")
    if backend.name in _registry:
        raise ValueError(f"Backend {backend.name!r}: name: already registered")
    for other in _registry.values():
        if backend.auto_rank is not None and other.auto_rank == backend.auto_rank:
            raise ValueError(f"Backend {backend.name!r}: auto_rank: {backend.auto_rank} is {other.name!r}'s already")
        if backend.fallback and other.fallback:
            raise ValueError(f"Backend {backend.name!r}: fallback: {other.name!r} is the fallback already "
                             "(exactly one backend takes the inputs the others do not support)")
    _registry[backend.name] = backend
    return backend


def unregister(name: str) -> Backend:
    """Remove backend `name` (and forget its imported module); returns its declaration. KeyError if unknown."""
    backend = get(name)
    del _registry[name]
    _modules.pop(name, None)
    return backend


@contextlib.contextmanager
def registered(backend: Backend) -> Iterator[Backend]:
    """``with registered(Backend(...)):`` the backend is registered inside the block only (tests), even when
    the block raises."""
    register(backend)
    try:
        yield backend
    finally:
        unregister(backend.name)


def get(name: str) -> Backend:
    """The declaration of backend `name`; KeyError if none is registered under that name."""
    try:
        return _registry[name]
    except KeyError:
        raise KeyError(f"no backend {name!r} is registered (registered: {', '.join(_registry)})") from None


def names() -> Tuple[str, ...]:
    """The registered backends' names, in registration order."""
    return tuple(_registry)


def fallback() -> str:
    """The name of the backend that takes the inputs and options another backend does not support."""
    for backend in _registry.values():
        if backend.fallback:
            return backend.name
    raise LookupError("no fallback backend is registered")


def auto_order(device_type: str) -> Tuple[str, ...]:
    """The backends ``auto`` tries, in order, for tensors on `device_type`: on "cuda" those with an auto_rank,
    by rank; on any other device the cpu_auto ones, by auto_rank (those without one last)."""
    if device_type == "cuda":
        tried = [b for b in _registry.values() if b.auto_rank is not None]
    else:
        tried = [b for b in _registry.values() if b.cpu_auto]
    return tuple(b.name for b in sorted(tried, key=lambda b: (b.auto_rank is None, b.auto_rank or 0)))


def module(name: str) -> types.ModuleType:
    """The module of backend `name`, imported on first use (ImportError if it cannot be; the importing
    backend's triton, extension, ... come with it). TypeError if it lacks a function of :data:`PROTOCOL`."""
    loaded = _modules.get(name)
    if loaded is None:
        backend = get(name)
        loaded = importlib.import_module(backend.module)
        missing = [f for f in PROTOCOL if not callable(getattr(loaded, f, None))]
        if missing:
            raise TypeError(f"backend {name!r}: {backend.module} lacks {', '.join(missing)} (the backend protocol)")
        _modules[name] = loaded
    return loaded


# ------------------------------------------------------------------ the library's backends
_NOT_VALIDATED = ("the CUDA extension kernels are not validated on a GPU (only their host build is tested)")

register(Backend(
    name="reference", module="mfm_fast.backends.reference", ops=frozenset(OPS),
    where="the reference backend (fp64 oracle, mfm_fast/backends/reference/)",
))
register(Backend(
    name="torch", module="mfm_fast.backends.torch_backend", ops=frozenset(OPS),
    where="the torch backend (mfm_fast/backends/torch_backend/)", auto_rank=2, cpu_auto=True, fallback=True,
))
register(Backend(
    name="triton", module="mfm_fast.kernels", ops=frozenset({"corrupt", "masked_freq_loss"}),
    where="the Triton backend (kernels/)", auto_rank=1,
    auto_skips={"masked_freq_loss": "measured slower than the torch backend on an H200 (fwd+bwd at B=256, "
                                    "3x224x224: bench/fft_mask.py, docs/benchmarks.md)"},
))
register(Backend(
    name="cuda", module="mfm_fast.backends.cuda", ops=frozenset({"corrupt", "masked_freq_loss"}),
    where="the CUDA extension backend (csrc/)", auto_rank=0,
    auto_skips={"corrupt": _NOT_VALIDATED, "masked_freq_loss": _NOT_VALIDATED},
))

"""Empath's hot paths: the SMTP command parser, the DATA decoder, the spool's file write.

Each exists twice, with identical behaviour: a Cython module (``cmdparse``, ``datareader``,
``spoolio``) and a pure-Python twin (``cmdparse_py``, ``datareader_py``, ``spoolio_py``). The
choice is made once, here, at import: the twins are used when ``EMPATH_NO_EXTENSIONS`` is set
(to anything but ``""`` or ``"0"``), off CPython, or when a compiled module fails to import.
``IMPLEMENTATION`` says which is active (``"cython"`` or ``"python"``) and ``FALLBACK_REASON``
why the twins were chosen (``None`` when they were not), for ``empathctl version``; the master
logs :func:`status_line` at start (a WARNING for the twins) and refuses to start with
:func:`required_error`'s message when ``EMPATH_REQUIRE_SPEEDUPS`` is set and the twins are in
use.

Both twins raise the same :class:`CommandSyntaxError` (from ``errors.py``).
:func:`implementations` gives tests and benchmarks each implementation by name.
"""

from __future__ import annotations

import importlib
import os
import platform
from collections.abc import Callable, Iterator, Mapping
from types import SimpleNamespace

from empath._speedups import cmdparse_py, datareader_py, spoolio_py
from empath._speedups.errors import CommandSyntaxError

__all__ = [
    "FALLBACK_REASON",
    "StorePool",
    "IMPLEMENTATION",
    "CommandSyntaxError",
    "DataReader",
    "decode_xtext",
    "dot_stuff",
    "encode_xtext",
    "has_bare_eol",
    "implementations",
    "make_slots",
    "parse_path",
    "required_error",
    "split_command",
    "status_line",
    "list_names",
    "store_file",
    "sync_and_unlink",
    "write_all",
]

_CMDPARSE_NAMES = ("split_command", "parse_path", "decode_xtext", "encode_xtext")
_DATAREADER_NAMES = ("DataReader", "dot_stuff", "has_bare_eol")


def _namespace(name: str, cmdparse: object, datareader: object,
               spoolio: object) -> SimpleNamespace:
    ns = SimpleNamespace(
        name=name,
        CommandSyntaxError=CommandSyntaxError,
        modules=(cmdparse, datareader, spoolio),
        store_file=spoolio.store,  # type: ignore[attr-defined]
        write_all=spoolio.write_all,  # type: ignore[attr-defined]
        make_slots=spoolio.make_slots,  # type: ignore[attr-defined]
        sync_and_unlink=spoolio.sync_and_unlink,  # type: ignore[attr-defined]
        StorePool=spoolio.StorePool,  # type: ignore[attr-defined]
        list_names=spoolio.list_names,  # type: ignore[attr-defined]
    )
    for attr in _CMDPARSE_NAMES:
        setattr(ns, attr, getattr(cmdparse, attr))
    for attr in _DATAREADER_NAMES:
        setattr(ns, attr, getattr(datareader, attr))
    return ns


def _load_compiled() -> SimpleNamespace:
    """The Cython implementation; ImportError when it is not built."""
    cmdparse = importlib.import_module("empath._speedups.cmdparse")
    datareader = importlib.import_module("empath._speedups.datareader")
    spoolio = importlib.import_module("empath._speedups.spoolio")
    return _namespace("cython", cmdparse, datareader, spoolio)


_PYTHON = _namespace("python", cmdparse_py, datareader_py, spoolio_py)


def _choose() -> tuple[SimpleNamespace, str | None]:
    flag = os.environ.get("EMPATH_NO_EXTENSIONS", "")
    if flag and flag != "0":
        return _PYTHON, "EMPATH_NO_EXTENSIONS is set"
    if platform.python_implementation() != "CPython":
        return _PYTHON, f"not CPython ({platform.python_implementation()})"
    try:
        return _load_compiled(), None
    except ImportError as exc:
        return _PYTHON, f"compiled speedups not importable: {exc}"


_ACTIVE, FALLBACK_REASON = _choose()
IMPLEMENTATION: str = _ACTIVE.name


def status_line() -> str:
    """One line for the start-up log: which implementation is in use and why."""
    if FALLBACK_REASON is None:
        where = os.path.dirname(_ACTIVE.modules[0].__file__ or "")
        return ("speedups: the compiled Cython modules are in use (cmdparse, datareader, "
                f"spoolio in {where})")
    return (f"speedups: the pure-Python twins are in use ({FALLBACK_REASON}); the SMTP "
            "parser, DATA decoder and spool writes are slower (tools/bootstrap, or a pip "
            "install with a C compiler and Cython, builds the compiled modules)")


def required_error() -> str | None:
    """Why start-up must be refused: ``EMPATH_REQUIRE_SPEEDUPS`` is set (to anything but
    ``""`` or ``"0"``) and the twins are in use; None otherwise."""
    flag = os.environ.get("EMPATH_REQUIRE_SPEEDUPS", "")
    if not flag or flag == "0" or FALLBACK_REASON is None:
        return None
    return (f"EMPATH_REQUIRE_SPEEDUPS is set, but the compiled speedups are not in use "
            f"({FALLBACK_REASON}); build them (tools/bootstrap shows the compiler's errors) or "
            "unset EMPATH_REQUIRE_SPEEDUPS to run on the pure-Python twins")

split_command = _ACTIVE.split_command
parse_path = _ACTIVE.parse_path
decode_xtext = _ACTIVE.decode_xtext
encode_xtext = _ACTIVE.encode_xtext
DataReader = _ACTIVE.DataReader
dot_stuff = _ACTIVE.dot_stuff
has_bare_eol = _ACTIVE.has_bare_eol
store_file = _ACTIVE.store_file
write_all = _ACTIVE.write_all
make_slots = _ACTIVE.make_slots
sync_and_unlink = _ACTIVE.sync_and_unlink
StorePool = _ACTIVE.StorePool
list_names: Callable[..., list[str]] = _ACTIVE.list_names


class _Implementations(Mapping[str, SimpleNamespace]):
    """``{"python": ..., "cython": ...}``, loaded on access: looking up ``"cython"`` raises
    ImportError when the extension is not built (whatever ``EMPATH_NO_EXTENSIONS`` says)."""

    _NAMES = ("python", "cython")

    def __getitem__(self, name: str) -> SimpleNamespace:
        if name == "python":
            return _PYTHON
        if name == "cython":
            return _load_compiled()
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._NAMES)

    def __len__(self) -> int:
        return len(self._NAMES)


def implementations() -> Mapping[str, SimpleNamespace]:
    """Both implementations by name, each a namespace holding the public names above (plus
    ``name`` and ``modules``), for tests and benchmarks that compare the twins."""
    return _Implementations()

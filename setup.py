"""Build script: compiles the Cython speedups when it can, and never fails without them.

``EMPATH_NO_EXTENSIONS=1`` or a non-CPython interpreter skips the build; a missing compiler
or Cython makes the build fall back to the pure-Python twins with a printed notice (which pip
shows only with -v; the daemon then logs a WARNING at every start). With
``EMPATH_REQUIRE_SPEEDUPS=1`` (tools/bootstrap sets it) a failed compile fails the build, with
the compiler's error.
"""

import os
import platform
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

SPEEDUPS = ["cmdparse", "datareader", "spoolio"]


class OptionalBuildExt(build_ext):
    """build_ext that reports, rather than raises, a failed compile."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # compiler missing, headers missing, ...
            self._fallback(exc)

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._fallback(exc)

    @staticmethod
    def _fallback(exc: BaseException) -> None:
        if os.environ.get("EMPATH_REQUIRE_SPEEDUPS", "") not in ("", "0"):
            raise SystemExit(f"empath: compiling the speedups failed ({exc}) and "
                             "EMPATH_REQUIRE_SPEEDUPS is set")
        sys.stderr.write(
            f"empath: compiling the speedups failed ({exc}); "
            "the pure-Python twins will be used\n"
        )


def extensions() -> list:
    if os.environ.get("EMPATH_NO_EXTENSIONS") or platform.python_implementation() != "CPython":
        print("empath: building without the Cython speedups (pure-Python twins)")
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        if os.environ.get("EMPATH_REQUIRE_SPEEDUPS", "") not in ("", "0"):
            raise SystemExit("empath: Cython is not available and EMPATH_REQUIRE_SPEEDUPS "
                             "is set") from None
        print("empath: Cython not available; using the pure-Python twins")
        return []
    from setuptools import Extension

    exts = [
        Extension(f"empath._speedups.{name}", [f"empath/_speedups/{name}.pyx"],
                  extra_compile_args=["-O2"])
        for name in SPEEDUPS
    ]
    return cythonize(exts, language_level=3, quiet=True,
                     compiler_directives={"boundscheck": False, "wraparound": False})


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})

"""Build hook for fastgrok.

Everything declarative lives in pyproject.toml. This file builds the optional
C++ CPU engine in csrc/ as ``fastgrok._cpu_engine``. When the build fails
(no compiler, no OpenMP, an exotic platform), fastgrok still installs: the
failure is printed as a warning and written next to where the extension would
be, and ``fastgrok.backends.cpu_engine.CpuBackend.available()`` reports it.

Flags, first set that builds wins:
  1. -O3 -march=native -mprefer-vector-width=512 -ffp-contract=fast -fno-math-errno -fopenmp
     (AVX-512 where the build machine has it; GCC otherwise sticks to 256-bit)
  2. -O3 -ffp-contract=fast -fno-math-errno -fopenmp   (portable: the compiler's baseline ISA)
  3. -O3 -ffp-contract=fast -fno-math-errno            (no OpenMP: one thread)
FASTGROK_CPU_CFLAGS="..." replaces the list with one set of your own (e.g.
"-O3 -march=x86-64-v3 -fopenmp" for a binary that runs on any AVX2 machine).
-ffp-contract=fast lets the compiler fuse multiply-adds, as every BLAS does;
-fno-math-errno lets it vectorise sqrt (the engine never reads errno).
"""
import os
import shlex
import traceback
import warnings

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # pybind11 is a build requirement; without it, skip the engine
    Pybind11Extension = None

CPU_ENGINE = "fastgrok._cpu_engine"
BUILD_ERROR_FILE = "_cpu_engine_build_error.txt"
FLAG_SETS = [
    ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp"],
    ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp"],
    ["-O3", "-ffp-contract=fast", "-fno-math-errno"],
]


def flag_sets() -> list[list[str]]:
    custom = os.environ.get("FASTGROK_CPU_CFLAGS")
    return [shlex.split(custom)] if custom else FLAG_SETS


class OptionalCpuEngineBuild(build_ext):
    """build_ext that tries each flag set for the CPU engine and never fails the install."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # e.g. no C++ compiler found at all
            self._give_up([f"{type(exc).__name__}: {exc}"])

    def build_extension(self, ext):
        if ext.name != CPU_ENGINE:
            return super().build_extension(ext)
        base_args = list(ext.extra_compile_args)
        errors = []
        for flags in flag_sets():
            ext.extra_compile_args = base_args + flags
            ext.extra_link_args = [f for f in flags if f == "-fopenmp" or f.startswith("-fsanitize")]
            ext.define_macros = [("FASTGROK_BUILD_FLAGS", '"' + " ".join(flags) + '"')]
            try:
                super().build_extension(ext)
            except Exception as exc:
                errors.append(f"flags {' '.join(flags)}: {type(exc).__name__}: {exc}")
                continue
            self._error_file(ext).unlink(missing_ok=True)
            return
        self._give_up(errors, ext)

    def _error_file(self, ext):
        from pathlib import Path

        return Path(self.get_ext_fullpath(ext.name)).parent / BUILD_ERROR_FILE

    def _give_up(self, errors, ext=None):
        message = ("fastgrok's C++ CPU engine (fastgrok._cpu_engine) was not built; fastgrok works "
                   "without it (backend='torch'). Tried:\n  " + "\n  ".join(errors))
        warnings.warn(message)
        print("WARNING: " + message)
        if ext is not None:
            try:
                path = self._error_file(ext)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(message + "\n")
            except OSError:
                traceback.print_exc()


ext_modules = []
if Pybind11Extension is not None and os.path.exists("csrc/engine.cpp"):
    ext_modules.append(Pybind11Extension(
        CPU_ENGINE, ["csrc/engine.cpp", "csrc/bindings.cpp"], include_dirs=["csrc"], cxx_std=17,
        depends=["csrc/engine.hpp", "csrc/gemm.hpp", "csrc/precision.hpp", "csrc/vec.hpp"]))

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalCpuEngineBuild})

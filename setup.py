"""Build glue: compiles the C++ kernel core (csrc/) with CMake into quantlab/kernels/.

All metadata lives in pyproject.toml; this file only adds the CMake build step. If no C++ compiler
or cmake is available the install still succeeds without the library, and quantlab.kernels falls
back to numpy (and says so). Environment:

- ``QUANTLAB_CUDA=ON`` also builds the CUDA library (nvcc, sm_80 + sm_90); default OFF here.
- ``QUANTLAB_REQUIRE_KERNELS=1`` turns a failed C++ build into a failed install (CI).
- ``CMAKE_BUILD_PARALLEL_LEVEL`` build jobs (default 2).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """A shared library built by CMake target ``target`` (loaded with ctypes, not imported)."""

    def __init__(self, name: str, target: str, output: str):
        super().__init__(name, sources=[])
        self.target = target
        self.output = output


class CMakeBuild(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        # A plain "<name>.so": ctypes loads it by that name, it is not a Python extension module.
        return os.path.join(*fullname.split(".")) + ".so"

    def build_extension(self, ext: Extension) -> None:
        dest = Path(self.get_ext_fullpath(ext.name)).resolve()
        try:
            self._build(ext, dest)
        except (OSError, subprocess.CalledProcessError, RuntimeError) as err:
            if os.environ.get("QUANTLAB_REQUIRE_KERNELS") == "1":
                raise
            sys.stderr.write(
                f"WARNING: quantlab: could not build {ext.output} ({err}); installing without it. "
                "quantlab.kernels will use its numpy fallback.\n"
            )

    def _build(self, ext: CMakeExtension, dest: Path) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found")
        cuda = os.environ.get("QUANTLAB_CUDA", "OFF").upper()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                cmake,
                "-S",
                str(ROOT),
                "-B",
                str(build_dir),
                "-DCMAKE_BUILD_TYPE=Release",
                "-DQUANTLAB_BUILD_TESTS=OFF",
                f"-DQUANTLAB_CUDA={cuda}",
            ],
            check=True,
        )
        targets = [ext.target] + (["quantlab_cuda"] if cuda == "ON" else [])
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs, "--target", *targets], check=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        _install(build_dir / ext.output, dest)
        if cuda == "ON":
            _install(build_dir / "_libquantlab_cuda.so", dest.parent / "_libquantlab_cuda.so")


def _install(src: Path, dest: Path) -> None:
    """Copies then renames: a process that has the old library mapped keeps its (old) inode."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dest)


setup(
    ext_modules=[
        CMakeExtension("quantlab.kernels._libquantlab_kernels", "quantlab_kernels", "_libquantlab_kernels.so")
    ],
    cmdclass={"build_ext": CMakeBuild},
)

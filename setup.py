"""Build script: compiles the two native extensions.

* ``wcfs._fuse``        -- thin Cython binding over libfuse3's low-level API (C).
* ``wcfs_client._wcfs`` -- Cython bindings over the C++17 client core in
  ``wcfs_client/cpp``.

Package metadata lives in pyproject.toml; this file only describes extensions,
because their flags (pkg-config for libfuse3, C++17) need code.
"""
import glob
import shlex
import subprocess

from Cython.Build import cythonize
from setuptools import Extension, setup


def pkgconfig(pkg: str, flag: str) -> list[str]:
    try:
        out = subprocess.run(["pkg-config", flag, pkg], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"setup.py: pkg-config {flag} {pkg} failed ({e}); "
                         "install libfuse3-dev and pkg-config (see README)") from e
    return shlex.split(out)


fuse_cflags = pkgconfig("fuse3", "--cflags")
fuse_libs = pkgconfig("fuse3", "--libs")

extensions = [
    Extension(
        "wcfs._fuse",
        sources=["wcfs/_fuse.pyx"],
        extra_compile_args=fuse_cflags + ["-O2", "-Wall", "-Wno-unused-function"],
        extra_link_args=fuse_libs + ["-pthread"],
    ),
    Extension(
        "wcfs_client._wcfs",
        sources=["wcfs_client/_wcfs.pyx"] + sorted(glob.glob("wcfs_client/cpp/*.cpp")),
        include_dirs=["wcfs_client/cpp"],
        language="c++",
        extra_compile_args=["-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                            "-pthread", "-fno-strict-aliasing"],
        extra_link_args=["-pthread"],
        depends=sorted(glob.glob("wcfs_client/cpp/*.h")),
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"embedsignature": True},
    ),
)

"""Build the native data lane (tierswap._lane); everything else is in pyproject.toml.

The lane links the system's libzstd, liblmdb and liblz4 (Debian: libzstd-dev, liblmdb-dev,
liblz4-dev; .ci/setup installs them). See docs/design.md, "The native lane".
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tierswap._lane",
            sources=[f"tierswap/native/{name}.c"
                     for name in ("module", "fuse", "io", "map", "space", "codec")],
            depends=["tierswap/native/lane.h"],
            libraries=["zstd", "lmdb", "lz4"],
            extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-fno-strict-aliasing"],
        )
    ]
)

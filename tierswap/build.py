"""What this installation of tierswap is built from: its own version and the pyfuse3 build.

`tierswap --version` prints `version_text()`; `tierswap up` calls `require_pyfuse3()` before
it touches anything, so that an installation whose pyfuse3 does not import refuses in one line
instead of starting half-way.

Patched or not: .ci/install and .ci/setup build pyfuse3 from the pinned sdist with our patches
(docs/pyfuse3-fallocate.md), and `--version` says whether the imported build has them (the
fallocate patch adds ``pyfuse3.Operations.fallocate``; a version label can be copied onto any
build, the method is the patch itself). Since the native lane answers every request after INIT,
FALLOCATE (the kernel's discards) included, the patches are off the daemon's path: the stock
PyPI build frees slots the same (measured: the discard test's punches reach the lane equally
with either), so an unpatched build is not refused.

Limits: this looks at the pyfuse3 that this interpreter imports, not at whatever a shard
process might import from elsewhere (they all run with the same interpreter and sys.path).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

from tierswap.errors import StartError

# How to get a working build, for the refusal's one line.
HOW_TO_GET_IT = ("install tierswap with 'bash .ci/install' (or 'bash .ci/setup' for the "
                 "development venv); see docs/pyfuse3-fallocate.md")


@dataclass(frozen=True)
class Pyfuse3Build:
    version: str | None  # None: pyfuse3 is not installed (or does not import)
    patched: bool  # has Operations.fallocate, i.e. our fallocate patch
    error: str | None = None  # why it does not import

    def describe(self) -> str:
        if self.version is None:
            return f"pyfuse3 not importable ({self.error})"
        state = ("patched: Operations.fallocate" if self.patched
                 else "not patched: no Operations.fallocate, which the native lane does not need")
        return f"pyfuse3 {self.version} ({state})"


def tierswap_version() -> str:
    try:
        return metadata.version("tierswap")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def pyfuse3_build() -> Pyfuse3Build:
    try:
        import pyfuse3
    except Exception as e:  # ImportError, or a broken extension (OSError from its libfuse)
        return Pyfuse3Build(None, False, f"{type(e).__name__}: {e}".splitlines()[0])
    try:
        version = metadata.version("pyfuse3")
    except metadata.PackageNotFoundError:
        version = str(getattr(pyfuse3, "__version__", "unknown"))
    return Pyfuse3Build(version, hasattr(pyfuse3.Operations, "fallocate"))


def version_text() -> str:
    """Two lines: tierswap's version, then the pyfuse3 build it imports."""
    return f"tierswap {tierswap_version()}\n{pyfuse3_build().describe()}"


def require_pyfuse3() -> None:
    """Raise StartError (one line) unless pyfuse3 imports: without it nothing can mount."""
    build = pyfuse3_build()
    if build.version is None:
        raise StartError(f"{build.describe()}: tierswap needs pyfuse3 to mount its file "
                         "system; " + HOW_TO_GET_IT)

# Shell functions shared by .ci/setup (the development venv) and .ci/install (the real
# install): root and Python checks, Debian packages, the patched pyfuse3 wheel.
# Sourced, never run; the caller sets REPO and PROG (the name in error lines).

say() { printf '==> %s\n' "$*"; }
die() { printf '%s: error: %s\n' "${PROG:-tierswap}" "$*" >&2; exit 1; }

PYFUSE3_VERSION=3.5.0
PYFUSE3_SDIST_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
# Applied in this order (docs/pyfuse3-fallocate.md).
PATCHES=("$REPO/tierswap/contrib/pyfuse3-$PYFUSE3_VERSION-fallocate.patch"
         "$REPO/tierswap/contrib/pyfuse3-$PYFUSE3_VERSION-try-read-first.patch")
# The local version label names the patch, so that `pip list` and `tierswap --version` show
# the patched build and a changed patch gets rebuilt. "==3.5.0" still matches it.
PATCH_ID="$(cat "${PATCHES[@]}" | sha256sum | cut -c1-10)"
PYFUSE3_LOCAL_VERSION="$PYFUSE3_VERSION+tierswap.p$PATCH_ID"
# The patched build is kept as a wheel here: the dev venv, the floor venv (.ci/floor) and the
# real install use the same build, and a reinstall needs no rebuild.
WHEELS="$REPO/.wheels"

require_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
}

# Refuse an interpreter older than pyproject's requires-python before anything is installed.
# Without python3 yet (a minimal image), ask apt which version it would install.
MIN_PYTHON=3.11
check_python() {
    local have
    if command -v python3 >/dev/null; then
        have="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    else
        apt_update_once
        have="$(apt-cache policy python3 | awk '/Candidate:/ {print $2}')"
        [[ -n "$have" && "$have" != "(none)" ]] || die "no python3 package available from apt"
    fi
    dpkg --compare-versions "$have" ge "$MIN_PYTHON" \
        || die "python3 is $have; tierswap needs Python >= $MIN_PYTHON (Debian 12, Ubuntu 23.04 or newer)"
    say "python3 $have (>= $MIN_PYTHON)"
}

APT_UPDATED=
apt_update_once() {
    [[ -n "$APT_UPDATED" ]] && return 0
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
}

# apt_ensure PKG...: install the packages that are not installed yet.
apt_ensure() {
    local missing=() pkg
    for pkg in "$@"; do
        if [[ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null)" != "ii "* ]]; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]})); then
        say "apt: installing ${missing[*]}"
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    else
        say "apt: all system packages present"
    fi
}

# pyfuse3_patched PY: does the interpreter PY import exactly our patched build?
pyfuse3_patched() {
    "$1" - "$PYFUSE3_LOCAL_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version

import pyfuse3

sys.exit(0 if version("pyfuse3") == sys.argv[1]
         and hasattr(pyfuse3.Operations, "fallocate") else 1)
EOF
}

# The wheel already built for this patch set, or nothing (a glob that matches nothing is
# not an error: `ls` of it would end the script under set -e and pipefail).
built_wheel() {
    local f
    for f in "$WHEELS"/pyfuse3-"$PYFUSE3_LOCAL_VERSION"-*.whl; do
        if [[ -f "$f" ]]; then printf '%s' "$f"; return 0; fi
    done
}

# pyfuse3_wheel PY: set PYFUSE3_WHEEL to the patched wheel, building it with PY's pip into
# $WHEELS when it is not there. TIERSWAP_PYFUSE3_WHEEL names a ready wheel instead (no build).
pyfuse3_wheel() {
    local py="$1" work sdist src p
    if [[ -n "${TIERSWAP_PYFUSE3_WHEEL:-}" ]]; then
        [[ -f "$TIERSWAP_PYFUSE3_WHEEL" ]] || die "TIERSWAP_PYFUSE3_WHEEL: no such file: $TIERSWAP_PYFUSE3_WHEEL"
        PYFUSE3_WHEEL="$TIERSWAP_PYFUSE3_WHEEL"
        say "pyfuse3: using $PYFUSE3_WHEEL"
        return 0
    fi
    PYFUSE3_WHEEL="$(built_wheel)"
    if [[ -n "$PYFUSE3_WHEEL" ]]; then
        say "pyfuse3: wheel $(basename "$PYFUSE3_WHEEL") present"
        return 0
    fi
    say "pyfuse3: building $PYFUSE3_LOCAL_VERSION from the sdist"
    work="$(mktemp -d)"
    # --no-binary pyfuse3, not :all:, which would also force pip to build the
    # sdist's build requirements (Cython, setuptools) from source.
    "$py" -m pip download -q --no-deps --no-binary pyfuse3 -d "$work" "pyfuse3==$PYFUSE3_VERSION"
    sdist="$work/pyfuse3-$PYFUSE3_VERSION.tar.gz"
    [[ -f "$sdist" ]] || { rm -rf "$work"; die "pip download did not produce $sdist"; }
    echo "$PYFUSE3_SDIST_SHA256  $sdist" | sha256sum -c --quiet - \
        || { rm -rf "$work"; die "unexpected sha256 of $sdist"; }
    tar -xzf "$sdist" -C "$work"
    src="$work/pyfuse3-$PYFUSE3_VERSION"
    for p in "${PATCHES[@]}"; do
        patch -p1 --forward --quiet -d "$src" < "$p"
    done
    # The sdist ships Cython output generated from the unpatched sources; remove it so the
    # build has to re-cythonize (Cython comes from pyfuse3's build-system requirements).
    rm -f "$src/src/pyfuse3/__init__.c"
    mkdir -p "$WHEELS"
    SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3="$PYFUSE3_LOCAL_VERSION" \
        "$py" -m pip wheel -q --no-deps -w "$WHEELS" "$src"
    rm -rf "$work"
    PYFUSE3_WHEEL="$(built_wheel)"
    [[ -n "$PYFUSE3_WHEEL" ]] || die "pip wheel did not produce a pyfuse3 $PYFUSE3_LOCAL_VERSION wheel"
}

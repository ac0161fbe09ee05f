# Shared set-up steps for scripts/test and scripts/demo (sourced, not run).

# apt-get install the named Debian packages unless all are already installed.
ensure_apt_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "== installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Create .venv with Python >= 3.11 and install the package (with the named extras) when it changed.
ensure_venv() {
    local extras="${1:-}"
    local py="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        echo "== creating .venv"
        if ! "$py" -m venv .venv 2>/dev/null; then
            # Debian's own python3 ships venv support separately
            rm -rf .venv
            ensure_apt_packages python3-venv
            "$py" -m venv .venv
        fi
    fi
    if ! installed_for "$extras"; then
        ensure_compiler
        echo "== installing sipis-console${extras:+[$extras]} into .venv (compiles the SIP layer)"
        .venv/bin/pip install -q --upgrade pip >/dev/null
        pip_install -e ".${extras:+[$extras]}"
        echo "${extras:-base}" >"$INSTALL_STAMP"
    fi
    ensure_compiled
}

# The one install stamp: which extras the install has, written after it; older than pyproject.toml or
# setup.py means stale. Any install serves a plain one, so scripts/demo after scripts/test (extras
# "test") installs nothing again.
INSTALL_STAMP=".venv/.installed"
installed_for() {
    local extras="${1:-}"
    [ -f "$INSTALL_STAMP" ] && [ ! pyproject.toml -nt "$INSTALL_STAMP" ] && [ ! setup.py -nt "$INSTALL_STAMP" ] \
        || return 1
    [ -z "$extras" ] || grep -qx "$extras" "$INSTALL_STAMP"
}

# pip install, its chatter kept in .venv/install.log: shown whole when it fails, else only the
# build's own notes (e.g. that the SIP layer could not be compiled).
pip_install() {
    if ! .venv/bin/pip install -q "$@" >.venv/install.log 2>&1; then
        cat .venv/install.log >&2
        return 1
    fi
    grep "sipis-console build:" .venv/install.log >&2 || true
}

# A C compiler and the Python headers, so that setup.py can compile the SIP layer's hot modules.
ensure_compiler() {
    local include
    include=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    if command -v gcc >/dev/null && [ -f "$include/Python.h" ]; then
        return 0
    fi
    ensure_apt_packages gcc python3-dev
}

# Recompile when a compiled module's source changed since the last build (until then the package
# runs those modules as Python: sipis/sip/_implementation.py).
ensure_compiled() {
    if .venv/bin/python -m sipis.sip >/dev/null; then
        return 0
    fi
    echo "== recompiling the SIP layer (its sources changed)"
    pip_install --no-deps -e .
}

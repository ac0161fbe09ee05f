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
    local stamp=".venv/.installed-${extras:-base}"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "== installing sipis-console${extras:+[$extras]} into .venv"
        .venv/bin/pip install -q --upgrade pip >/dev/null
        .venv/bin/pip install -q -e ".${extras:+[$extras]}"
        touch "$stamp"
    fi
}

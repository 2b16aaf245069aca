#!/usr/bin/env bash
# Writes requirements/lock.txt: the pip constraints file that `make install` (so `make test`, `make demo`) installs
# with, so that the README's two commands install one committed, CI-tested set on any day, whatever is released.
#
#   scripts/refresh_lock.sh              # a fresh venv: torch==2.13.0 first, then mm-lens[dev] from this checkout at
#                                        # the newest releases inside pyproject.toml's declared ranges; freeze it
#   scripts/refresh_lock.sh --venv DIR   # freeze an existing venv instead (e.g. .venv made by `make install`)
#
# The lock holds exact `==` pins of every package in that venv (`pip freeze --exclude-editable`), less mm-lens
# itself, with torch pinned to torch==2.13.0 (the CPU wheel here: no `+cpu` local label, no file:// URL).
# When to refresh: after raising a ceiling in pyproject.toml (see scripts/try_newest.sh and the README's
# "Dependency versions"), or to take newer releases of the unfenced dependencies. Then run `make test`
# (the stamp depends on the lock, so .venv is brought to the new set) and commit pyproject.toml and the lock together.
# Environment: PYTHON (default python3; the lock is resolved for that Python's version).
set -euo pipefail

venv=""
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) venv=${2:?--venv needs a directory}; shift 2 ;;
        *) echo "usage: $0 [--venv DIR]" >&2; exit 2 ;;
    esac
done

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
torch_pin="torch==2.13.0"  # resolves to the CPU wheel here; never install an unpinned torch
lock="$repo/requirements/lock.txt"
work=$(mktemp -d "${TMPDIR:-/tmp}/mm-lens-lock.XXXXXX")
trap 'rm -rf "$work"' EXIT
unset PYTHONPATH
quiet_pip() {
    local status=0
    "$@" >"$work/pip.log" 2>&1 || status=$?
    grep -v "^WARNING: Location 'file:" "$work/pip.log" || true
    return "$status"
}

if [ -z "$venv" ]; then
    venv="$work/venv"
    echo "refresh_lock: fresh venv, $torch_pin, then mm-lens[dev] at the newest releases in the declared ranges"
    "$python" -m venv "$venv"
    quiet_pip "$venv/bin/python" -m pip install -q --upgrade pip
    quiet_pip "$venv/bin/python" -m pip install -q "$torch_pin"
    echo "$torch_pin" >"$work/torch.txt"  # the resolver may not move torch
    quiet_pip "$venv/bin/python" -m pip install -q -c "$work/torch.txt" -e "$repo[dev]"
    quiet_pip "$venv/bin/python" -m pip check
    source_desc="a fresh venv: $torch_pin, then \`pip install -e \".[dev]\"\` (newest releases in pyproject.toml's ranges)"
else
    venv=$(cd "$venv" && pwd)
    source_desc="the venv $(basename "$venv")"
fi

pyver=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
"$venv/bin/python" -m pip freeze --exclude-editable >"$work/freeze.txt"
"$venv/bin/python" - "$work/freeze.txt" "$torch_pin" >"$work/pins.txt" <<'EOF'
import re, sys
from packaging.utils import canonicalize_name
freeze, torch_pin = sys.argv[1:]
pins = {}
for line in open(freeze):
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;@]+)", line)
    if not m:
        sys.exit(f"refresh_lock: not an exact pin (a URL or VCS install?): {line!r}")
    name, version = m.groups()
    key = canonicalize_name(name)
    if key == "mm-lens":
        continue
    pins[key] = torch_pin if key == "torch" else f"{name}=={version}"
pins["torch"] = torch_pin
print("\n".join(pins[k] for k in sorted(pins)))
EOF

mkdir -p "$(dirname "$lock")"
{
    echo "# The locked, CI-tested dependency set of mm-lens (Python $pyver): a pip constraints file, exact pins only."
    echo "# \`make install\` (so \`make test\`, \`make demo\`) installs with \`-c requirements/lock.txt\`; CI runs \`make test\`"
    echo "# on it. The wheel does not carry it: a user who installs the wheel gets pyproject.toml's declared ranges."
    echo "# Produced by scripts/refresh_lock.sh from $source_desc:"
    echo "# pip freeze --exclude-editable, less mm-lens itself, torch pinned to $torch_pin (the CPU wheel)."
    echo "# Refresh: bash scripts/refresh_lock.sh (after raising a ceiling in pyproject.toml; see the README's"
    echo "# \"Dependency versions\"), then \`make test\`, and commit pyproject.toml and this file together."
    cat "$work/pins.txt"
} >"$lock"
echo "refresh_lock: wrote $(grep -vc '^#' "$lock") pins to ${lock#"$repo"/}:"
grep -iE '^(torch|transformers|transformer[-_]lens|huggingface[-_]hub)==' "$lock" | sed 's/^/    /'

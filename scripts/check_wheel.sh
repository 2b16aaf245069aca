#!/usr/bin/env bash
# The wheel as a user gets it: build the sdist and the wheel (from the sdist) out of a clean checkout of HEAD
# (`git archive`: committed files only), install the wheel with the CPU torch wheel into a fresh virtual environment,
# `pip check` it, and run `mm-lens demo` from a directory outside the repository.
#
#   scripts/check_wheel.sh            # the check above (about 3 minutes on 2 cores, most of it the demo)
#   scripts/check_wheel.sh --floors   # then again with every dependency pinned to its floor (torch excepted: its
#                                     # floor has no CPU wheel, so the CPU torch==2.13.0 stays), and a short demo
#
# Environment: PYTHON (default python3), KEEP=1 keeps the work directory, MM_LENS_DEMO_ARGS adds demo arguments.
set -euo pipefail

floors=0
for arg in "$@"; do
    case "$arg" in
        --floors) floors=1 ;;
        *) echo "usage: $0 [--floors]" >&2; exit 2 ;;
    esac
done

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
torch_pin="torch==2.13.0"  # resolves to the CPU wheel here; never install an unpinned torch
work=$(mktemp -d "${TMPDIR:-/tmp}/mm-lens-wheel.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "work directory: $work"; else trap 'rm -rf "$work"' EXIT; fi
unset PYTHONPATH
export HF_HUB_OFFLINE=1
start=$SECONDS
step() { printf '[check_wheel %4ds] %s\n' $((SECONDS - start)) "$*"; }
# Runs a pip command, printing its output less the local index's "Location ... is ignored" warnings.
quiet_pip() {
    local status=0
    "$@" >"$work/pip.log" 2>&1 || status=$?
    grep -v "^WARNING: Location 'file:" "$work/pip.log" || true
    return "$status"
}

step "clean checkout of $(git -C "$repo" rev-parse --short HEAD) (git archive)"
mkdir "$work/src"
git -C "$repo" archive HEAD | tar -x -C "$work/src"

step "build sdist and wheel (python -m build: the wheel is built from the sdist)"
"$python" -m venv "$work/build-env"
quiet_pip "$work/build-env/bin/python" -m pip install -q "build>=1.2"
quiet_pip "$work/build-env/bin/python" -m build -q --outdir "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/*.whl)
step "$(basename "$wheel"): $(du -h "$wheel" | cut -f1); toy checkpoint files in it:"
"$work/build-env/bin/python" - "$wheel" <<'EOF'
import sys, zipfile
names = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.startswith("mm_lens/_assets/toy-llava/")]
print("   ", ", ".join(n.rsplit("/", 1)[1] for n in sorted(names)))
sys.exit(0 if "mm_lens/_assets/toy-llava/model.safetensors" in names else "the toy checkpoint is not in the wheel")
EOF

# check ENV_NAME DEMO_ARGS... : pip check, the toy checkpoint comes from the installed package, the demo runs.
check() {
    local env="$work/$1"; shift
    quiet_pip "$env/bin/python" -m pip check
    mkdir -p "$work/elsewhere" && cd "$work/elsewhere"
    "$env/bin/python" - "$env" <<'EOF'
import sys
from pathlib import Path
import mm_lens
from mm_lens.demo import toy_model_path
env, path = Path(sys.argv[1]).resolve(), toy_model_path()
assert Path(mm_lens.__file__).resolve().is_relative_to(env), f"mm_lens imported from {mm_lens.__file__}, not {env}"
assert path.is_relative_to(env) and path.parts[-3:] == ("mm_lens", "_assets", "toy-llava"), path
print(f"    toy checkpoint: {path}")
EOF
    step "mm-lens demo $* (cwd $PWD)"
    "$env/bin/mm-lens" demo --out "$work/demo-$(basename "$env")" "$@" ${MM_LENS_DEMO_ARGS:-} >"$work/demo.log" 2>&1 \
        || { tail -30 "$work/demo.log"; echo "mm-lens demo failed" >&2; return 1; }
    test -s "$work/demo-$(basename "$env")/report.html" || { echo "mm-lens demo wrote no report.html" >&2; return 1; }
    cd "$repo"
}

step "fresh venv: $torch_pin, then the wheel"
"$python" -m venv "$work/venv"
quiet_pip "$work/venv/bin/python" -m pip install -q "$torch_pin"
quiet_pip "$work/venv/bin/python" -m pip install -q "$wheel"
step "pip check"
check venv
step "installed wheel: pip check clean, demo wrote report.html"

if [ "$floors" = 1 ]; then
    step "floors: every dependency pinned to its floor"
    "$work/build-env/bin/python" - "$wheel" "$torch_pin" >"$work/floors.txt" <<'EOF'
import sys, zipfile
from email.parser import Parser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
wheel, torch_pin = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
for line in meta.get_all("Requires-Dist"):
    req = Requirement(line)
    if req.marker is not None:  # extras (dev, accelerate)
        continue
    lows = [s.version for s in req.specifier if s.operator == ">="]
    if not lows:
        sys.exit(f"no floor for {line!r}")
    print(torch_pin if canonicalize_name(req.name) == "torch" else f"{req.name}=={lows[0]}")
EOF
    sed 's/^/    /' "$work/floors.txt"
    "$python" -m venv "$work/venv-floors"
    quiet_pip "$work/venv-floors/bin/python" -m pip install -q "$torch_pin"
    quiet_pip "$work/venv-floors/bin/python" -m pip install -q -c "$work/floors.txt" "$wheel"
    step "floors: pip check"
    check venv-floors --per-task 3
    step "floors: pip check clean, demo wrote report.html"
fi
step "ok"

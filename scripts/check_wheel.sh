#!/usr/bin/env bash
# The wheel as a user gets it: build the sdist and the wheel (from the sdist) out of a clean checkout of HEAD
# (`git archive`: committed files only), install the wheel with the CPU torch wheel into a fresh virtual environment,
# `pip check` it, run `mm-lens demo` from a directory outside the repository, and run the engine equivalence tests
# (tests/test_engine.py, test_compat.py, test_selfcheck.py) against the installed package.
# That venv has no constraints (torch aside): it is the newest releases inside pyproject.toml's declared ranges, as a
# user who installs the wheel today gets them. The script checks that pip resolved the newest release in range of
# every fenced dependency (those with a `<=` ceiling: so CI has run each ceiling itself) and fails if not; for the
# others it only reports an older one. It prints the versions of transformers, transformer_lens, huggingface_hub and
# torch in each venv. (The locked set, requirements/lock.txt, is `make test`'s; beyond the ceilings: try_newest.sh.)
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

# versions ENV_NAME : the installed versions of the packages that matter most.
versions() {
    "$work/$1/bin/python" - <<'EOF'
import importlib.metadata as md
for name in ("transformers", "transformer_lens", "huggingface_hub", "torch"):
    print(f"    {name:<17} {md.version(name)}")
EOF
}

# newest_in_range ENV_NAME : each unconditional requirement of the wheel (torch aside: pinned to the CPU wheel) is at
# the newest release that its own specifier admits (pip's choice for it alone, --no-deps). Fails for a fenced one.
newest_in_range() {
    local env="$work/$1"
    "$work/build-env/bin/python" - "$wheel" >"$work/ranges.txt" <<'EOF'
import sys, zipfile
from email.parser import Parser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
for line in meta.get_all("Requires-Dist"):
    req = Requirement(line)
    if req.marker is None and canonicalize_name(req.name) != "torch":
        print(f"{req.name}{req.specifier}")
EOF
    # shellcheck disable=SC2046
    quiet_pip "$env/bin/python" -m pip install -q --dry-run --no-deps --ignore-installed --report "$work/newest.json" \
        $(cat "$work/ranges.txt")
    "$env/bin/python" - "$work/ranges.txt" "$work/newest.json" <<'EOF'
import importlib.metadata as md, json, sys
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
reqs = [Requirement(line) for line in open(sys.argv[1]).read().split()]
report = json.load(open(sys.argv[2]))["install"]
newest = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in report}
bad = []
print(f"    {'package':<17} {'declared':<22} {'newest in range':<16} installed")
for req in reqs:
    fenced = any(s.operator == "<=" for s in req.specifier)
    have, top = md.version(req.name), newest[canonicalize_name(req.name)]
    note = "" if have == top else ("  <- NOT the newest in range" if fenced else "  (older: held back by a dependent)")
    print(f"    {req.name:<17} {str(req.specifier):<22} {top:<16} {have}{note}")
    if fenced and have != top:
        bad.append(f"{req.name} {have} (newest in range {top})")
    elif fenced and any(s.operator == "<=" and s.version != top for s in req.specifier):
        print(f"    note: {req.name}'s ceiling is not a release on this index; its newest in range is {top}")
sys.exit(f"not the newest release in range: {', '.join(bad)}" if bad else 0)
EOF
}

# check ENV_NAME DEMO_ARGS... : pip check, the toy checkpoint comes from the installed package, the demo runs.
check() {
    local env="$work/$1"; shift
    versions "$(basename "$env")"
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

# equivalence ENV_NAME : the engine equivalence, cache and self-check tests against the installed wheel (a copy of
# tests/ run outside the checkout, so that mm_lens comes from the venv): the numbers must hold on every tested set.
equivalence() {
    local env="$work/$1"
    quiet_pip "$env/bin/python" -m pip install -q -c "$work/torch-only.txt" "pytest>=8"
    rm -rf "$work/tests" && cp -r "$repo/tests" "$work/tests"
    (cd "$work/tests" && "$env/bin/python" -c "import mm_lens, sys; sys.exit(0 if '$env' in mm_lens.__file__ else \
        'mm_lens imported from ' + mm_lens.__file__)" && "$env/bin/pytest" -q -p no:cacheprovider --rootdir . \
        test_compat.py test_selfcheck.py test_engine.py) || { echo "equivalence tests failed in $1" >&2; return 1; }
}
echo "$torch_pin" >"$work/torch-only.txt"

step "fresh venv: $torch_pin, then the wheel"
"$python" -m venv "$work/venv"
quiet_pip "$work/venv/bin/python" -m pip install -q "$torch_pin"
quiet_pip "$work/venv/bin/python" -m pip install -q "$wheel"
step "newest releases in the declared ranges: pip's choice for each requirement alone, and what it installed"
newest_in_range venv
step "installed versions, pip check"
check venv
step "newest in range: engine equivalence, cache and self-check tests"
equivalence venv
step "installed wheel (newest in range): pip check clean, demo wrote report.html, equivalence tests pass"

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
    step "floors: installed versions, pip check"
    check venv-floors --per-task 3
    step "floors: engine equivalence, cache and self-check tests"
    equivalence venv-floors
    step "floors: pip check clean, demo wrote report.html, equivalence tests pass"
fi
step "ok"

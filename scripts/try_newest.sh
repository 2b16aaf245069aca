#!/usr/bin/env bash
# Tries mm-lens on the newest releases *beyond* pyproject.toml's ceilings: the first step of raising one.
#
# The fenced dependencies are those with a `<=` ceiling (transformers, transformer_lens, huggingface_hub: mm-lens
# relies on their internals; see the comment above `dependencies` in pyproject.toml). In a fresh venv: torch==2.13.0
# first (the CPU wheel; the resolver may never move it), then mm-lens from this checkout (editable, --no-deps), then
# its declared requirements and dev extra with every `<=` ceiling stripped, then `pip install -U` of the fenced
# packages. It prints a table (package, ceiling, newest installed, beyond the ceiling or not) and runs the core checks:
#   - HF_HUB_OFFLINE=1 pytest -q -x on tests/test_compat.py, test_engine.py, test_sweep.py, test_model.py (those present)
#   - mm-lens demo --per-task 3 (it must write report.html)
# Its last line is "try_newest: PASS ..." (exit 0) or "try_newest: FAIL: <what failed>" (exit 1). When nothing is
# beyond the ceilings it says so and still runs the checks.
#
# Raising a ceiling (the README's "Dependency versions"):
#   1. bash scripts/try_newest.sh          # PASS on the release you mean to admit
#   2. raise the ceiling in pyproject.toml to that release, deliberately (one package at a time is easiest to read)
#   3. bash scripts/refresh_lock.sh        # requirements/lock.txt at the new newest-in-range set
#   4. make test && bash scripts/check_wheel.sh --floors, then commit pyproject.toml and the lock together
# A FAIL names what broke: fix mm-lens (mm_lens/compat.py is the place for version shims) or keep the ceiling.
#
# CI (.ci/run) runs it and reports its result without failing on it. About 4-6 minutes on 2 cores.
# Environment: PYTHON (default python3), KEEP=1 keeps the work directory, TRY_NEWEST_TESTS replaces the test files.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
torch_pin="torch==2.13.0"  # resolves to the CPU wheel here; never install an unpinned torch
tests=${TRY_NEWEST_TESTS:-tests/test_compat.py tests/test_engine.py tests/test_sweep.py tests/test_model.py}
work=$(mktemp -d "${TMPDIR:-/tmp}/mm-lens-newest.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "work directory: $work"; else trap 'rm -rf "$work"' EXIT; fi
unset PYTHONPATH
export HF_HUB_OFFLINE=1
start=$SECONDS
step() { printf '[try_newest %4ds] %s\n' $((SECONDS - start)) "$*"; }
quiet_pip() {
    local status=0
    "$@" >"$work/pip.log" 2>&1 || status=$?
    grep -v "^WARNING: Location 'file:" "$work/pip.log" || true
    return "$status"
}
fail() { echo "try_newest: FAIL: $*"; exit 1; }
venv="$work/venv"
py="$venv/bin/python"
echo "$torch_pin" >"$work/torch.txt"

step "fresh venv: $torch_pin, then mm-lens from the checkout (editable, --no-deps)"
"$python" -m venv "$venv" || fail "could not create a venv"
quiet_pip "$py" -m pip install -q --upgrade pip || fail "pip upgrade"
quiet_pip "$py" -m pip install -q "$torch_pin" || fail "install $torch_pin"
quiet_pip "$py" -m pip install -q --no-deps -e "$repo" || fail "install mm-lens --no-deps"
quiet_pip "$py" -m pip install -q -c "$work/torch.txt" packaging || fail "install packaging"  # to read the requirements

# The declared requirements (and the dev extra) with the `<=` ceilings stripped; the fenced names and ceilings aside.
"$py" - "$work/reqs.txt" "$work/fenced.txt" <<'EOF' || fail "could not read mm-lens's requirements"
import importlib.metadata as md, sys
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
reqs_out, fenced_out = (open(p, "w") for p in sys.argv[1:])
for line in md.requires("mm-lens"):
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": "dev"}):
        continue  # other extras (accelerate)
    ceilings = [s for s in req.specifier if s.operator == "<="]
    if ceilings:
        print(req.name, ",".join(str(s) for s in ceilings), file=fenced_out)
    kept = SpecifierSet(",".join(str(s) for s in req.specifier if s.operator != "<="))
    print(f"{req.name}{kept}", file=reqs_out)
EOF
[ -s "$work/fenced.txt" ] || echo "    (no requirement has a <= ceiling)"
mapfile -t fenced_names < <(cut -d' ' -f1 "$work/fenced.txt")
step "the declared requirements with the ceilings lifted: $(tr '\n' ' ' <"$work/reqs.txt")"
quiet_pip "$py" -m pip install -q -c "$work/torch.txt" -r "$work/reqs.txt" || fail "install of the requirements without ceilings"
if [ ${#fenced_names[@]} -gt 0 ]; then
    step "pip install -U ${fenced_names[*]}"
    quiet_pip "$py" -m pip install -q -U -c "$work/torch.txt" "${fenced_names[@]}" || fail "pip install -U ${fenced_names[*]}"
fi

step "the fenced packages: ceiling, newest installed"
"$py" - "$work/fenced.txt" "$work/beyond.txt" <<'EOF' || fail "could not read the installed versions"
import importlib.metadata as md, sys
from packaging.specifiers import SpecifierSet
rows = [line.split() for line in open(sys.argv[1]) if line.strip()]
beyond = []
print(f"    {'package':<17} {'ceiling':<10} {'installed':<10} beyond the ceiling")
for name, ceiling in rows:
    have = md.version(name)
    out = not SpecifierSet(ceiling).contains(have, prereleases=True)
    print(f"    {name:<17} {ceiling:<10} {have:<10} {'YES' if out else 'no'}")
    if out:
        beyond.append(f"{name} {have}")
print(f"    {'torch':<17} {'(pinned)':<10} {md.version('torch')}")
open(sys.argv[2], "w").write(", ".join(beyond))
EOF
beyond=$(cat "$work/beyond.txt")
if [ -z "$beyond" ]; then
    step "nothing is beyond the ceilings: the newest releases are the ceilings themselves; running the checks anyway"
    what="nothing beyond the ceilings"
else
    what="beyond the ceilings: $beyond"
fi

failures=()
# pip check, less mm-lens's own ceilings (its metadata still has them: it was installed --no-deps).
"$py" -m pip check >"$work/check.log" 2>&1
if grep -v -i -e '^mm-lens ' -e '^No broken requirements' "$work/check.log" | grep -q .; then
    step "pip check:"; grep -v -i '^mm-lens ' "$work/check.log" | sed 's/^/    /'
    failures+=("pip check")
else
    step "pip check clean (mm-lens's own ceilings aside)"
fi

present=()
for t in $tests; do
    if [ -f "$repo/$t" ]; then present+=("$t"); else step "skip $t (not in this checkout)"; fi
done
if [ ${#present[@]} -gt 0 ]; then
    step "pytest -q -x ${present[*]}"
    (cd "$repo" && "$py" -m pytest -q -x -p no:cacheprovider "${present[@]}") >"$work/pytest.log" 2>&1
    status=$?
    if [ "$status" = 0 ]; then
        tail -1 "$work/pytest.log" | sed 's/^/    /'
    else
        grep -E '^(E  |FAILED|ERROR)' "$work/pytest.log" | head -30 | sed 's/^/    /'
        tail -1 "$work/pytest.log" | sed 's/^/    /'
        failures+=("pytest $(grep -m1 -oE '^(FAILED|ERROR) [^ ]+' "$work/pytest.log" || echo "${present[*]} (exit $status)")")
    fi
else
    failures+=("none of the test files exists: $tests")
fi

step "mm-lens demo --per-task 3 (cwd $work)"
(cd "$work" && "$venv/bin/mm-lens" demo --per-task 3 --out "$work/demo") >"$work/demo.log" 2>&1
status=$?
if [ "$status" != 0 ]; then
    tail -20 "$work/demo.log" | sed 's/^/    /'
    failures+=("mm-lens demo (exit $status)")
elif [ ! -s "$work/demo/report.html" ]; then
    failures+=("mm-lens demo wrote no report.html")
fi

if [ ${#failures[@]} -gt 0 ]; then
    fail "$(IFS=';'; echo "${failures[*]}" | sed 's/;/; /g') [$what]"
fi
echo "try_newest: PASS ($what; $((SECONDS - start)) s)"

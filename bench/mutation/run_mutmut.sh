#!/usr/bin/env bash
# Mutation testing of one runtime module with mutmut 3 (bench/mutation/README.md).
#   bench/mutation/run_mutmut.sh generate|bundle|options|contract [scratch dir]   (runtime/<module>.py; contract:
#   illume_rt/contract.py)
#   MIRROR_ONLY=1 bench/mutation/run_mutmut.sh layout DIR   # only the copy, for cosmic-ray (README)
# mutmut derives a module's name from its path and the repository maps illume_rt.runtime -> runtime/ (package-dir),
# so the run happens in a scratch copy laid out as a plain package (illume_rt/runtime/...), with only the fast tests
# that exercise the module (bench/mutation/<module>.tests, one path a line). Nothing in the repository is touched.
set -euo pipefail
module=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
scratch=${2:-/tmp/illume-mutmut-$module}
python=${PYTHON:-$repo/.venv/bin/python}
mutmut=$(dirname "$python")/mutmut
tests=$(grep -v '^#' "$repo/bench/mutation/$module.tests" | sed '/^$/d')

rm -rf "$scratch"
mkdir -p "$scratch/illume_rt" "$scratch/tests"
cp "$repo"/illume_rt/*.py "$scratch/illume_rt/"
for dir in runtime engines export; do
    cp -r "$repo/$dir" "$scratch/illume_rt/$dir"
done
for t in $tests; do cp "$repo/$t" "$scratch/tests/"; done
find "$scratch" -name __pycache__ -prune -exec rm -rf {} +
{
    echo '[tool.mutmut]'
    echo 'source_paths = ["illume_rt"]'
    if [ "$module" = contract ]; then target=illume_rt/contract.py; else target=illume_rt/runtime/$module.py; fi
    echo "only_mutate = [\"$target\"]"
    echo 'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]'
    printf 'pytest_add_cli_args_test_selection = ['
    first=1
    for t in $tests; do
        [ $first = 1 ] || printf ', '
        printf '"tests/%s"' "$(basename "$t")"
        first=0
    done
    echo ']'
} > "$scratch/pyproject.toml"
cd "$scratch"
export HF_HUB_OFFLINE=1
if [ "${MIRROR_ONLY:-0}" = 1 ]; then echo "$scratch"; exit 0; fi  # the copy only (cosmic-ray runs in it)
nice -n 10 "$mutmut" run > mutmut-run.log 2>&1 || { tail -c 3000 mutmut-run.log; exit 1; }
"$mutmut" results --all true > results.txt 2>&1 || true
tail -c 300 mutmut-run.log | tr '\r' '\n' | tail -2
python3 - <<'PY'
import collections, re
counts = collections.Counter()
for line in open("results.txt"):
    m = re.match(r"\s*(\S+): (.+)$", line)
    if m:
        counts[m.group(2).strip()] += 1
total = sum(counts.values())
killed = counts.get("killed", 0) + counts.get("timeout", 0)
print(dict(counts), f"total {total}, killed {killed} ({100 * killed / max(total, 1):.1f}%)")
PY

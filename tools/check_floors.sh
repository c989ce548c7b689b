#!/usr/bin/env bash
# Floor run: install the oldest versions the requirements files admit (tools/floors.py turns each
# "name>=X" into "name==X"), then lint, run the unit tests and execute the notebook with them.
# Other versions print slightly other numbers, so outputs are not compared: everything must run.
#
#   bash tools/check_floors.sh                                   # the floors
#   bash tools/check_floors.sh torch==2.8.0 torchvision==0.23.0  # another combination
#   PYTHON=python3.12 bash tools/check_floors.sh                 # another Python
#
# Wheels stay in a wheelhouse (DORA_WHEELHOUSE, default ~/.cache/dora-floors/wheels) because pip's
# HTTP cache keeps nothing from an index that sends no caching headers, and torch's wheels bring
# gigabytes of CUDA libraries; a warm run installs offline. The virtualenv is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEELS=${DORA_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/dora-floors/wheels}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dora-floors.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WHEELS"
start=$SECONDS

"$PYTHON" -m tools.floors requirements.txt requirements-dev.txt "$@" >"$WORK/pins.txt"
echo "== floor run with $("$PYTHON" --version) and:"
sed 's/^/   /' "$WORK/pins.txt"

"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
pip=("$PY" -m pip --disable-pip-version-check --quiet)
offline=("${pip[@]}" install --no-index --find-links "$WHEELS" -r "$WORK/pins.txt")
# Resolving fails before anything is installed when a wheel is missing, so a failed offline
# attempt leaves the virtualenv clean for the second one.
if ! "${offline[@]}" 2>"$WORK/offline.log"; then
    echo "== downloading what the wheelhouse lacks ($WHEELS)"
    "${pip[@]}" download --dest "$WHEELS" -r "$WORK/pins.txt"
    "${offline[@]}"
fi
echo "== installed in $((SECONDS - start)) s"

echo "== lint at the floors (the pinned ruff of requirements-dev.txt)"
"$PY" -m ruff check --no-cache .
"$PY" -m ruff format --no-cache --check .

echo "== unit tests at the floors"
"$PY" -m pytest tests -q -p no:cacheprovider

echo "== notebook at the floors (every cell must run; outputs are not compared)"
"$PY" -m tools.run_notebook --output "$WORK/DoRA.ipynb" --figures "$WORK/figures"

echo "== floor run passed in $((SECONDS - start)) s"

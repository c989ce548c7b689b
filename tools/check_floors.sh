#!/usr/bin/env bash
# Floor run: install the oldest versions requirements.txt admits (tools/floors.py turns every
# "name>=X" of requirements.txt and requirements-dev.txt into "name==X"), then run the unit
# tests and execute the notebook headless with them.
# Other versions give slightly other numbers, so nothing is compared with the stored outputs:
# every test must pass and every cell must run.
#
#   bash tools/check_floors.sh                                   # the floors
#   bash tools/check_floors.sh torch==2.8.0 torchvision==0.23.0  # another combination
#   PYTHON=python3.12 bash tools/check_floors.sh                 # another Python
#
# Wheels are kept in a wheelhouse that outlives the run (DORA_WHEELHOUSE, default
# ~/.cache/dora-floors/wheels): PyPI's torch wheels bring about 3 GB of CUDA libraries, and pip's
# own HTTP cache stores nothing when the index answers without caching headers (as the one this
# project's CI reaches does). A warm run installs offline from there. The virtualenv (about 6 GB)
# lives in a temporary folder that is removed at the end.
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

#!/usr/bin/env bash
# Set everything up in ./.venv, then run the demo or the tests:
#   bash bootstrap.sh demo [stitchtrain demo options]
#   bash bootstrap.sh test [pytest options]
# On a machine without nvidia-smi, torch is constrained to the CPU build (constraints-cpu.txt);
# with a GPU, pip resolves torch from pyproject.toml to the CUDA build.
set -euo pipefail
cd "$(dirname "$0")"

venv="${VENV:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi

constraints=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
    constraints=(-c constraints-cpu.txt)
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${constraints[@]}" -e ".[test]"

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
command="${1:-}"
shift || true
case "$command" in
    demo) exec "$venv/bin/stitchtrain" demo "$@" ;;
    # one worker per core (at most 4; pytest-xdist), each test file on one worker so its
    # module fixtures are built once; a later -n in "$@" wins (-n 0: one process)
    # the layering contract first (pyproject.toml [tool.importlinter]; docs/design.md's map)
    test) "$venv/bin/lint-imports" --no-cache
        exec "$venv/bin/python" -m pytest -n auto --maxprocesses 4 --dist loadfile "$@" ;;
    *) echo "usage: bash bootstrap.sh demo|test [options]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Creates the virtual environment and installs exactly the pinned set from requirements.lock (no
# resolution: the lock is complete), then imtok itself in editable mode.
#
# Usage: scripts/setup_venv.sh PYTHON VENV
#
# A dropped download or a full disk must not end as a list of "requires X, which is not installed":
# pip's whole output is kept in VENV/pip-install.log (VENV/pip-install-imtok.log for imtok itself),
# the pinned install is retried a bounded number of times (pip skips what the previous attempt
# already installed), and a final failure prints the log's last lines and the free disk space.
set -euo pipefail

python=${1:?usage: scripts/setup_venv.sh PYTHON VENV}
venv=${2:?usage: scripts/setup_venv.sh PYTHON VENV}
attempts=3
need_gib=8  # the pinned set takes about 6.6 GiB in the venv, mostly PyTorch's CUDA wheels

cd "$(dirname "$0")/.."
test -x "$venv/bin/python" || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
log="$venv/pip-install.log"

free_gib() { df -Pk "$venv" | awk 'NR == 2 { print int($4 / 1048576) }'; }
show_log() { grep -v "is ignored: it is neither" "$log" | tail -n "$1" >&2 || true; }

if [ "$(free_gib)" -lt "$need_gib" ]; then
    echo "warning: $(free_gib) GiB free under $venv; the pinned set needs about $need_gib GiB" >&2
fi

for attempt in $(seq 1 "$attempts"); do
    if "${pip[@]}" install --no-deps --retries 5 -r requirements.lock >"$log" 2>&1 \
        && "${pip[@]}" check >>"$log" 2>&1; then
        break
    fi
    echo "pinned install, attempt $attempt of $attempts, failed; the end of $log:" >&2
    show_log 15
    if [ "$attempt" = "$attempts" ]; then
        echo "error: could not install requirements.lock into $venv ($(free_gib) GiB free there)." >&2
        echo "Free disk space or check the package index, then run 'make setup' again." >&2
        exit 1
    fi
    sleep $((attempt * 15))
done

log="$venv/pip-install-imtok.log"
if ! "${pip[@]}" install --no-deps --no-build-isolation -e . >"$log" 2>&1; then
    echo "error: could not install imtok itself in editable mode; the end of $log:" >&2
    show_log 25
    exit 1
fi
"$venv/bin/python" -c "import imtok, torch, torchvision" \
    || { echo "error: imtok, torch or torchvision does not import from $venv" >&2; exit 1; }

#!/usr/bin/env bash
# Dependency audit (RELIABILITY.md, "Security"), run by `make test` after the tests.
#
# pip-audit (in its own venv, $AUDIT_VENV) checks two pinned dependency sets against
# PyPI's vulnerability service:
#   image:  container/requirements-serve.txt (must be all name==version) plus the torch pin
#           of container/Dockerfile: what the serving image installs;
#   ci-env: the test environment as installed ($VENV, `pip freeze`): requirements.txt (whose
#           ranges it resolves) with the test extras and the Makefile's torch pin.
# Findings not in security/pip-audit-ignore.txt fail the audit. A service that cannot be
# reached or has no data for a package (a PyPI mirror without the per-version JSON pip-audit
# reads) is a WARNING naming what was not checked, exit 0; PIP_AUDIT_STRICT=1 makes it a
# failure (exit 3), for a CI that reaches PyPI's service.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
AUDIT_VENV=${AUDIT_VENV:-.auditenv}
PIP_AUDIT_VERSION=2.10.1

if ! "$AUDIT_VENV/bin/pip-audit" --version 2>/dev/null | grep -qx "pip-audit $PIP_AUDIT_VERSION"; then
    "$PYTHON" -m venv "$AUDIT_VENV"
    "$AUDIT_VENV/bin/python" -m pip install -q --disable-pip-version-check "pip-audit==$PIP_AUDIT_VERSION"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

unpinned=$(grep -Ev '^\s*(#|$)' container/requirements-serve.txt | grep -Ev '^[A-Za-z0-9._-]+==[^ ;]+$' || true)
if [ -n "$unpinned" ]; then
    echo "error: container/requirements-serve.txt must pin every package (name==version): $unpinned" >&2
    exit 2
fi
torch_pin=$(grep -Eo 'torch==[0-9][0-9a-z.]*' container/Dockerfile | head -n1)
if [ -z "$torch_pin" ]; then
    echo "error: no torch==VERSION in container/Dockerfile" >&2
    exit 2
fi
{ cat container/requirements-serve.txt; echo "$torch_pin"; } > "$work/image.txt"
# Local version labels (torch 2.13.0+cpu) are not on PyPI: audit the public release.
"$VENV/bin/python" -m pip freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$//' > "$work/ci-env.txt"

reports=()
for set in image ci-env; do
    # pip-audit exits 1 when it finds something; the triage below decides.
    "$AUDIT_VENV/bin/pip-audit" --progress-spinner off --no-deps --disable-pip --desc off --format json \
        --requirement "$work/$set.txt" --output "$work/$set.json" 2> "$work/$set.log" || true
    reports+=("$set=$work/$set.json:$work/$set.log")
done
echo "pip-audit $PIP_AUDIT_VERSION: image ($(grep -c == "$work/image.txt") pins), ci-env ($(grep -c == "$work/ci-env.txt") packages)"
"$AUDIT_VENV/bin/python" .ci/audit_triage.py security/pip-audit-ignore.txt "${reports[@]}"

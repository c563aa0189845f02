#!/usr/bin/env bash
# Builds the isolated environment in which the multi-model-server tests run
# (tests/test_sagemaker_mms.py): the sagemaker-inference toolkit 1.10.1 and
# multi-model-server 1.1.11, plus this project (editable) and its dependencies, in a
# virtualenv of its own. The toolkit imports pkg_resources without declaring
# setuptools, and setuptools >= 81 no longer ships it; torch 2.13 requires
# setuptools >= 77.0.3, so every install here is constrained to setuptools 80.9.0
# (the newest release with pkg_resources; 65.5.0 also works for the toolkit but
# conflicts with torch's metadata). The project's own .venv never gets the toolkit or
# the older setuptools. MMS itself also needs Java (17 works) at run time.
#
# Usage: bash tests/mms/build_mms_env.sh [ENV_DIR]   (default: .mmsenv)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
env_dir=${1:-$root/.mmsenv}
stamp=$env_dir/.complete-v1
[ -f "$stamp" ] && exit 0

python=${PYTHON:-python3}
rm -rf "$env_dir"
"$python" -m venv "$env_dir"
constraints=$env_dir/constraints.txt
echo "setuptools==80.9.0" > "$constraints"
pip=("$env_dir/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints")
# torch==2.13.0 is the same CPU wheel the project's own environment uses.
"${pip[@]}" torch==2.13.0 setuptools==80.9.0
"${pip[@]}" sagemaker-inference==1.10.1 multi-model-server==1.1.11
# The project and its runtime dependencies (no test extras: the test drives this
# environment's server from the project's own .venv over HTTP).
"${pip[@]}" -e "$root"
"$env_dir/bin/python" -c "import pkg_resources, sagemaker_inference.model_server, mms.model_server, s1_mini.sagemaker.mms"
test -x "$env_dir/bin/multi-model-server"
touch "$stamp"
echo "multi-model-server environment ready: $env_dir"

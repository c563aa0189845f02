# Sourced first by the bench/run_*_gpu.sh scripts on the device machine (torch
# preinstalled): the settings they share (output folder, interpreters, device), the
# carried wheels (.whl) into /tmp/site on PYTHONPATH (INSTALL=0 skips it, e.g. on a
# machine that already has them), unbuffered output, and what ran where.
out=${OUT:-/tmp/out}
PY=${PY:-python3}
REF_PY=${REF_PY:-python3}                     # the reference's scripts
REF_PATH=${REF_PATH:-$PWD/bench_carry/ref}   # its unpacked sources
DEVICE=${DEVICE:-cuda}
mkdir -p "$out"
if [ "${INSTALL:-1}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
git log -1 --format='commit %h %cd' 2>/dev/null

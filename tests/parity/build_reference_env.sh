#!/usr/bin/env bash
# Builds the isolated reference environment used only as a test oracle:
# PyPI fish-speech==0.1.0 (and the two descript packages its codec imports), unpacked
# --no-deps into .refenv/ref, plus the handful of small packages its model code
# imports, in a virtualenv of its own. The product never imports anything from here.
#
# Usage: bash tests/parity/build_reference_env.sh [ENV_DIR]   (default: .refenv)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
env_dir=${1:-$root/.refenv}
stamp=$env_dir/.complete-v2
[ -f "$stamp" ] && exit 0

python=${PYTHON:-python3}
rm -rf "$env_dir"
"$python" -m venv "$env_dir"
pip=("$env_dir/bin/python" -m pip install -q --disable-pip-version-check)
# torch==2.13.0 is the same CPU wheel the project's own environment uses.
"${pip[@]}" torch==2.13.0 numpy einops loguru loralib click tqdm tiktoken
# fish-speech's request schema (tests/test_server_fish.py builds requests with it)
"${pip[@]}" pydantic ormsgpack

wheels=$env_dir/wheels
ref=$env_dir/ref
mkdir -p "$wheels" "$ref"
"$env_dir/bin/python" -m pip download -q --disable-pip-version-check --no-deps -d "$wheels" \
  fish-speech==0.1.0 descript-audio-codec==1.0.0 descript-audiotools==0.7.2
unpacked=$env_dir/unpacked
mkdir -p "$unpacked"
for whl in "$wheels"/*.whl; do "$env_dir/bin/python" -m zipfile -e "$whl" "$unpacked"; done

# fish_speech is a namespace package: copy it whole.
cp -r "$unpacked/fish_speech" "$ref/"
# A minimal dac: only the layer files the codec imports, with empty package inits
# (the real dac/__init__.py pulls in all of audiotools).
mkdir -p "$ref/dac/nn" "$ref/dac/model"
cp "$unpacked/dac/nn/layers.py" "$unpacked/dac/nn/quantize.py" "$ref/dac/nn/"
cp "$unpacked/dac/model/base.py" "$ref/dac/model/"
touch "$ref/dac/__init__.py" "$ref/dac/nn/__init__.py" "$ref/dac/model/__init__.py"
# audiotools: only BaseModel (stdlib + torch); AudioSignal is never used by the model.
mkdir -p "$ref/audiotools/ml/layers"
cp "$unpacked/audiotools/ml/layers/base.py" "$ref/audiotools/ml/layers/base.py"
touch "$ref/audiotools/ml/layers/__init__.py"
echo "class AudioSignal: pass" > "$ref/audiotools/__init__.py"
echo "from audiotools.ml.layers.base import BaseModel" > "$ref/audiotools/ml/__init__.py"
# Stubs for imports the model code never uses.
echo "AutoTokenizer = None" > "$ref/transformers.py"
echo "" > "$ref/hydra.py"
echo "" > "$ref/librosa.py"
echo "" > "$ref/soundfile.py"
echo "class OmegaConf: pass" > "$ref/omegaconf.py"

site=$("$env_dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$ref" > "$site/fish_speech_reference.pth"
"$env_dir/bin/python" -c "import fish_speech.models.text2semantic.inference, fish_speech.models.dac.modded_dac, fish_speech.models.dac.rvq"
touch "$stamp"
echo "reference environment ready: $env_dir"

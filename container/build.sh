#!/usr/bin/env bash
# Build the serving image from the repository root: bash container/build.sh [TAG]
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-s1-mini-sagemaker:$(git rev-parse --short HEAD 2>/dev/null || echo dev)}
docker build -f container/Dockerfile -t "$tag" .
echo "built $tag"

#!/usr/bin/env bash
# Downloads the wheels that torch_baseline.py needs on the GPU machine into benches/wheels/
# (git-ignored; name it in the device run's carry). The GPU image has PyTorch and every
# dependency of diffusers (huggingface-hub 1.33.0, safetensors 0.8.0, filelock, numpy, regex,
# requests, Pillow, packaging: KINDS.md) but not diffusers itself, so by default only the
# diffusers wheel (pure Python, 6.4 MB) is fetched.
#
#   benches/fetch_wheels.sh           diffusers only
#   benches/fetch_wheels.sh --hub     also huggingface_hub and safetensors, used by
#                                     torch_baseline.py only if the machine's are missing or
#                                     older than diffusers accepts (+1.2 MB)
#
# Versions: tests/fixtures/requirements.txt (section "benches").
set -euo pipefail
cd "$(dirname "$0")"
pkgs=(diffusers==0.42.1)
if [[ "${1:-}" == "--hub" ]]; then
    pkgs+=(huggingface_hub==1.33.0 safetensors==0.8.0)
fi
py=${PYTHON:-python3}
# The GPU machine runs CPython 3.12 on x86-64; the platform tags only matter for safetensors.
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d wheels "${pkgs[@]}"
ls -l wheels
du -ch wheels/*.whl | tail -1

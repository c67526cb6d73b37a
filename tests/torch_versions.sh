#!/usr/bin/env bash
# The model, SSD and kernel tests on the other torch releases this project supports, on CPU, each in a
# virtual environment of its own (.venvs/, git-ignored; kept, so that a second run installs nothing),
# with the torchvision of the same release (timm's ViT, which two model tests compare against, needs it):
#   2.11.0:0.26.0  the GPU machine's torch (tests/gpu_check.sh), with triton 3.6
#   2.6.0:0.21.0   the floor that requirements.txt declares (FSDP2's fully_shard), with triton 3.2
#
#   bash tests/torch_versions.sh                  # both
#   TORCH_VERSIONS=2.11.0:0.26.0 bash tests/torch_versions.sh
#
# Each version's install and tests run in a box of TORCH_VERSION_BOX seconds (default 900); the exit
# status is 0 only if every version's tests passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BOX=${TORCH_VERSION_BOX:-900}
export PYTHON
TESTS=(tests/test_models.py tests/test_ssd.py tests/test_kernels.py tests/test_triton_tier.py)
failed=()

for pair in ${TORCH_VERSIONS:-2.11.0:0.26.0 2.6.0:0.21.0}; do
    version=${pair%%:*} vision=${pair#*:}
    venv=.venvs/torch-$version
    echo "== torch $version ($venv)"
    started=$(date +%s)
    timeout --kill-after=10 "$BOX" bash -c '
        venv=$1 version=$2 vision=$3; shift 3
        if ! "$venv/bin/python" -c "import torch, torchvision, timm, einops, pytest, sys
sys.exit(torch.__version__.split(\"+\")[0] != \"$version\")" 2>/dev/null; then
            rm -rf "$venv"
            echo "installing torch $version, torchvision $vision, timm, numpy, pytest and einops into $venv"
            "$PYTHON" -m venv "$venv" && "$venv/bin/python" -m pip install -q "torch==$version" \
                "torchvision==$vision" timm numpy pytest einops > "$venv.log" 2>&1 \
                || { tail -20 "$venv.log"; echo "could not install torch $version"; exit 1; }
        fi
        "$venv/bin/python" -c "import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__)"
        "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
    ' box "$venv" "$version" "$vision" "${TESTS[@]}"
    status=$?
    echo "torch $version: exit status $status after $(($(date +%s) - started)) s"
    [ "$status" = 0 ] || failed+=("$version (exit status $status$([ "$status" = 124 ] && echo ", past its $BOX s box"))")
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "torch_versions: FAILED on torch ${failed[*]}"
    exit 1
fi
echo "torch_versions: the model, SSD and kernel tests passed on torch ${TORCH_VERSIONS:-2.11.0:0.26.0 2.6.0:0.21.0}"

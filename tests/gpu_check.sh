#!/usr/bin/env bash
# One-shot GPU check for a bare GPU machine without network, in at most ~8 minutes:
#   1. versions (GPU, driver, CUDA, torch, triton, kernel packages)
#   2. kernel build from the sdists (and any wheels) carried in sdists/, for this GPU's
#      architecture only, when the kernels do not import yet
#   3. the parity tests (tests/test_gpu.py) with PIXELVIT_REQUIRE_KERNELS=1: a missing kernel fails
#   4. the Table 6 benchmark (DeiT-B and Adventurer-B at 224 px, patch 16 to 1), each row time-boxed
# Everything is also written to $OUT (default gpu_check/): report.txt, table6.json, pytest.xml.
#
#   bash tests/gpu_check.sh                 # on the GPU machine, from the repository root
#   GPU_CHECK_SKIP_BUILD=1 bash tests/gpu_check.sh
#
# On a machine without CUDA it prints the versions and what it would run, and exits 0 (CI runs it so).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/report.txt") 2>&1
start=$(date +%s)
section() { echo; echo "== $1 ($(( $(date +%s) - start )) s)"; }

section "versions"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: not found"
python - <<'EOF'
import importlib.metadata as md
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
for package in ("triton", "mamba-ssm", "causal-conv1d", "flash-attn", "einops"):
    try:
        print(f"{package} {md.version(package)}")
    except md.PackageNotFoundError:
        print(f"{package}: not installed")
EOF
has_gpu=$(python -c "import torch; print(int(torch.cuda.is_available()))")

kernels_import() {   # which kernels import; with "why", also the reason for each one that does not
    if [ "${1:-}" = why ]; then python -W always -c "import pixelvit as pv; print(pv.backends())" 2>&1
    else python -c "import pixelvit as pv; print(pv.backends())" 2>/dev/null | tail -1; fi
}

section "kernels"
if [ "$has_gpu" != 1 ]; then
    echo "no CUDA GPU: kernel build, parity tests and Table 6 are skipped. On a GPU machine this runs:"
    echo "  pip install --no-index --no-build-isolation --no-deps sdists/causal_conv1d-*.tar.gz sdists/mamba_ssm-*.tar.gz sdists/flash_attn-*.whl"
    echo "  PIXELVIT_REQUIRE_KERNELS=1 python -m pytest tests/test_gpu.py"
    echo "  python tests/benchmark.py --table6 --json $OUT/table6.json"
    exit 0
fi
kernels_import why
if [ "${GPU_CHECK_SKIP_BUILD:-0}" != 1 ] && ! kernels_import | grep -q "'mamba_ssm': True"; then
    # This GPU's architecture only (the setup.py files list every architecture themselves, so the
    # list is cut down in unpacked copies), a local build (FORCE_BUILD: no wheel is looked up),
    # against the installed torch (--no-build-isolation), from local files only (--no-index).
    arch=$(python -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST="${arch:0:-1}.${arch: -1}" MAX_JOBS=${MAX_JOBS:-$(nproc)}
    export CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE
    # build tools and mamba-ssm's imports, carried as wheels (ninja: parallel compilation;
    # `import mamba_ssm` imports einops and transformers)
    pip install --no-index --find-links sdists ninja einops packaging setuptools wheel transformers 2>&1 | tail -1
    build=$(mktemp -d)
    for sdist in sdists/causal_conv1d-*.tar.gz sdists/mamba_ssm-*.tar.gz; do
        [ -e "$sdist" ] || { echo "missing $sdist: see README, Kernels"; continue; }
        tar xzf "$sdist" -C "$build"
    done
    python tests/keep_arch.py "$arch" "$build"/*/setup.py
    for package in "$build"/causal_conv1d-* "$build"/mamba_ssm-*; do
        [ -d "$package" ] || continue
        echo "building $(basename "$package") for sm_$arch with MAX_JOBS=$MAX_JOBS"
        timeout 420 pip install --no-index --no-build-isolation --no-deps "$package" 2>&1 | tail -3
    done
    for wheel in sdists/flash_attn-*.whl; do
        [ -e "$wheel" ] && pip install --no-index --no-deps "$wheel" 2>&1 | tail -1
    done
fi
kernels_import why

section "parity tests"
PIXELVIT_REQUIRE_KERNELS=1 timeout 180 python -m pytest -q -rA tests/test_gpu.py --junitxml="$OUT/pytest.xml" 2>&1 | tail -30

section "Table 6"
rm -f "$OUT/table6.json"
timeout 200 python tests/benchmark.py --table6 --time-budget 150 --json "$OUT/table6.json"
section "done"

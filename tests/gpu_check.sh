#!/usr/bin/env bash
# The one-shot GPU check: one command on a GPU machine without network, its report inside 9 minutes.
#
#   bash tests/gpu_check.sh            # from the repository root, with the carried files in sdists/
#
# Steps, most valuable first, each in a time box, each run whatever the steps before it did:
#   preflight       versions; stops at once (exit 2) without torch, without CUDA, or with an nvcc
#                   whose major version differs from torch.version.cuda's
#   mamba-ssm       installed from its sdist without its CUDA extension (pixelvit calls only its
#                   Triton ops; a stand-in selective_scan_cuda lets `import mamba_ssm` through)
#   causal-conv1d   a carried wheel that imports is used; otherwise built for this GPU's architecture
#                   only, in the background while the next step runs; the wheel is kept in $OUT/wheels
#   parity          PIXELVIT_REQUIRE_KERNELS=1 python -m pytest tests/test_gpu.py, in slices:
#                   the Triton SSD tier in bf16 (during the build), the fused op in bf16, the int32
#                   batch split and model logits, and float32/fp16 last if time remains
#   table6          python tests/benchmark.py --table6, Adventurer-B first, row by row
# Everything lands in $OUT (default gpu_check/): report.txt (all output), summary.json (each step's
# status and seconds), pytest-*.xml, table6.json, build-causal-conv1d.log, wheels/. The exit status
# is 0 only if every step passed; otherwise the first failure is named in the last line.
#
# Settings (environment): PYTHON (default python3), OUT, GPU_CHECK_CARRY (the carried sdists and
# wheels, default sdists/), GPU_CHECK_BUDGET (seconds, default 540).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=$(realpath -m "${OUT:-gpu_check}")
CARRY=$(realpath -m "${GPU_CHECK_CARRY:-sdists}")
BUDGET=${GPU_CHECK_BUDGET:-540}
WORK=$(mktemp -d)                 # the check's own site-packages and build tree
SITE=$WORK/site
mkdir -p "$OUT" "$SITE" "$WORK/build"
rm -f "$OUT"/steps.tsv "$OUT"/summary.json "$OUT"/pytest-*.xml "$OUT"/table6.json
exec > >(tee "$OUT/report.txt") 2>&1
TEE_PID=$!
START=$(date +%s)
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PIXELVIT_REQUIRE_KERNELS=1 PYTHONUNBUFFERED=1
# Triton keeps autotuning results on disk (Triton >= 3.4), so that each pytest and benchmark process
# after the first reuses them instead of timing every configuration of mamba-ssm's kernels again
export TRITON_CACHE_AUTOTUNING=1
export PYTHON OUT CARRY WORK SITE START

# Time boxes in seconds. The build starts after the preflight and runs in its own box beside the
# mamba-ssm install and the Triton-tier parity step; the step that waits for it lasts until the
# build's box ends (+10 s). So the run takes at most preflight + build + 10 + the boxes after it +
# the report's reserve = 540 s. The last parity slice takes whatever time is left.
BOX_PREFLIGHT=20
BOX_BUILD=285
BOX_MAMBA_SSM=40
BOX_PARITY_TRITON=130
BOX_PARITY_FUSED=45
BOX_PARITY_MODELS=70
BOX_TABLE6=95
REPORT_RESERVE=10

elapsed() { echo $(($(date +%s) - START)); }
remaining() { echo $((BUDGET - REPORT_RESERVE - $(elapsed))); }
section() { echo; echo "== $1 ($(elapsed) s)"; }

# record STEP STATUS SECONDS BOX NOTE: one line of $OUT/steps.tsv, which summary.json is made of
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5//$'\t'/ }" >> "$OUT/steps.tsv"; }

finish() {   # summary.json and the table from steps.tsv (in awk: it must work where Python does not)
    awk -F'\t' -v out="$OUT/summary.json" '
        function quoted(s) { gsub(/\\/, "\\\\", s); gsub(/"/, "\\\"", s); return "\"" s "\"" }
        BEGIN { print "| step | status | seconds | box | note |\n|---|---|---|---|---|"; passed = "true" }
        {
            printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, substr($5, 1, 120)
            if ($2 != "ok" && $2 != "skipped") passed = "false"
            steps = steps (NR > 1 ? ",\n" : "") sprintf("  {\"step\": %s, \"status\": %s, \"seconds\": %d, \"box\": %d, \"note\": %s}",
                                                    quoted($1), quoted($2), $3, $4, quoted($5))
        }
        END { printf "{\"passed\": %s, \"steps\": [\n%s\n]}\n", passed, steps > out }
    ' "$OUT/steps.tsv"
    local failed
    failed=$(awk -F'\t' '$2 != "ok" && $2 != "skipped" {print $1 ": " $2 ": " $5; exit}' "$OUT/steps.tsv")
    echo
    if [ -n "$failed" ]; then echo "gpu_check: FAILED at $failed"; else echo "gpu_check: all steps passed"; fi
    exec >&- 2>&-
    wait "$TEE_PID"
    rm -rf "$WORK"
    if [ -n "$failed" ]; then exit "${1:-1}"; fi
    exit 0
}

stop_early() {   # a machine this check cannot use: say why, write the summary, exit 2
    echo "gpu_check: cannot run here: $1"
    record preflight failed "$(elapsed)" "$BOX_PREFLIGHT" "$1"
    finish 2
}

# step NAME BOX COMMAND...: the command (a program or an exported function) under `timeout`, for its
# box or what is left of the budget if less, its status recorded; with under 5 s left it is
# recorded as skipped, not run.
step() {
    local name=$1 box=$2 began left status outcome note
    began=$(elapsed)
    shift 2
    left=$(remaining)
    [ "$left" -lt "$box" ] && box=$left
    section "$name (box $box s)"
    if [ "$box" -lt 5 ]; then
        record "$name" skipped 0 "$box" "the time budget ran out"
        echo "skipped: the time budget ran out"
        return
    fi
    STEP_BOX=$box timeout --kill-after=5 "$box" bash -c '"$@"' "$name" "$@"
    status=$?
    case $status in
        0) outcome=ok note="" ;;
        124|137) outcome="timed out" note="timed out after $box s" ;;
        *) outcome=failed note="exit status $status" ;;
    esac
    if [ -s "$WORK/note" ]; then note="${note:+$note; }$(tail -1 "$WORK/note")"; fi
    rm -f "$WORK/note"
    record "$name" "$outcome" $(($(elapsed) - began)) "$box" "$note"
}

note() { echo "$*"; echo "$*" >> "$WORK/note"; }   # a step's one-line reason, also in the summary
export -f note

# ----------------------------------------------------------------------------------------------
section "preflight"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: not found"
command -v "$PYTHON" >/dev/null || stop_early "no $PYTHON on PATH (set PYTHON to the interpreter with torch)"
"$PYTHON" - <<'EOF' > "$WORK/torch.txt"
import importlib.metadata as md, platform
try:
    import torch
except Exception as e:
    print(f"NO_TORCH {type(e).__name__}: {e}")
    raise SystemExit
gpu = torch.cuda.is_available()
print(f"TORCH {torch.__version__} {torch.version.cuda or 'none'} {int(gpu)}")
print(f"Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU: {torch.cuda.get_device_name() if gpu else 'none'}"
      + (" (sm_%d%d)" % torch.cuda.get_device_capability() if gpu else ""))
if gpu:
    print("ARCH %d%d" % torch.cuda.get_device_capability())
for package in ("triton", "transformers", "einops", "ninja", "setuptools", "wheel", "pycocotools",
                "mamba-ssm", "causal-conv1d", "flash-attn"):
    try:
        print(f"  {package} {md.version(package)}")
    except md.PackageNotFoundError:
        print(f"  {package}: not installed")
EOF
grep -v "^TORCH \|^ARCH \|^NO_TORCH " "$WORK/torch.txt"
if grep -q "^NO_TORCH" "$WORK/torch.txt" || ! grep -q "^TORCH " "$WORK/torch.txt"; then
    stop_early "$PYTHON cannot import torch ($(sed -n 's/^NO_TORCH //p' "$WORK/torch.txt"))"
fi
read -r _ torch_version torch_cuda has_gpu < <(grep "^TORCH " "$WORK/torch.txt")
if [ "$has_gpu" != 1 ]; then
    stop_early "torch $torch_version (CUDA $torch_cuda) sees no CUDA GPU; nvidia-smi: $(nvidia-smi -L 2>/dev/null | head -1 || echo 'not found')"
fi
arch=$(sed -n 's/^ARCH //p' "$WORK/torch.txt")
# The toolkit: $CUDA_HOME when set; otherwise the usual install folders, then the nvcc on PATH (which
# may be a wrapper script outside the toolkit, so the toolkit is taken from the folders first)
if [ -n "${CUDA_HOME:-}" ]; then toolkits=("$CUDA_HOME"); else
    toolkits=(${CUDA_PATH:+"$CUDA_PATH"} /usr/local/cuda /usr/local/cuda-* /opt/cuda /opt/nvidia/cuda*); fi
NVCC=""
for toolkit in "${toolkits[@]}"; do
    if [ -x "$toolkit/bin/nvcc" ]; then NVCC=$toolkit/bin/nvcc; CUDA_HOME=$toolkit; break; fi
done
if [ -z "$NVCC" ] && command -v nvcc >/dev/null; then
    NVCC=$(command -v nvcc)
    CUDA_HOME=$(dirname "$(dirname "$(realpath "$NVCC")")")
fi
[ -n "$NVCC" ] || stop_early "no nvcc in ${toolkits[*]} or on PATH (causal-conv1d is built with it)"
[ -e "$CUDA_HOME/include/cuda_runtime.h" ] \
    || stop_early "no CUDA headers in $CUDA_HOME/include: set CUDA_HOME to the toolkit that holds $NVCC"
nvcc_version=$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
echo "nvcc $nvcc_version ($NVCC), building for sm_$arch"
if [ "${nvcc_version%%.*}" != "${torch_cuda%%.*}" ]; then
    stop_early "nvcc $nvcc_version does not match torch's CUDA $torch_cuda: a CUDA ${torch_cuda%%.*}.x nvcc is needed"
fi
export CUDA_HOME PATH="$(dirname "$NVCC"):$PATH" arch
record preflight ok "$(elapsed)" "$BOX_PREFLIGHT" "torch $torch_version, CUDA $torch_cuda, nvcc $nvcc_version, sm_$arch"

# ----------------------------------------------------------------------------------------------
causal_conv1d_imports() {   # the extension loads against this torch (which must be imported first)
    "$PYTHON" -c "import torch, causal_conv1d_cuda; from causal_conv1d import causal_conv1d_fn" \
        2> "$WORK/import.err" || { tail -1 "$WORK/import.err"; return 1; }
}

build_causal_conv1d() {   # in the background: its log in $OUT, its status in $WORK/build.status
    local wheel sdist
    for wheel in "$CARRY"/causal_conv1d-*.whl; do
        [ -e "$wheel" ] || continue
        "$PYTHON" -m pip install --no-index --no-deps --target "$SITE" "$wheel" >/dev/null 2>&1
        if causal_conv1d_imports; then echo "carried wheel $(basename "$wheel") imports: not rebuilt"; return 0; fi
        echo "carried wheel $(basename "$wheel") does not import against this torch: building"
        rm -rf "$SITE"/causal_conv1d*
    done
    sdist=$(ls "$CARRY"/causal_conv1d-*.tar.gz 2>/dev/null | sort | tail -1)
    [ -n "$sdist" ] || { echo "no causal_conv1d-*.tar.gz in $CARRY"; return 1; }
    tar xzf "$sdist" -C "$WORK/build" || return 1
    "$PYTHON" tests/keep_arch.py "$arch" "$WORK"/build/causal_conv1d-*/setup.py || return 1
    mkdir -p "$OUT/wheels"
    echo "building $(basename "$sdist") for sm_$arch with MAX_JOBS=${MAX_JOBS:-$(nproc)}"
    CAUSAL_CONV1D_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST="${arch:0:-1}.${arch: -1}" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        "$PYTHON" -m pip wheel -v --no-index --no-deps --no-build-isolation -w "$OUT/wheels" "$WORK"/build/causal_conv1d-* \
        || return 1
    "$PYTHON" -m pip install --no-index --no-deps --target "$SITE" "$OUT"/wheels/causal_conv1d-*.whl || return 1
    causal_conv1d_imports
}
section "causal-conv1d build, in the background (box $BOX_BUILD s, log: build-causal-conv1d.log)"
export -f build_causal_conv1d causal_conv1d_imports
export BUILD_DEADLINE=$(($(elapsed) + BOX_BUILD)) BOX_BUILD
# its own process group (setsid), so that a build still running when its waiting step ends can be
# stopped whole, compilers included
# (`timeout` puts itself in a process group of its own: that group is the one to stop)
setsid bash -c 'timeout --kill-after=5 "$BOX_BUILD" bash -c build_causal_conv1d > "$OUT/build-causal-conv1d.log" 2>&1 &
                echo $! > "$WORK/build.pgid"
                wait $!
                echo $? > "$WORK/build.status"' &

install_mamba_ssm() {
    local sdist
    sdist=$(ls "$CARRY"/mamba_ssm-*.tar.gz 2>/dev/null | sort | tail -1)
    [ -n "$sdist" ] || { note "no mamba_ssm-*.tar.gz in $CARRY (docs/kernels.md: the one-shot GPU check)"; return 1; }
    # SKIP_CUDA_BUILD: no selective_scan_cuda (the Mamba-1 scan); FORCE_BUILD: no wheel download
    MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "$PYTHON" -m pip install --no-index --no-deps \
        --no-build-isolation --target "$SITE" "$sdist" > "$OUT/install-mamba-ssm.log" 2>&1 \
        || { tail -5 "$OUT/install-mamba-ssm.log"; note "pip could not install $(basename "$sdist")"; return 1; }
    cat > "$SITE/selective_scan_cuda.py" <<'EOF'
"""Stand-in written by tests/gpu_check.sh: `import mamba_ssm` imports this extension (the Mamba-1
selective scan), which pixelvit never calls and the check does not build."""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError(f"selective_scan_cuda.{name}: mamba-ssm's Mamba-1 scan was not built")
EOF
    for wheel in "$CARRY"/flash_attn-*.whl; do
        [ -e "$wheel" ] && "$PYTHON" -m pip install --no-index --no-deps --target "$SITE" "$wheel" | tail -1
    done
    "$PYTHON" -c "from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined" \
        || { note "mamba_ssm.ops.triton.ssd_combined does not import"; return 1; }
    echo "mamba-ssm $(basename "$sdist") installed without its CUDA extension"
}
export -f install_mamba_ssm
step mamba-ssm "$BOX_MAMBA_SSM" install_mamba_ssm

parity() {   # parity SLICE PYTEST-ARGS...: one slice of tests/test_gpu.py, its JUnit XML in $OUT
    local slice=$1
    shift
    "$PYTHON" -m pytest -q -rA -p no:cacheprovider tests/test_gpu.py --junitxml="$OUT/pytest-$slice.xml" "$@" \
        2>&1 | tee "$WORK/pytest.out"
    local status=${PIPESTATUS[0]}
    tail -1 "$WORK/pytest.out" >> "$WORK/note"     # pytest's count, already printed: into the summary
    return "$status"
}
export -f parity
FLASH_MARK=()
ls "$CARRY"/flash_attn-*.whl >/dev/null 2>&1 || "$PYTHON" -c "import flash_attn" 2>/dev/null \
    || FLASH_MARK=(-m "not flash_attn")
step parity-triton-ssd-bf16 "$BOX_PARITY_TRITON" parity triton-ssd-bf16 \
    -k "test_mamba_kernel_matches_the_pytorch_path and mamba_ssm_triton_ssd and bfloat16"

wait_for_build() {
    while [ ! -e "$WORK/build.status" ] && [ "$(elapsed)" -lt $((BUILD_DEADLINE + 10)) ]; do sleep 2; done
    tail -3 "$OUT/build-causal-conv1d.log"
    local status
    status=$(cat "$WORK/build.status" 2>/dev/null || echo none)
    case $status in
        0) "$PYTHON" -W always -c "import pixelvit as pv; r = pv.backends(); print(r)
raise SystemExit(0 if r['mamba_ssm_fused'] else 'the fused op is unavailable: ' + r['why']['mamba_ssm_fused'])" \
               2>&1 | tee "$WORK/backends.txt"
           [ "${PIPESTATUS[0]}" = 0 ] || { note "$(tail -1 "$WORK/backends.txt")"; return 1; } ;;
        124|137) note "the build ran past its $BOX_BUILD s box (build-causal-conv1d.log)"; return 1 ;;
        none) note "the build had not finished (build-causal-conv1d.log)"; return 1 ;;
        *) note "the build failed: $(grep -m1 -E 'error:|FAILED:|no causal|does not import' \
                   "$OUT/build-causal-conv1d.log" | cut -c1-200)"
           return 1 ;;
    esac
}
export -f wait_for_build elapsed
wait_box=$((BUILD_DEADLINE + 10 - $(elapsed)))
step causal-conv1d $((wait_box > 15 ? wait_box : 15)) wait_for_build
kill -TERM -- -"$(cat "$WORK/build.pgid")" 2>/dev/null   # a build still running is stopped whole

step parity-fused-bf16 "$BOX_PARITY_FUSED" parity fused-bf16 \
    -k "test_mamba_kernel_matches_the_pytorch_path and mamba_ssm_fused and bfloat16"
step parity-models "$BOX_PARITY_MODELS" parity models ${FLASH_MARK[@]+"${FLASH_MARK[@]}"} \
    -k "int32 or logits or gpu_matches_cpu"
table6() {   # no row starts later than 15 s before the box ends, so that the table is printed
    "$PYTHON" tests/benchmark.py --table6 --deadline $(($(date +%s) + STEP_BOX - 15)) --json "$OUT/table6.json" \
        | tee "$WORK/table6.out"
    local status=${PIPESTATUS[0]}
    grep '^Table 6:' "$WORK/table6.out" | tail -1 >> "$WORK/note"
    return "$status"
}
export -f table6
step table6 "$BOX_TABLE6" table6
step parity-rest "$(remaining)" parity rest ${FLASH_MARK[@]+"${FLASH_MARK[@]}"} \
    -k "(test_mamba_kernel_matches_the_pytorch_path and not bfloat16) or flash_attention"
if [ ${#FLASH_MARK[@]} -gt 0 ]; then
    echo "flash-attn is neither installed nor carried: its tests were left out (docs/kernels.md: the one-shot GPU check)"
fi

section "summary"
finish 1

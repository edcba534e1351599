#!/usr/bin/env bash
# The GPU measurements as one device call: unpack the bundle, then run the steps named (default:
# the ones still owed, benchmarks/RESULTS.md "Open on a GPU"), each under its own time limit,
# every log into $OUT.
#
# Why one script: a lent GPU machine gives a session minutes of device time, its start included,
# and one command at most 10. Prepared and checked here (`bash benchmarks/probes/gpu_check.sh
# --dry-run` prints the plan; `DEVICE=cpu MODEL=fasterrcnn_mobilenet_v3_large_320_fpn` runs the
# same steps on a CPU with the small model, as tests/test_device_kit.py does), it spends that
# time on measuring. Build the bundle first with `bash benchmarks/probes/make_bundle.sh`, then
# call the device tool with carry [".devbundle"] and, e.g., timeout_s 590:
#
#   bash benchmarks/probes/gpu_check.sh                 # the owed steps: imports, bare, fold4800
#   bash benchmarks/probes/gpu_check.sh bare start      # named steps only
#
# Steps (seconds each is allowed; the defaults sum to under 10 minutes with the unpack):
#   imports   which modules an inference actor's imports go to (probes.import_times)   30 s
#   bare      the bare model under fp32 / fp16 with and without folded batch norms, with box
#             agreement and a profile (benchmarks.gpu_levers)                          120 s
#   fold4800  the recipe, then ours with the fp16 levers: as measured before, with folded batch
#             norms, and with folded batch norms and 4 streams; 4800 images              400 s
#   start     an inference actor's start, step by step (probes.actor_start)             60 s
#   full1600  every row of the benchmark at 1600 images, bound and whole flow included  420 s
set -uo pipefail

cd "$(dirname "$0")/../.."
OUT=${OUT:-output/device-out}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
MODEL_ARG=${MODEL:+--model $MODEL}  # default: each benchmark's GPU model (the flow's default)
BATCH=${BATCH:-}  # the start step's batch size (default: probes.actor_start's)
# The start step's weights and images (default: the benchmark's, made when missing)
START_INPUTS="${WEIGHTS:+--weights $WEIGHTS} ${IMAGES:+--images $IMAGES}"
DRY=0
steps=()
for a in "$@"; do
    case $a in --dry-run) DRY=1 ;; *) steps+=("$a") ;; esac
done
[[ ${#steps[@]} -gt 0 ]] || steps=(imports bare fold4800)

FP16="--set precision=fp16 --set gpu_decode=true --set channels_last=true --set gpu_streams=3"
declare -A LIMIT=([imports]=30 [bare]=120 [fold4800]=400 [start]=60 [full1600]=420)
declare -A CMD=(
    [imports]="-m benchmarks.probes.import_times"
    [bare]="-m benchmarks.gpu_levers --device $DEVICE $MODEL_ARG --only 'fp32;fp32, folded BN;fp32, channels-last, folded BN;fp16, channels-last;fp16, channels-last, folded BN'"
    [fold4800]="-m benchmarks.run --device $DEVICE $MODEL_ARG --n 4800 --skip limit,flow,services $FP16 --variant 'folded BN:fold_batchnorm=true' --variant 'folded BN, 4 streams:fold_batchnorm=true,gpu_streams=4'"
    [start]="-m benchmarks.probes.actor_start --device $DEVICE $MODEL_ARG ${BATCH:+--batch $BATCH} $START_INPUTS"
    [full1600]="-m benchmarks.run --device $DEVICE $MODEL_ARG --n 1600"
)
for s in "${steps[@]}"; do
    limit=LIMIT_$s  # e.g. LIMIT_fold4800=300 overrides a step's limit
    [[ -z ${!limit:-} ]] || LIMIT[$s]=${!limit}
    [[ -n ${CMD[$s]:-} ]] || { echo "gpu_check: unknown step '$s' (imports, bare, fold4800, start, full1600)" >&2; exit 2; }
done

if [[ $DRY == 1 ]]; then
    for s in "${steps[@]}"; do echo "$s (${LIMIT[$s]} s): $PY ${CMD[$s]}"; done
    exit 0
fi
# Three files and one log per step: the device tool brings back at most 8 files from $OUT.
mkdir -p "$OUT"

# The bundle: Ray, Prefect and the rest, shadowing nothing the machine's torch relies on; only
# where this Python lacks them (a project venv runs the same steps without it).
if ! $PY -c "import ray, prefect, prefect_ray" 2>/dev/null; then
    [[ -f .devbundle/site.tar.xz ]] || { echo "gpu_check: no Ray/Prefect here and no .devbundle/site.tar.xz (carry it)" >&2; exit 3; }
    SITE=/tmp/detectflow-site
    if [[ ! -d $SITE/ray ]]; then
        mkdir -p "$SITE"
        if command -v xz >/dev/null; then
            xz -dc .devbundle/site.tar.xz | tar -xf - -C "$SITE" || exit 3
        else  # Python's lzma reads it as well, slower
            $PY -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" \
                .devbundle/site.tar.xz "$SITE" || exit 3
        fi
        # Once, here: the wheels carry no bytecode, and without it every new process (each Ray
        # worker, each actor) compiles what it imports again, ~2 CPU-s for ray.data and
        # Prefect alone where PYTHONDONTWRITEBYTECODE is set (measured on Python 3.12).
        $PY -m compileall -q -j 0 "$SITE" > /dev/null
    fi
    export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    nproc
    $PY -c "import sys, torch, torchvision, ray, prefect, prefect_ray, pyarrow
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      'torchvision', torchvision.__version__, 'ray', ray.__version__, 'prefect', prefect.__version__,
      'prefect-ray', prefect_ray.__version__, 'pyarrow', pyarrow.__version__)"
} 2>&1 | tee "$OUT/env.txt"

dmon=
if command -v nvidia-smi >/dev/null && [[ $DEVICE == cuda ]]; then
    nvidia-smi dmon -s u -d 1 -o T > "$OUT/dmon.txt" 2>&1 &
    dmon=$!
fi
RAY_PROCS='/ray/core/src/ray/|/ray/_private/|/ray/dashboard/|/ray/autoscaler/|^ray::'  # Ray's own
rc=0
for s in "${steps[@]}"; do
    echo "=== $s ($(date -u +%T), at most ${LIMIT[$s]} s): $PY ${CMD[$s]}" | tee -a "$OUT/steps.txt"
    start=$(date +%s)
    before=$(pgrep -f "$RAY_PROCS" | sort)
    eval "timeout -k 10 ${LIMIT[$s]} $PY ${CMD[$s]}" > "$OUT/$s.log" 2>&1
    code=$?
    echo "=== $s exit $code after $(( $(date +%s) - start )) s" | tee -a "$OUT/steps.txt"
    tail -n 40 "$OUT/$s.log"
    if [[ $code != 0 ]]; then
        rc=$code
        # A step killed at its limit can leave its Ray behind, actors on the GPU included: stop
        # the Ray processes that appeared during it (never another Ray on the machine).
        comm -13 <(echo "$before") <(pgrep -f "$RAY_PROCS" | sort) | xargs -r kill -9 2>/dev/null
    fi
done
[[ -n $dmon ]] && kill "$dmon" 2>/dev/null
exit $rc

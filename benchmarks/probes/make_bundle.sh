#!/usr/bin/env bash
# Build .devbundle/site.tar.xz: what a lent GPU machine lacks to run the benchmark and the flow.
#
# Why: the lent H100/H200 has Python 3.12 with its own torch, torchvision, numpy, pandas, pyarrow
# and pillow, but no Ray, Prefect or prefect-ray, and it cannot reach a package registry. Its
# device time is short (15 minutes a session, the start included), so everything it needs
# travels with the call, ready to unpack: cp312 wheels of our other dependencies, at the versions
# this project's .venv runs (its `pip freeze` is the constraint), unpacked, stripped of what a
# run never imports (Ray's RLlib, Serve, Tune, Train, Java and dashboard front end; Prefect's UI)
# and packed in one tar.xz under the call's 64 MiB. `benchmarks/probes/gpu_check.sh` unpacks it
# there.
#
#   bash benchmarks/probes/make_bundle.sh            # here, with pip and a registry
#   # then: device run, carry [".devbundle"], command "bash benchmarks/probes/gpu_check.sh"
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${BUNDLE_DIR:-$ROOT/.devbundle}
PY=${PYTHON:-python3}
VENV_PIP=${VENV_PIP:-$ROOT/.venv/bin/pip}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# The machine's own builds, which the bundle must not shadow (torch is compiled against them).
PROVIDED='^(torch|torchvision|torchaudio|triton|nvidia[-_].*|numpy|pandas|pyarrow|pillow|scipy|sympy|mpmath|networkx|setuptools|pip|wheel)$'
# Never imported by a run: Ray's pip/conda runtime environments and its profiler's binary.
UNUSED='^(virtualenv|py[-_]spy)$'

if [[ -x $VENV_PIP ]]; then
    "$VENV_PIP" freeze --exclude-editable | grep -v ' @ ' > "$WORK/constraints.txt"
else
    echo "make_bundle: no $VENV_PIP (run make install first): versions left to pip" >&2
    : > "$WORK/constraints.txt"
fi

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_5_x86_64 any; do
    platforms+=(--platform "$p")
done
"$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" \
    -c "$WORK/constraints.txt" -d "$WORK/wheels" \
    "ray[data]==2.60.0" "prefect==3.9.1" "prefect-ray==0.6.0" "s3fs>=2024.6" "fsspec>=2024.6" \
    "pydantic>=2.7" "tqdm>=4.66" > "$WORK/pip.log" 2>&1 \
    || { grep -v "is ignored: it is neither a file" "$WORK/pip.log" >&2; exit 1; }

mkdir -p "$WORK/site"
kept=0
wheels=()
for whl in "$WORK"/wheels/*.whl; do
    name=$(basename "$whl" | cut -d- -f1 | tr 'A-Z' 'a-z')
    if [[ $name =~ $PROVIDED || $name =~ $UNUSED ]]; then
        continue
    fi
    wheels+=("$whl")
    kept=$((kept + 1))
done
# Unpacked with their permission bits (Ray's gcs_server and raylet are executables; `zipfile -e`
# would drop the bits).
"$PY" - "$WORK/site" "${wheels[@]}" <<'EOF'
import sys, zipfile
from pathlib import Path

site = Path(sys.argv[1])
for whl in sys.argv[2:]:
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            path = Path(z.extract(info, site))
            mode = info.external_attr >> 16 & 0o777
            if mode and not info.is_dir():
                path.chmod(mode)
EOF

# What no run imports. Ray's dashboard *agent* stays (prefect-ray installs ray[default]); only
# the dashboard's browser build goes, which a run without the dashboard never serves.
S=$WORK/site
rm -rf "$S"/ray/rllib "$S"/ray/serve "$S"/ray/tune "$S"/ray/train "$S"/ray/jars "$S"/ray/cpp \
       "$S"/ray/dashboard/client/build "$S"/ray/tests "$S"/ray/air/tests "$S"/ray/data/tests \
       "$S"/prefect/server/ui "$S"/prefect/server/ui_v2 "$S"/prefect/ui_v2
# botocore's service models: keep S3 and what s3fs/aiobotocore resolve with it.
if [[ -d $S/botocore/data ]]; then
    for d in "$S"/botocore/data/*/; do
        case $(basename "$d") in s3|sts|sso|sso-oidc|endpoints*|partitions*) ;; *) rm -rf "$d" ;; esac
    done
fi

# Ray's binaries ship symbol tables that a run never reads (raylet 33 MiB, 22 without them);
# strip keeps what dynamic linking needs.
find "$S" -type f \( -name '*.so*' -o -perm -u+x \) -print0 | while IFS= read -r -d '' f; do
    if head -c 4 "$f" | grep -q 'ELF'; then strip --strip-unneeded "$f" 2>/dev/null || true; fi
done

mkdir -p "$OUT"
rm -f "$OUT"/site.tar.*
tar -cf - -C "$S" . | xz -T0 -9 > "$OUT/site.tar.xz"
# The call carries the working tree (~2 MiB) and this together, 64 MiB at most.
"$PY" - "$OUT/site.tar.xz" "$kept" <<'EOF'
import os, sys
size = os.path.getsize(sys.argv[1]) / 2**20
print(f"make_bundle: {sys.argv[2]} packages in {sys.argv[1]} ({size:.1f} MiB; a call carries 64 MiB "
      "with the working tree)")
if size > 56:
    sys.exit("make_bundle: too large to travel with the working tree")
EOF

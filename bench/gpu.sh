#!/usr/bin/env bash
# The GPU half of the benchmarks (issue "Feed a GPU") in one call: about 8 minutes on one H200.
# Tables go to stdout, tables + raw timings to $OUT/*.json (`python bench/common.py $OUT/*.json`
# prints them as the Markdown of bench/README.md). On a machine without network, install the
# wheels that bench/gpu_wheels.sh downloads first (see bench/README.md, "On a GPU").
#   OUT=results/gpu bash bench/gpu.sh                 # on the GPU host
#   DEVICE=cpu SMALL=1 OUT=/tmp/g bash bench/gpu.sh   # the same script at toy sizes, on a CPU
set -u -o pipefail
OUT=${OUT:-results/bench-gpu}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${SMALL:-0}" = 1 ]; then   # toy sizes: checks the script, measures nothing
  NET=(--backbone tiny-RN --image-size 64); IMAGES=8; GRID=32; READER=16; BUDGET=0.2
else
  NET=(--backbone RN101 --image-size 448); IMAGES=256; GRID=1024; READER=512; BUDGET=2
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
status=0
bench() {  # name, json tag, limit (s), args...
  local name=$1 tag=$2 limit=$3; shift 3
  echo "== $name $*"
  timeout "$limit" python "bench/$name.py" "$@" --json "$OUT/$name$tag.json" || { echo "!! $name failed ($?)"; status=1; }
}
for transforms in workers device; do  # the paper recipe: torchvision's RandAugment runs on the device
  bench bench_extract "-$transforms" 100 --device "$DEVICE" "${NET[@]}" --images "$IMAGES" --views 2 \
    --batch-size 64 --num-workers "$(nproc)" --generated --transforms $transforms --recipe paper
done
bench bench_ablate "" 150 --device "$DEVICE" --source random "${NET[@]}" --images "$GRID" --threads 1 --repeats 2
bench bench_train "" 100 --device "$DEVICE" "${NET[@]}" --images 64 --views 1 --val-images 16 --generated
bench bench_reader "" 140 --images "$READER" --budget "$BUDGET" --read-threads 2,4,8
exit $status

#!/bin/bash
# The `long` demo recipe (configs/train.py:long) on a machine without TensorFlow, TFDS or
# ml_collections (the lent GPU machines: JAX, flax, optax, orbax and transformers only), from
# data built elsewhere. Prints and saves what the train job's evaluation prints.
#
#   benchmarks/long_gpu.sh TFDS_DIR OUT_DIR [--config.FIELD=VALUE ...]
#
# TFDS_DIR holds synthetic_edit/64px_10k/1.0.0 (built here by any run of the `long` variant:
# W/tfds). If ./.whl holds wheels, they are installed first into /tmp/site (no index, no deps):
# tensorflow-datasets, grain, array_record, ml_collections and their needs (README, "Training on
# a machine without TensorFlow"). The run's eval.md, eval.json, metrics.jsonl and last sample grid
# are copied to OUT_DIR; its workdir is /tmp/long_gpu (removed first).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 TFDS_DIR OUT_DIR [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
tfds_dir=$1 out=$2
shift 2
if [ ! -d "$tfds_dir/synthetic_edit/64px_10k" ]; then
  echo "$0: $tfds_dir/synthetic_edit/64px_10k does not exist (build it with a run of configs/train.py:long)" >&2
  exit 2
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
work=/tmp/long_gpu
rm -rf "$work"
mkdir -p "$out"
python3 -c "import jax; print('devices:', jax.devices())"
start=$(date +%s)
python3 main.py --config=configs/train.py:long --workdir="$work" --config.data.data_dir="$tfds_dir" "$@" \
  2>&1 | tr '\r' '\n' | grep -v -E 'step/s|s/step|it/s' | tee "$out/log.txt"
echo "wall: $(( $(date +%s) - start )) s" | tee -a "$out/log.txt"
cp "$work/eval.md" "$work/eval.json" "$work/metrics.jsonl" "$out/"
grid=$(ls "$work/samples/" 2>/dev/null | tail -1)
if [ -n "$grid" ]; then cp "$work/samples/$grid" "$out/"; fi

#!/usr/bin/env bash
# The built-in demo, end to end on a fresh machine: `bash examples/demo.sh`.
#  1. environment (.venv, Fashion-MNIST from Debian)
#  2. a 512-image, class-stratified calibration subset as PNG files (calib/fmnist-512)
#  3. a small ResNet-18 classifier (one epoch on 12k Fashion-MNIST images, trained here in about a
#     minute, then cached under ~/.cache/ddtd); the benchmarks use the full recipe
#  4. `ddtd calibrate` (the covariance store) and `ddtd info` on the store
#  5. `ddtd compress` at 4x with the Sigma norm (no fine-tuning), then `ddtd report`
#  6. `ddtd eval`: test accuracy of both models, agreement, output error, CPU latency
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$(bash "$root/.ci/setup-env.sh" | tail -n 1)"
bin="$(dirname "$python")"
cd "$root"
out="${DDTD_OUT:-$root/out}"
mkdir -p "$out"
export TQDM_MININTERVAL=5

"$python" calib/make_subset.py --source fashion-mnist --split train --num 512 --seed 0 --out calib/fmnist-512
"$python" examples/train_reference.py --model resnet18 --recipe demo
model="${DDTD_CACHE:-$HOME/.cache/ddtd}/reference/resnet18_fmnist_demo.ddtd"

"$bin/ddtd" calibrate --model "$model" --images calib/fmnist-512 --size 32 --batch-size 128 -o "$out/demo.h5"
"$bin/ddtd" info "$out/demo.h5" | head -n 4

"$bin/ddtd" compress --model "$model" --calib "$out/demo.h5" --images calib/fmnist-512 --size 32 \
    --ratio 4 --norm sigma --method svd -o "$out/demo_4x.ddtd"
"$bin/ddtd" report "$out/demo_4x.ddtd" | tail -n 3

# A labelled test folder (Fashion-MNIST test split, 2000 images) for the evaluation.
"$python" calib/make_subset.py --source fashion-mnist --split test --num 2000 --seed 0 --out calib/fmnist-test-2000
"$bin/ddtd" eval --model "$out/demo_4x.ddtd" --reference "$model" --images calib/fmnist-test-2000 \
    --size 32 --json "$out/demo_4x.eval.json"

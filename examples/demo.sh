#!/usr/bin/env bash
# The built-in demo, end to end on a fresh machine: `bash examples/demo.sh`.
#  1. environment (.venv, Fashion-MNIST from Debian)
#  2. a 512-image, class-stratified calibration subset as PNG files (calib/fmnist-512)
#  3. the reference ResNet-18, trained on this CPU or loaded from the cache (~/.cache/ddtd)
#  4. `ddtd calibrate` on it (the covariance store), `ddtd info` on the store
#  5. `ddtd compress` at 4x with the Sigma norm (no fine-tuning), the per-layer report
#  6. `ddtd eval`: test accuracy of both models, agreement, output error, CPU latency
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$(bash "$root/.ci/setup-env.sh" | tail -n 1)"
bin="$(dirname "$python")"
cd "$root"
out="${DDTD_OUT:-$root/out}"
mkdir -p "$out"

"$python" calib/make_subset.py --source fashion-mnist --split train --num 512 --seed 0 --out calib/fmnist-512
"$python" examples/train_reference.py --model resnet18
model="${DDTD_CACHE:-$HOME/.cache/ddtd}/reference/resnet18_fmnist.ddtd"

"$bin/ddtd" calibrate --model "$model" --images calib/fmnist-512 --size 32 --batch-size 128 -o "$out/resnet18_fmnist.h5"
"$bin/ddtd" info "$out/resnet18_fmnist.h5"

"$bin/ddtd" compress --model "$model" --calib "$out/resnet18_fmnist.h5" --images calib/fmnist-512 --size 32 \
    --ratio 4 --norm sigma --method svd -o "$out/resnet18_fmnist_4x.ddtd"

# A labelled test folder (Fashion-MNIST test split, 2000 images) for the evaluation.
"$python" calib/make_subset.py --source fashion-mnist --split test --num 2000 --seed 0 --out calib/fmnist-test-2000
"$bin/ddtd" eval --model "$out/resnet18_fmnist_4x.ddtd" --reference "$model" --images calib/fmnist-test-2000 \
    --size 32 --json "$out/resnet18_fmnist_4x.eval.json"

#!/usr/bin/env bash
# The GPU check, on a machine with one CUDA GPU, in the Python environment it is started in:
#   1. the tests marked `gpu` (tests/test_gpu.py): need only torch, transformers, accelerate and pytest
#      (plus numpy, scipy, scikit-learn, pandas, tokenizers, which come with them here);
#   2. the smoke pipeline (experiments/smoke.yaml) with --mixed_precision bf16 on CUDA, in a fresh
#      MLflow store under a temporary folder, then each step's device and peak GPU memory.
# The pipeline needs the whole project installed (pip install -e .), the data
# (KD_SENTIMENT_DATA_DIR, see ../shared/data) and the offline models (KD_SENTIMENT_MODELS_DIR, from
# `python ../shared/tools/offline_models.py DIR --small`), as the README's smoke recipe does.
# Without CUDA it says so in one line and exits 0; a missing package or input is named in one line.
# Expected time on one H100-class GPU: well under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

missing() {  # the import names among "$@" that this Python cannot import
  "$PY" -c 'import importlib.util, sys; print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' "$@"
}

lacking=$(missing torch)
if [ -n "$lacking" ]; then echo "gpu_check: missing package(s): torch"; exit 1; fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA GPU visible to PyTorch on this machine; nothing to check."
  exit 0
fi
"$PY" -c 'import torch; print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")'

lacking=$(missing transformers accelerate pytest numpy scipy sklearn pandas tokenizers)
if [ -n "$lacking" ]; then echo "gpu_check: missing package(s) for the GPU tests: $lacking"; exit 1; fi
start=$SECONDS
"$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
tests_status=$?
echo "gpu_check: gpu tests exit status $tests_status ($((SECONDS - start)) s)"

lacking=$(missing mlflow datasets optimum onnxruntime onnx matplotlib psutil yaml)
if [ -n "$lacking" ]; then
  echo "gpu_check: smoke pipeline not run: missing package(s) $lacking (pip install -e . installs them)"; exit 1
fi
for var in KD_SENTIMENT_DATA_DIR KD_SENTIMENT_MODELS_DIR; do
  if [ -z "${!var:-}" ] || [ ! -d "${!var}" ]; then
    echo "gpu_check: smoke pipeline not run: $var is not set to a folder (see the README's offline recipe)"; exit 1
  fi
done

WORK=$(mktemp -d)
"$PY" - "$REPO" "$WORK/gpu-smoke.yaml" <<'EOF'
import sys
from pathlib import Path

import yaml

repo, out = Path(sys.argv[1]), Path(sys.argv[2])
config = yaml.safe_load((repo / "experiments" / "smoke.yaml").read_text())
config["catalog"] = str(repo / config["catalog"])  # absolute: the config is written outside the repository
for section in ("teacher", "distill"):
    config[section]["mixed_precision"] = "bf16"
out.write_text(yaml.safe_dump(config))
EOF
start=$SECONDS
(cd "$WORK" && "$PY" -m kd_sentiment.cli pipeline --config "$WORK/gpu-smoke.yaml" --dataset tweeteval) > "$WORK/pipeline.log" 2>&1
pipeline_status=$?
grep -E "^\[pipeline\]|ran on|quantize: " "$WORK/pipeline.log"
[ $pipeline_status -ne 0 ] && tail -30 "$WORK/pipeline.log"
echo "gpu_check: smoke pipeline exit status $pipeline_status ($((SECONDS - start)) s); log and store in $WORK"

(cd "$WORK" && "$PY" - <<'EOF'
from pathlib import Path

import mlflow
import pandas as pd

from kd_sentiment import tracking

tracking.configure()
runs = mlflow.search_runs(search_all_experiments=True, order_by=["attributes.start_time ASC"])
def shown(value, fmt="{}"):
    return "-" if value is None or pd.isna(value) else fmt.format(value)


print(f"{'step':<13} {'run':<56} {'device':<8} peak GPU MiB")
for _, run in runs.iterrows():
    print(f"{shown(run.get('tags.kd_sentiment.step')):<13} {shown(run.get('tags.mlflow.runName')):<56} "
          f"{shown(run.get('tags.device')):<8} {shown(run.get('metrics.peak_gpu_memory_mb'), '{:.0f}')}")
for csv in sorted(Path("results/benchmarks").glob("*.csv")):
    frame = pd.read_csv(csv)
    rows = frame[frame["backend"].str.startswith("torch") & (frame["setting"] == "real")]
    print(rows[["label", "batch_size", "model_p50_ms", "peak_gpu_mb"]].to_string(index=False))
EOF
) || pipeline_status=1

[ $tests_status -eq 0 ] && [ $pipeline_status -eq 0 ]

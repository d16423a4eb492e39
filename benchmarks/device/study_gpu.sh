#!/bin/bash
# One device call (after benchmarks/device/prepare.sh; carry .gpu): versions, MiniLM back to fp32, ViT-B/16 GPU throughput (perf.py gpu), then the text study's
# GPU version (full Banking77 at the banking77 preset's budget), report from whatever finished.
# (As run on 2026-11-25, except that the MiniLM restoration has since moved into restore_minilm.py.)
set -u
export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, timm, peft, transformers; print('versions', torch.__version__, timm.__version__, peft.__version__, transformers.__version__, torch.cuda.get_device_name())" 2>&1 | tee $OUT/perf.jsonl
python3 benchmarks/device/restore_minilm.py 2>&1 | tee -a $OUT/perf.jsonl
timeout 100 python3 benchmarks/perf.py gpu --repeats 3 >> $OUT/perf.jsonl 2>&1
cp benchmarks/results/perf.json benchmarks/results/perf.md $OUT/
timeout ${STUDY_S:-400} python3 benchmarks/study_reswu.py --only text-full --data .gpu/data --out /tmp/study --workers ${W:-8} \
  --results $OUT --images $OUT --name study_reswu_gpu --set model.backbone=hf:/tmp/minilm train.device=cuda > $OUT/study.log 2>&1
echo "study rc=$?" >> $OUT/study.log
nvidia-smi --query-gpu=name,memory.used --format=csv >> $OUT/study.log 2>&1
timeout 60 python3 benchmarks/study_reswu.py --only text-full --data .gpu/data --out /tmp/study --report-only \
  --results $OUT --images $OUT --name study_reswu_gpu --set model.backbone=hf:/tmp/minilm train.device=cuda >> $OUT/study.log 2>&1
ls /tmp/study/study-reswu-text-full/runs | wc -l >> $OUT/study.log

#!/bin/bash
# Second device call (after benchmarks/device/prepare.sh; carry .gpu): the GPU study's high-LoRA-rate cells (0.3, 1.0), seed 0, at full data and budget.
set -u
# (As run on 2026-11-25, except that the MiniLM restoration has since moved into restore_minilm.py.)
export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 benchmarks/device/restore_minilm.py 2>&1 | tee $OUT/prep.log
A="--only text-full --data .gpu/data --out /tmp/study --lrs 0.3 1.0 --seeds 0 --results $OUT --images $OUT --name study_reswu_gpu_highlr --set model.backbone=hf:/tmp/minilm train.device=cuda"
timeout ${STUDY_S:-250} python3 benchmarks/study_reswu.py $A --workers 5 > $OUT/study.log 2>&1
echo "study rc=$?" >> $OUT/study.log
timeout 40 python3 benchmarks/study_reswu.py $A --report-only >> $OUT/study.log 2>&1

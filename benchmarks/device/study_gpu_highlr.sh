#!/bin/bash
# Second device call (after benchmarks/device/prepare.sh; carry .gpu): the GPU study's high-LoRA-rate cells (0.3, 1.0), seed 0, at full data and budget.
set -u
export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 - <<'PY' 2>&1 | tee $OUT/prep.log
import shutil, os
from safetensors.torch import load_file, save_file
os.makedirs("/tmp/minilm", exist_ok=True)
for f in os.listdir(".gpu/minilm"):
    if f != "model16.safetensors":
        shutil.copy(f".gpu/minilm/{f}", "/tmp/minilm/")
s = load_file(".gpu/minilm/model16.safetensors")
save_file({k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in s.items()}, "/tmp/minilm/model.safetensors")
print("minilm ok")
PY
A="--only text-full --data .gpu/data --out /tmp/study --lrs 0.3 1.0 --seeds 0 --results $OUT --images $OUT --name study_reswu_gpu_highlr --set model.backbone=hf:/tmp/minilm train.device=cuda"
timeout ${STUDY_S:-250} python3 benchmarks/study_reswu.py $A --workers 5 > $OUT/study.log 2>&1
echo "study rc=$?" >> $OUT/study.log
timeout 40 python3 benchmarks/study_reswu.py $A --report-only >> $OUT/study.log 2>&1

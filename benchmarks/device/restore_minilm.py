"""On the device: rebuild all-MiniLM-L6-v2 in float32 at /tmp/minilm from .gpu/minilm (see prepare.sh)."""

import os
import shutil

from safetensors.torch import load_file, save_file

SRC, DST = ".gpu/minilm", "/tmp/minilm"
os.makedirs(DST, exist_ok=True)
for name in os.listdir(SRC):
    if name != "model16.safetensors":
        shutil.copy(os.path.join(SRC, name), DST)
state = load_file(os.path.join(SRC, "model16.safetensors"))
save_file({k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()},
          os.path.join(DST, "model.safetensors"))
print("minilm ok")

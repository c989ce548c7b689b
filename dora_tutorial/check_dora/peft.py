"""Hugging Face PEFT's DoRA as a layer the checks can take (--peft). PEFT is imported only when
used: importing the checker must not need it."""

import functools

from torch import nn


@functools.cache
def peft_unavailable_reason() -> str | None:
    """None when PEFT can be imported and used, else why not. Used, not only imported: PEFT can
    import fine and fail when it wraps a layer (an older torchao beside it makes get_peft_model
    raise ImportError)."""
    try:
        from peft import LoraConfig, get_peft_model
    except Exception as e:  # not only ImportError: a broken install can raise anything
        return f"peft cannot be imported ({type(e).__name__}: {e}); pip install peft"
    try:
        config = LoraConfig(r=1, lora_alpha=1, use_dora=True, target_modules=["0"])
        get_peft_model(nn.Sequential(nn.Linear(2, 2)), config)
    except Exception as e:
        text = " ".join(str(e).split())[:200]
        return f"peft imports but fails in use ({type(e).__name__}: {text})"
    return None


class PeftDoRA(nn.Module):
    """PEFT's DoRA on one layer (nn.Linear or nn.Conv2d), with PEFT's merges as methods; a
    factory: PeftDoRA(layer, rank, alpha)."""

    def __init__(self, layer, rank, alpha, dropout=0.0):
        super().__init__()
        if reason := peft_unavailable_reason():
            raise RuntimeError(f"PEFT's DoRA cannot be built: {reason}")
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=rank, lora_alpha=alpha, use_dora=True, target_modules=["0"], lora_dropout=dropout
        )
        self.model = get_peft_model(nn.Sequential(layer), config)
        self.forward, self.merge_and_unload = self.model.forward, self.model.merge_and_unload
        self.merge, self.unmerge = self.model.merge_adapter, self.model.unmerge_adapter

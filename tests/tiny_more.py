"""Tiny vision, speech, mixture-of-experts and fused-FFN models, built from configs (no downloads).

The same sizes as `pelthub.tiny` (two layers, width 32, four heads); images are 16×16 in 8×8
patches (four patch tokens), Whisper reads 8 mel bins over 16 frames (8 encoder positions).
"""
from __future__ import annotations

import torch
import transformers

from pelthub.tiny import VOCAB, batch as text_batch

_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_IMAGE = dict(_SIZES, image_size=16, patch_size=8, num_channels=3)
_TOKENS = dict(vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# family → (config class, model class, config fields)
SPECS: dict[str, tuple[str, str, dict]] = {
    "vit": ("ViTConfig", "ViTForImageClassification", _IMAGE),
    "deit": ("DeiTConfig", "DeiTForImageClassification", _IMAGE),
    "clip-vision": ("CLIPVisionConfig", "CLIPVisionModel", dict(_IMAGE, projection_dim=16)),
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration",
                dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                     max_source_positions=8, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2, decoder_start_token_id=1)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(_SIZES, **_TOKENS, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "modernbert": ("ModernBertConfig", "ModernBertForSequenceClassification",
                   dict(_SIZES, **_TOKENS, cls_token_id=1, sep_token_id=2)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_SIZES, **_TOKENS, num_key_value_heads=2)),
}
VISION = ("vit", "deit", "clip-vision")


def family(name: str, seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A tiny model of one of `SPECS` (config fields changed by `overrides`), in eval mode."""
    config_class, model_class, fields = SPECS[name]
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**{**fields, **overrides})).eval()


def batch(name: str, b: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch the family reads: images, mel features (+ decoder ids), or padded token ids."""
    g = torch.Generator().manual_seed(seed)
    if name in VISION:
        return {"pixel_values": torch.randn(b, 3, 16, 16, generator=g)}
    if name == "whisper":
        return {"input_features": torch.randn(b, 8, 16, generator=g),
                "decoder_input_ids": torch.randint(3, VOCAB, (b, 4), generator=g)}
    return text_batch(name, b=b, seed=seed)


def output(out: object) -> torch.Tensor:
    """What a test compares: the logits, or the last hidden state of a headless model (CLIPVisionModel)."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state

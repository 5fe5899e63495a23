"""Long-CLIP text positions: the text tower of the released CLIP-MoE models (248 positions in two tables,
`positional_embedding` for positions < 20 and `positional_embedding_res` for the rest; docs/checkpoints.md)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

LONG_CLIP_SHORT_POSITIONS = 20   # Long-CLIP keeps the first 20 CLIP positions and stretches the rest (77 -> 248)

_LONG_CLIP_CLASS = None


def long_clip_class():
    """open_clip.CLIP subclass with Long-CLIP text positions, created on first use so that importing clipmoe never
    imports open_clip; reachable (and picklable) as `clipmoe.longclip.LongCLIP`."""
    global _LONG_CLIP_CLASS
    if _LONG_CLIP_CLASS is not None:
        return _LONG_CLIP_CLASS
    import open_clip
    from open_clip.transformer import text_global_pool

    class LongCLIP(open_clip.CLIP):
        """An open_clip CLIP whose text tower adds Long-CLIP positions: position p < short_positions takes row p
        of `positional_embedding`, the others row p of `positional_embedding_res` (both [context_length, width]).

        This is the official masked sum `pe·mask1 + pe_res·mask2` computed as one table; each output row comes from
        one table, so values and gradients are the same. `encode_text` accepts [N, L] token ids with
        L <= context_length (the Long-CLIP tokenizer pads to 248); EOT pooling is at the argmax token id.
        """

        def __init__(self, embed_dim, vision_cfg, text_cfg, quick_gelu: bool = False,
                     short_positions: int = LONG_CLIP_SHORT_POSITIONS, **kwargs):
            super().__init__(embed_dim, vision_cfg, text_cfg, quick_gelu=quick_gelu, **kwargs)
            if not isinstance(short_positions, int) or not 0 <= short_positions <= self.context_length:
                raise ValueError(f"short_positions must be an int in [0, context_length={self.context_length}], "
                                 f"got {short_positions!r}")
            if self.positional_embedding is None or getattr(self, "text_pool_type", "argmax") != "argmax":
                raise ValueError("LongCLIP needs open_clip's learnable text positions and argmax (EOT) pooling")
            self.short_positions = short_positions
            self.positional_embedding_res = nn.Parameter(self.positional_embedding.detach().clone())

        def text_positions(self, length: int | None = None) -> torch.Tensor:
            """[length, width]: the positions added to the first `length` token embeddings."""
            length = self.context_length if length is None else length
            short = min(self.short_positions, length)
            return torch.cat([self.positional_embedding[:short], self.positional_embedding_res[short:length]])

        def encode_text(self, text, normalize: bool = False):
            if text.dim() != 2 or not 1 <= text.shape[1] <= self.context_length:
                raise ValueError(f"text must be token ids [N, L] with 1 <= L <= context_length="
                                 f"{self.context_length}, got shape {tuple(text.shape)}")
            length = text.shape[1]
            cast_dtype = self.transformer.get_cast_dtype()
            x = self.token_embedding(text).to(cast_dtype) + self.text_positions(length).to(cast_dtype)
            x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
            x = text_global_pool(self.ln_final(x), text, "argmax")
            if isinstance(self.text_projection, nn.Linear):
                x = self.text_projection(x)
            elif self.text_projection is not None:
                x = x @ self.text_projection
            return F.normalize(x, dim=-1) if normalize else x

        def forward_intermediates(self, image=None, text=None, **kwargs):
            if text is not None:
                raise NotImplementedError("LongCLIP.forward_intermediates supports images only; use encode_text "
                                          "for texts (open_clip's version would add the wrong positions)")
            return super().forward_intermediates(image=image, **kwargs)

    LongCLIP.__module__, LongCLIP.__qualname__ = __name__, "LongCLIP"
    _LONG_CLIP_CLASS = LongCLIP
    return LongCLIP


def __getattr__(name):
    if name == "LongCLIP":
        return long_clip_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


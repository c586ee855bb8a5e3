"""Fused window attention for transformers' HTSAT (`ClapAudioModel`), which implements eager attention only.

Each Swin window attends with `softmax(q k^T / sqrt(d) + relative position bias + shifted-window mask) v`. The eager
module spells this out in separate matmul, add, softmax and matmul ops; here the bias and the mask are one additive
mask of a single `torch.nn.functional.scaled_dot_product_attention` call. The parameters and their names are the
eager module's, so checkpoints, `_keep_in_fp32_modules_strict` and PEFT targets are unchanged.
"""

import torch
from torch.nn import functional as F
from transformers import PretrainedConfig
from transformers.models.clap.modeling_clap import ClapAudioAttention, ClapAudioSelfAttention


class HTSATSdpaSelfAttention(ClapAudioSelfAttention):
    """[`ClapAudioSelfAttention`] that runs SDPA unless the owning model's `config._attn_implementation` is "eager" or
    attention weights are requested (SDPA does not return them); then it runs the eager module's own code.

    The owning model's config is read at every call, so `model.set_attn_implementation(...)` switches the tower too.
    """

    def __init__(self, config, model_config: PretrainedConfig, dim: int, num_heads: int, window_size):
        super().__init__(config, dim, num_heads, window_size)
        self.config = model_config

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_attentions: bool | None = False) -> tuple[torch.Tensor]:
        if output_attentions or self.config._attn_implementation == "eager":
            return super().forward(hidden_states, attention_mask, output_attentions)
        batch, tokens, _ = hidden_states.shape
        shape = (batch, tokens, -1, self.attention_head_size)
        query, key, value = (
            projection(hidden_states).view(shape).transpose(1, 2) for projection in (self.query, self.key, self.value)
        )
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(tokens, tokens, -1).permute(2, 0, 1)  # (heads, tokens, tokens)
        if attention_mask is not None:
            # The shifted-window mask `(windows per image, tokens, tokens)`; the batch is images x windows, window
            # index fastest, as in the eager module.
            windows = attention_mask.shape[0]
            bias = (bias + attention_mask[:, None]).repeat(batch // windows, 1, 1, 1)
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias.to(query.dtype), dropout_p=self.dropout.p if self.training else 0.0
        )
        return (context.transpose(1, 2).reshape(batch, tokens, self.all_head_size),)


def use_sdpa_window_attention(tower: torch.nn.Module, model_config: PretrainedConfig) -> None:
    """Give every window attention of an HTSAT tower the SDPA path (fresh modules of the same shapes and dtype, so call
    this in a model's `__init__`, before its weights are initialised or loaded)."""
    for attention in tower.modules():
        if isinstance(attention, ClapAudioAttention):
            eager = attention.self
            fused = HTSATSdpaSelfAttention(
                tower.config, model_config, eager.all_head_size, eager.num_attention_heads, eager.window_size
            )
            attention.self = fused.to(device=eager.query.weight.device, dtype=eager.query.weight.dtype)

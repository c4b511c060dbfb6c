"""Tiny random-init Hugging Face models with real padding, built offline from configs."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

VOCAB = 99


@dataclasses.dataclass(frozen=True)
class ZooModel:
    name: str
    impls: tuple[str, ...]
    #: expected mask class of every site, in graph order (2 layers; encoder-decoders 2 + 2)
    expected_masks: tuple[str, ...]

    def build(self, impl: str) -> torch.nn.Module:
        import transformers

        torch.manual_seed(0)
        cfg = _config(self.name)
        cls = {
            "t5": transformers.T5Model,
            "bart": transformers.BartModel,
            "vit": transformers.ViTModel,
        }.get(self.name, transformers.AutoModel)
        model = (
            cls._from_config(cfg, attn_implementation=impl)
            if cls is not transformers.AutoModel
            else transformers.AutoModel.from_config(cfg, attn_implementation=impl)
        )
        return model.eval()

    def inputs(self, batch: int = 2, length: int = 8, seed: int = 0) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        if self.name == "vit":
            return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
        ids = torch.randint(3, VOCAB, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[-1, length - 3 :] = 0  # real padding on the last example
        kw: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self.name in ("t5", "bart"):
            dec = torch.randint(3, VOCAB, (batch, max(2, length - 2)), generator=g)
            kw["decoder_input_ids"] = dec
        if self.name in ("gpt2", "llama", "qwen2", "bloom", "t5", "bart"):
            kw["use_cache"] = False
        return kw

    @staticmethod
    def hidden(output: Any) -> torch.Tensor:
        return output.last_hidden_state


def _config(name: str) -> Any:
    import transformers as T

    common = {"vocab_size": VOCAB}
    if name == "bert":
        return T.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            **common,
        )
    if name == "roberta":
        return T.RobertaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            pad_token_id=1,
            **common,
        )
    if name == "distilbert":
        return T.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **common)
    if name == "gpt2":
        return T.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2, **common
        )
    if name == "llama":
        return T.LlamaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            **common,
        )
    if name == "qwen2":
        return T.Qwen2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            **common,
        )
    if name == "t5":
        return T.T5Config(
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            **common,
        )
    if name == "bart":
        return T.BartConfig(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            **common,
        )
    if name == "vit":
        return T.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=16,
            patch_size=4,
        )
    if name == "bloom":
        return T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common)
    raise KeyError(name)


ZOO = [
    ZooModel("bert", ("eager", "sdpa"), ("key",) * 2),
    ZooModel("roberta", ("eager", "sdpa"), ("key",) * 2),
    ZooModel("distilbert", ("eager", "sdpa"), ("key",) * 2),
    ZooModel("gpt2", ("eager", "sdpa"), ("causal+key",) * 2),
    ZooModel("llama", ("eager", "sdpa"), ("causal+key",) * 2),
    ZooModel("qwen2", ("eager", "sdpa"), ("causal+key",) * 2),
    # T5 adds a learned relative-position bias (it depends on i - j: general) to encoder and
    # decoder self-attention; its cross-attention bias is zero plus the encoder padding (key).
    ZooModel("t5", ("eager", "sdpa"), ("general",) * 3 + ("key", "general", "key")),
    ZooModel("bart", ("eager", "sdpa"), ("key", "key", "causal", "key", "causal", "key")),
    ZooModel("vit", ("eager", "sdpa"), ("none",) * 2),
    # BLOOM's ALiBi is computed as slope * (key position from the padding mask's cumsum): a per-key
    # bias (softmax drops the slope * i part of slope * (j - i)), so with its causal mask the
    # site is causal+key — exactly representable by kernel variants.
    ZooModel("bloom", ("eager",), ("causal+key",) * 2),
]

"""A sweep over every Hugging Face model type (tiny, random weights), timm and ``torch.nn`` models.

For each model and attention implementation the sweep checks, independently of attnrewrite's own
matcher, that ``ar.find_attention`` finds every attention site, that the exact ``softmax``
rewrite reproduces the model at a batch size and length other than the captured example's, and
that the ``linear`` rewrite runs and is finite. Used by ``tests/zoo/test_sweep.py`` (CI sample and
the slow full run) and ``benchmarks/model_sweep.py`` (the table of every model type).

Three parts:

* **Building** (:func:`build_hf`): the config class's defaults, shrunk generically by key name
  (:func:`shrink_config`: widths 64, 4 heads of 16, 2 key/value heads, 2 layers, vocabulary 128,
  images 32x32 in patches of 8, ...), ``Model._from_config(config, attn_implementation=...)`` and
  inputs synthesised from ``main_input_name`` and the forward signature (:func:`make_inputs`).
  Whatever this cannot build is :class:`NotBuildable`, reported with its reason, never a failure.
* **Counting** (:class:`AttentionCounter`): an independent runtime count of attention sites.
* **Checking** (:func:`check_model`): capture, find, compare counts, softmax parity, linear.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import inspect
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

#: relative tolerance of the exact ``softmax`` rewrite (max |out - ref| / max |ref|)
PARITY_TOL = 1e-4
EXAMPLE_BATCH, NEW_BATCH = 2, 3
VOCAB = 128


class NotBuildable(Exception):
    """The generic builder could not make this model type (a property of the sweep, not a bug)."""


# -- independent attention count --------------------------------------------------------------

aten = torch.ops.aten

_SOFTMAX = {aten._softmax.default, aten._safe_softmax.default}
#: fused kernels an ``F.scaled_dot_product_attention`` call lands in (each is one site)
_FUSED_ATTENTION = {
    name
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
        "_native_multi_head_attention",
    )
}
#: matrix products and the argument positions of their two factors: the score product q·kᵀ and
#: the value product p·v (``matmul``, ``einsum`` and ``linear`` decompose into these)
_MATMUL = {
    aten.mm.default: (0, 1),
    aten.bmm.default: (0, 1),
    aten.mv.default: (0, 1),
    aten.baddbmm.default: (1, 2),
    aten.addmm.default: (1, 2),
    aten.addbmm.default: (1, 2),
}


#: layout ops that may change the number of elements while moving scores or probabilities
#: around (Longformer's sliding chunks pad, stride, slice and concatenate them)
_LAYOUT = {
    "constant_pad_nd", "as_strided", "slice", "narrow", "select", "expand", "unfold", "cat",
    "split", "split_with_sizes", "unbind", "chunk", "diagonal", "index_select", "new_empty",
}  # fmt: skip


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


class AttentionCounter:
    """Count attention sites by running the model, without attnrewrite's matcher.

    A site is either one ``F.scaled_dot_product_attention`` call (seen as a torch function, so its
    math fallback's own softmax is not counted again; calls that reach a fused ATen kernel
    directly, like ``nn.MultiheadAttention``'s fast path, are counted at dispatch), or one softmax
    (``aten._softmax`` / ``aten._safe_softmax``, any dtype) whose input comes from a product of
    two activations (the scores q·kᵀ, possibly scaled, masked, biased or cast) and whose output
    reaches a factor of a matrix product (``mm``, ``bmm``, ``baddbmm``, ``addmm``; ``matmul``,
    ``einsum`` and ``linear`` decompose into these) whose other factor is not a parameter (the
    value product). A softmax is counted once, however many products it feeds.

    Taint travels by tensor identity (the counter keeps every tainted tensor alive while it
    runs, so an ``id`` is never reused) through any op that reads tainted tensors of exactly one
    softmax and writes a tensor of the same number of elements: views, transposes, ``contiguous``,
    ``clone``, casts, dropout, scaling, masking (``masked_fill``, ``where``), head masks, in-place
    updates and ``copy_`` into another tensor; and through layout ops that change the number of
    elements (pad, ``as_strided``, slices, ``cat``, splits: Longformer's sliding chunks). Scores
    (products of two activations) are tainted the same way.

    Limits (all by design; the count is a runtime fact, not a proof):

    * Only what this run executes: branches not taken with these inputs are not counted, and a
      model that calls one attention module twice counts twice (so does ``find_attention``).
    * Routers (softmax over experts, then ``topk``/``gather`` or an elementwise product) are not
      counted: ``topk`` changes the number of elements and elementwise products are not matrix
      products. A router whose weights enter a ``bmm`` *with activations* would be counted.
    * A softmax whose output is reduced (summed, top-k) before a product, or that reaches the
      product only after being combined with a second softmax, is not counted (the
      combined tensor carries both taints and is dropped).
    * Softmax-weighted mixtures whose weights are not a product of two activations are not
      counted: ConvBERT's dynamic convolution (weights from a linear layer), gates, routers.
      Scores computed without a matrix product (an elementwise product then a sum) are missed.
    * Probabilities plus or minus other full-size data (GroupViT's straight-through hard
      assignment, y_hard − y_soft.detach() + y_soft, whose value is a one-hot argmax) are no
      longer probabilities: the taint stops there.
    * A softmax feeding a product with a parameter (a learned projection of probabilities) is
      not attention and is not counted; attention over a learned memory (keys and values
      parameters, as in some poolers) is missed for the same reason. Learned *queries* are
      counted: scores ``W @ xᵀ`` with the parameter as the left factor and an activation as the
      right one (attention pooling, Inkling's attention over block states), whereas a linear layer
      or router, ``x @ Wᵀ``, has its parameter on the right.
    * ``torch.ops`` calls a model makes to custom kernels are invisible unless they decompose
      into the ops above.
    """

    def __init__(
        self,
        parameters: Iterable[torch.Tensor] = (),
        module_names: dict[int, str] | None = None,
    ) -> None:
        self.sdpa_calls = 0
        self.softmax_calls = 0
        self.attention_softmaxes: set[int] = set()
        #: the innermost module running at each softmax call and at each sdpa call
        self._names = module_names or {}
        self._module_stack: list[str] = []
        self._softmax_modules: dict[int, str] = {}
        self._sdpa_modules: list[str] = []
        self._param_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self._taint: dict[int, tuple[torch.Tensor, int]] = {}
        self._scores: dict[int, torch.Tensor] = {}
        self._inside_sdpa = 0

    @property
    def sites(self) -> int:
        return self.sdpa_calls + len(self.attention_softmaxes)

    @property
    def site_modules(self) -> list[str]:
        """The module path of every counted site (the innermost module the call ran in)."""
        return self._sdpa_modules + [
            self._softmax_modules.get(i, "") for i in sorted(self.attention_softmaxes)
        ]

    def _current_module(self) -> str:
        return self._module_stack[-1] if self._module_stack else ""

    def _source(self, tensors: list[torch.Tensor]) -> set[int]:
        return {self._taint[id(t)][1] for t in tensors if id(t) in self._taint}

    def _is_parameter(self, tensor: torch.Tensor) -> bool:
        try:
            return tensor.untyped_storage().data_ptr() in self._param_storages
        except (RuntimeError, NotImplementedError):
            return False

    def _mark(self, tensor: torch.Tensor, source: int) -> None:
        self._taint[id(tensor)] = (tensor, source)

    def _is_score(self, tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and id(tensor) in self._scores

    def on_dispatch(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        name = func.overloadpacket.__name__
        if name in _FUSED_ATTENTION and not self._inside_sdpa:
            self.sdpa_calls += 1
            self._sdpa_modules.append(self._current_module())
            return
        if func in _SOFTMAX:
            if self._inside_sdpa:
                return
            self.softmax_calls += 1
            self._softmax_modules[self.softmax_calls] = self._current_module()
            if self._is_score(args[0]):
                self._mark(out, self.softmax_calls)
            return
        inputs = _tensors((args, kwargs))
        if func in _MATMUL:
            factors = [args[i] for i in _MATMUL[func]]
            left, right = (self._is_parameter(t) for t in factors)
            if not left and not right:
                # a product of two activations: a score product, or a value product when one
                # factor carries softmax probabilities
                self.attention_softmaxes.update(
                    self._taint[id(t)][1] for t in factors if id(t) in self._taint
                )
                self._scores[id(out)] = out
            elif left and not right and id(factors[1]) not in self._taint:
                self._scores[id(out)] = out  # learned queries against activation keys
            return
        results = [t for t in _tensors(out) if t.is_floating_point()]
        layout = name in _LAYOUT
        score_sizes = {t.numel() for t in inputs if id(t) in self._scores}
        for result in results:
            if score_sizes and (layout or result.numel() in score_sizes):
                self._scores[id(result)] = result  # masked, scaled, biased, cast, viewed scores
        sources = self._source(inputs)
        if len(sources) != 1 or name in _FRESH:
            return
        (source,) = sources
        if name in _MIXES and any(
            id(t) not in self._taint and t.is_floating_point() and t.numel() == out.numel()
            for t in inputs
        ):
            # probabilities plus or minus other full-size data (a straight-through hard
            # assignment, y_hard − y_soft.detach() + y_soft): no longer softmax probabilities
            return
        numel = max(t.numel() for t in inputs if id(t) in self._taint)
        for result in results:
            if layout or result.numel() == numel:
                self._mark(result, source)

    @contextlib.contextmanager
    def counting(self) -> Iterator[AttentionCounter]:
        counter = self

        class _Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is torch.nn.functional.scaled_dot_product_attention:
                    counter.sdpa_calls += 1
                    counter._sdpa_modules.append(counter._current_module())
                    counter._inside_sdpa += 1
                    try:
                        return func(*args, **kwargs)
                    finally:
                        counter._inside_sdpa -= 1
                return func(*args, **kwargs)

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                counter.on_dispatch(func, args, kwargs, out)
                return out

        def enter(module: nn.Module, *_: Any) -> None:
            self._module_stack.append(self._names.get(id(module), self._current_module()))

        def leave(module: nn.Module, *_: Any) -> None:
            if self._module_stack:
                self._module_stack.pop()

        hooks = (
            nn.modules.module.register_module_forward_pre_hook(enter),
            nn.modules.module.register_module_forward_hook(leave, always_call=True),
        )
        try:
            with _Functions(), _Dispatch():
                yield self
        finally:
            for hook in hooks:
                hook.remove()
        self._taint.clear()
        self._scores.clear()


#: Ops that read only the shape of their input: their result carries none of its values.
_FRESH = frozenset(
    {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like"}
)
#: Elementwise ops that mix their operands additively (see ``AttentionCounter.on_dispatch``).
_MIXES = frozenset({"add", "sub", "rsub", "add_", "sub_"})


def count_attention(model: nn.Module, inputs: dict[str, Any]) -> AttentionCounter:
    """Run ``model(**inputs)`` once and count its attention sites (:class:`AttentionCounter`)."""
    counter = AttentionCounter(
        (t for t in list(model.parameters()) + list(model.buffers()) if t.numel() > 0),
        {id(m): name for name, m in model.named_modules()},
    )
    torch.manual_seed(0)
    with torch.no_grad(), counter.counting():
        model(**inputs)
    return counter


# -- generic shrinking of Hugging Face configs --------------------------------------------------

WIDTH, HEADS, HEAD_DIM, KV_HEADS, LAYERS = 64, 4, 16, 2, 2

_WIDTH_KEYS = {
    "hidden_size", "d_model", "n_embd", "n_embed", "dim", "embed_dim", "model_dim", "hidden_dim",
    "intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "n_inner",
    "word_embed_proj_dim", "projection_dim", "embedding_size", "d_inner", "filter_size",
    "encoder_hidden_size", "decoder_hidden_size", "text_embed_dim", "vision_embed_dim",
    "cross_attention_hidden_size", "moe_intermediate_size", "shared_expert_intermediate_size",
    "decoder_intermediate_size", "mlp_dim", "ffn_hidden_size", "hidden_channels",
}  # fmt: skip
_HEAD_KEYS = {
    "num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
    "decoder_attention_heads", "attention_heads", "decoder_num_attention_heads",
    "num_decoder_attention_heads", "encoder_num_attention_heads",
}  # fmt: skip
_KV_KEYS = {"num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"}
_HEAD_DIM_KEYS = {"head_dim", "d_kv", "attention_head_dim", "kv_channels", "d_head"}
_LAYER_KEYS = {
    "num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
    "num_decoder_layers", "num_encoder_layers", "decoder_num_hidden_layers",
    "encoder_num_hidden_layers",
}  # fmt: skip
#: rotary and low-rank (MLA) sizes that must fit the 16-wide heads
_ROPE_DIM_KEYS = {
    "rotary_dim": HEAD_DIM, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": HEAD_DIM,
    "kv_lora_rank": 32, "q_lora_rank": 32,
}  # fmt: skip
_EXPERT_KEYS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}


def _shrink_dict(config: dict[str, Any]) -> dict[str, Any]:
    out = dict(config)
    old_layers = [v for k, v in config.items() if k in _LAYER_KEYS and isinstance(v, int)]
    for key, value in config.items():
        if isinstance(value, dict) and ("model_type" in value or _LAYER_KEYS & set(value)):
            out[key] = _shrink_dict(value)
        if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
            continue
        if key in _WIDTH_KEYS and isinstance(value, int) and value > WIDTH:
            out[key] = WIDTH
        elif key in _HEAD_KEYS and isinstance(value, int) and value > 0:
            out[key] = HEADS
        elif key in _KV_KEYS and isinstance(value, int) and value > 0:
            out[key] = KV_HEADS
        elif key in _HEAD_DIM_KEYS and isinstance(value, int) and value > 0:
            out[key] = HEAD_DIM
        elif key in _LAYER_KEYS and isinstance(value, int) and value > LAYERS:
            # hierarchical models (Swin-like) count stages here: one per entry of `depths`
            if not isinstance(config.get("depths"), (list, tuple)):
                out[key] = LAYERS
        elif key in _HEAD_KEYS and isinstance(value, (list, tuple)):
            out[key] = [2] * len(value)  # per-stage heads: 2 divides every stage width
        elif key in _EXPERT_KEYS and isinstance(value, int) and value > 4:
            out[key] = 4
        elif key in ("num_experts_per_tok", "top_k", "moe_topk") and isinstance(value, int):
            out[key] = min(value, 2)
        elif key == "vocab_size" and isinstance(value, int) and value > VOCAB:
            out[key] = VOCAB
        elif key == "max_position_embeddings" and isinstance(value, int) and value > 512:
            out[key] = 512
        elif key == "max_source_positions" and isinstance(value, int) and value > 32:
            out[key] = 32
        elif key == "image_size":
            out[key] = [32, 32] if isinstance(value, (list, tuple)) else 32
        elif key == "patch_size" and isinstance(value, int) and value > 8:
            out[key] = 8
        elif key in _ROPE_DIM_KEYS and isinstance(value, int) and value > _ROPE_DIM_KEYS[key]:
            out[key] = _ROPE_DIM_KEYS[key]
        elif key in ("out_features", "out_indices"):
            out.pop(key)  # backbone stage names follow the (shrunk) depth: let the config choose
        elif key == "window_size" and isinstance(value, int) and value > 4:
            out[key] = 4  # Swin-like windows must tile the 8x8 patch grid of a 32x32 image
        elif key == "depths" and isinstance(value, (list, tuple)):
            out[key] = [1] * len(value)
        elif key == "conv_dim" and isinstance(value, (list, tuple)):
            out[key] = [32] * len(value)
        elif key == "num_conv_pos_embeddings" and isinstance(value, int):
            out[key] = 16
        elif key.endswith("_token_id") and isinstance(value, int) and value >= VOCAB:
            out[key] = VOCAB - 1 - (sum(map(ord, key)) % 16)
        elif isinstance(value, (list, tuple)) and old_layers and len(value) in old_layers:
            # per-layer tables (layer_types, sliding-window flags...) follow the layer count
            out[key] = list(value)[:LAYERS] if len(value) > LAYERS else value
    return out


def shrink_config(config: Any) -> Any:
    """A tiny version of ``config`` (same class), shrunk by key name; see the module docstring."""
    shrunk = _shrink_dict(config.to_dict())
    for key in ("architectures", "transformers_version", "_name_or_path", "id2label", "label2id"):
        shrunk.pop(key, None)
    return type(config).from_dict(shrunk)


# -- Hugging Face models ----------------------------------------------------------------------


#: The CI sample (``tests/zoo/test_sweep.py``): a fixed spread over encoders, decoders (dense,
#: MoE, ALiBi, GQA, sliding windows, soft-capping), encoder-decoders, vision and audio models.
#: Left to the full sweep (``-m slow``), to keep the default run short: the types that
#: ``tests/zoo/test_hf_zoo.py`` checks in both attention modes (bert, roberta, distilbert, bart, t5,
#: vit) and ``tests/zoo/test_more_models.py`` checks with their masks (mistral, gemma2, deberta-v2,
#: mpnet); and near-copies of types kept here or there: BERT's (data2vec-text, xlm-roberta,
#: megatron-bert, bert-generation, electra, layoutlm, splinter, tapas), BART's (blenderbot, plbart,
#: marian), ViT's (deit, ijepa, vivit, dinov2, yolos), wav2vec2-conformer's feature encoder
#: (wav2vec2, hubert, unispeech-sat), pvt's spatial-reduction attention (glpn), llama's (granite,
#: helium, apertus), gemma2's (vaultgemma), gptj's (codegen), gpt2's (imagegpt, openai-gpt),
#: olmo2's q/k norms (qwen3), persimmon's partial rotary (stablelm), mistral's (starcoder2), and
#: mamba (the attention-free fnet and rwkv stay).
CI_SAMPLE = (
    # encoders
    "albert", "convbert", "modernbert", "gte", "eurobert", "yoso", "roformer", "nomic_bert",
    "fnet",  # no attention at all (Fourier mixing): nothing found, nothing changed
    # decoders (tests/decode also generates with llama, gpt2, qwen2, gemma, phi, opt, bloom,
    # falcon, gpt_neox and mistral in every default run)
    "gpt_neo", "mixtral", "gpt_bigcode", "cohere", "persimmon", "diffllama", "glm4", "gpt_oss",
    "phi3", "gptj", "olmo2",
    # hybrids and recurrent models (attention beside state-space or recurrent layers, or none)
    "jamba", "recurrent_gemma", "rwkv",
    # encoder-decoders
    "whisper", "prophetnet",
    # vision and image-text
    "beit", "clip", "sam_vision_model", "pvt", "dinov3_vit", "mlcd_vision_model", "convnext",
    # audio
    "wav2vec2-conformer",
)  # fmt: skip


def hf_model_types() -> list[str]:
    """Every model type with a base-model class in ``transformers``' auto mappings."""
    from transformers.models.auto import modeling_auto

    return sorted(modeling_auto.MODEL_MAPPING_NAMES)


def _model_class(model_type: str) -> type:
    import transformers
    from transformers.models.auto import modeling_auto

    name = modeling_auto.MODEL_MAPPING_NAMES.get(model_type)
    if isinstance(name, (list, tuple)):
        name = name[0]
    if name is None:
        raise NotBuildable(f"no base model class for {model_type!r}")
    try:
        return getattr(transformers, name)
    except (AttributeError, ImportError) as exc:
        raise NotBuildable(f"{name} is not importable: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


@dataclasses.dataclass
class Built:
    """A model ready to sweep: example inputs and a maker of inputs of another shape."""

    name: str
    impl: str
    model: nn.Module
    make: Callable[[int, int, int], dict[str, Any]]  # (batch, length, seed) -> kwargs
    length: int
    notes: list[str] = dataclasses.field(default_factory=list)
    cache_kwarg: bool = False

    def inputs(self, batch: int = EXAMPLE_BATCH, length: int | None = None, seed: int = 0):
        return self.make(batch, self.length if length is None else length, seed)


def _text_inputs(sig: Any, config: Any, batch: int, length: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    vocab = getattr(config, "vocab_size", None) or VOCAB
    high = max(5, min(int(vocab), 100))
    kw: dict[str, Any] = {"input_ids": torch.randint(4, high, (batch, length), generator=g)}
    if "attention_mask" in sig:
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[-1, length - 2 :] = 0  # real padding on the last example
        kw["attention_mask"] = mask
    if "decoder_input_ids" in sig and getattr(config, "is_encoder_decoder", False):
        dec_len = max(2, length - 2)
        kw["decoder_input_ids"] = torch.randint(4, high, (batch, dec_len), generator=g)
    return kw


def _image_size(config: Any) -> int:
    for cfg in (config, getattr(config, "vision_config", None)):
        size = getattr(cfg, "image_size", None)
        if isinstance(size, int):
            return size
        if isinstance(size, (list, tuple)) and size:
            return int(size[0])
    return 32


def _pixel_inputs(config: Any, batch: int, seed: int, *, video: bool) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    vision = getattr(config, "vision_config", None) or config
    channels = getattr(vision, "num_channels", 3) or 3
    size = _image_size(config)
    shape: tuple[int, ...] = (batch, channels, size, size)
    if video:
        frames = getattr(vision, "num_frames", None) or 2
        shape = (batch, frames, channels, size, size)
    return {"pixel_values": torch.randn(*shape, generator=g)}


def _candidates(model: nn.Module, config: Any) -> list[tuple[str, int, Callable]]:
    """Input makers to try, in order: (description, example length, make(batch, length, seed))."""
    sig = inspect.signature(model.forward).parameters
    main = getattr(model, "main_input_name", "input_ids")
    if not isinstance(main, str):  # a model naming several main inputs (OneFormer): the first
        main = main[0] if main else "input_ids"
    found: list[tuple[str, int, Callable]] = []
    if main == "input_ids" or main not in sig and "input_ids" in sig:
        for length in (8, 16, 64):
            found.append(
                (f"text L={length}", length, lambda b, n, s: _text_inputs(sig, config, b, n, s))
            )
        if "pixel_values" in sig:  # image-text models (CLIP-like) need both
            found.append(
                (
                    "text+image",
                    8,
                    lambda b, n, s: {
                        **_text_inputs(sig, config, b, n, s),
                        **_pixel_inputs(config, b, s, video=False),
                    },
                )
            )
    elif main == "pixel_values":
        for video in (False, True):

            def make(b: int, n: int, s: int, video: bool = video) -> dict[str, Any]:
                return _pixel_inputs(config, b, s, video=video)

            found.append(("video" if video else "image", 0, make))
    elif main == "input_values":

        def make_values(b: int, n: int, s: int) -> dict[str, Any]:
            g = torch.Generator().manual_seed(s)
            return {"input_values": torch.randn(b, n, generator=g)}

        found.append(("waveform", 1600, make_values))
    elif main == "input_features":
        bins = getattr(config, "num_mel_bins", None) or getattr(config, "feature_size", None) or 80
        frames = 2 * getattr(config, "max_source_positions", 32) or 64

        def make_channels_first(b: int, n: int, s: int) -> dict[str, Any]:
            g = torch.Generator().manual_seed(s)
            kw = {"input_features": torch.randn(b, bins, n, generator=g)}
            if "decoder_input_ids" in sig:
                kw["decoder_input_ids"] = torch.randint(4, 50, (b, 4), generator=g)
            return kw

        def make_time_first(b: int, n: int, s: int) -> dict[str, Any]:
            g = torch.Generator().manual_seed(s)
            kw = {"input_features": torch.randn(b, n, bins, generator=g)}
            if "attention_mask" in sig:
                kw["attention_mask"] = torch.ones(b, n, dtype=torch.long)
            if "decoder_input_ids" in sig:
                kw["decoder_input_ids"] = torch.randint(4, 50, (b, 4), generator=g)
            return kw

        found.append(("features (B, F, T)", frames, make_channels_first))
        found.append(("features (B, T, F)", 64, make_time_first))
    return found


def _new_lengths(length: int) -> list[int]:
    if length == 0:
        return [0]
    return [length + 3, length + 8, length] if length < 100 else [length + 400, length]


def build_hf(model_type: str, impl: str) -> Built:
    """A tiny random ``model_type`` model with ``impl`` attention and working example inputs.

    Raises:
        NotBuildable: with the reason, when the generic recipe does not fit this type.
    """
    import transformers
    from transformers.models.auto import configuration_auto

    cls = _model_class(model_type)
    try:
        config_cls = configuration_auto.CONFIG_MAPPING[model_type]
        config = shrink_config(config_cls())
    except Exception as exc:  # noqa: BLE001 - any config trouble means "not buildable"
        raise NotBuildable(f"config: {_first_line(exc)}") from exc
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    try:
        model = cls._from_config(config, attn_implementation=impl).eval()
    except Exception as exc:  # noqa: BLE001
        text = _first_line(exc)
        if impl != "eager" and ("does not support" in text or "sdpa" in text.lower()):
            raise NotBuildable(f"{impl} unsupported") from exc
        raise NotBuildable(f"construct: {text}") from exc
    candidates = _candidates(model, config)
    if not candidates:
        raise NotBuildable(f"no input recipe for main input {model.main_input_name!r}")
    sig = inspect.signature(model.forward).parameters
    cache_kwarg = "use_cache" in sig
    errors = []
    for description, length, make in candidates:
        if cache_kwarg:
            make = _with_no_cache(make)
        try:
            with torch.no_grad():
                torch.manual_seed(0)
                main_output(model(**make(EXAMPLE_BATCH, length, 0)))
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{description}: {_first_line(exc)}")
            continue
        return Built(model_type, impl, model, make, length, [description], cache_kwarg)
    raise NotBuildable("inputs: " + " | ".join(errors)[:400])


def _with_no_cache(make: Callable) -> Callable:
    def make_no_cache(b: int, n: int, s: int) -> dict[str, Any]:
        return {**make(b, n, s), "use_cache": False}

    return make_no_cache


def main_output(output: Any) -> torch.Tensor:
    """The output compared for parity: ``last_hidden_state`` if there is one, else the first
    floating-point tensor of the output."""
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    for leaf in pytree.tree_leaves(output.to_tuple() if hasattr(output, "to_tuple") else output):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise TypeError(f"no floating-point tensor in the output ({type(output).__name__})")


# -- torch.nn and timm models -----------------------------------------------------------------


class _MHA(nn.Module):
    def __init__(self, need_weights: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(
            x, x, x, key_padding_mask=key_padding_mask, need_weights=self.need_weights
        )
        return out


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, src_key_padding_mask=key_padding_mask)


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, 2)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.decoder(
            x,
            x * 0.5,
            tgt_mask=causal,
            tgt_is_causal=True,
            memory_key_padding_mask=key_padding_mask,
        )


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Transformer(32, 4, 1, 1, 64, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.net(
            x,
            x.flip(1),
            tgt_mask=causal,
            tgt_is_causal=True,  # else torch compares the mask with a causal one: data-dependent
            src_key_padding_mask=key_padding_mask,
            memory_key_padding_mask=key_padding_mask,
        )


TORCH_NN_MODELS: dict[str, Callable[[], nn.Module]] = {
    "nn.MultiheadAttention(need_weights=True)": lambda: _MHA(True),
    "nn.MultiheadAttention(need_weights=False)": lambda: _MHA(False),
    "nn.TransformerEncoder+padding": _Encoder,
    "nn.TransformerDecoder+causal": _Decoder,
    "nn.Transformer+masks": _Transformer,
}


def build_torch_nn(name: str) -> Built:
    torch.manual_seed(0)
    model = TORCH_NN_MODELS[name]().eval()

    def make(batch: int, length: int, seed: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        mask = torch.zeros(batch, length, dtype=torch.bool)
        mask[-1, length - 2 :] = True  # padded keys of the last example
        return {"x": torch.randn(batch, length, 32, generator=g), "key_padding_mask": mask}

    return Built(name, "torch", model, make, 8)


TIMM_MODELS = ("vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224")


def timm_skip_reason() -> str | None:
    try:
        importlib.import_module("timm")
    except ImportError:
        return "timm is not installed (optional; pip install timm to sweep its models)"
    return None


def build_timm(name: str) -> Built:
    import timm

    torch.manual_seed(0)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, depth=2).eval()
    except TypeError:
        model = timm.create_model(name, pretrained=False, num_classes=0).eval()

    def make(batch: int, length: int, seed: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        return {"x": torch.randn(batch, 3, 224, 224, generator=g)}

    return Built(name, "timm", model, make, 0)


# -- the check --------------------------------------------------------------------------------


#: Status of a model whose own output is NaN everywhere at the sweep's inputs (with padding and
#: without): capture and the site count were checked, parity has nothing to compare.
MODEL_NAN = "model output NaN"


@dataclasses.dataclass
class SweepResult:
    """One row of the sweep. ``status`` is ``ok``, ``fail``, ``not buildable``,
    ``not capturable``, ``model output NaN``, ``timeout`` or ``crash``; ``failures`` lists each
    failed check."""

    name: str
    impl: str
    status: str
    reason: str = ""
    sites_found: int | None = None
    sites_expected: int | None = None
    #: expected sites the finder looked at and refused with a reason (``report.rejected``) in
    #: the module where the counter saw them
    sites_refused: int = 0
    #: counted calls torch.export removed as dead code (no output depends on them)
    sites_dead: int = 0
    softmax_calls: int | None = None
    parity: float | None = None
    parity_shape: str = ""
    linear_ok: bool | None = None
    default_cache: str = ""
    failures: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def capturable(self) -> bool:
        return self.status in ("ok", "fail", MODEL_NAN)

    @property
    def sites_match(self) -> bool:
        """Every counted site was found, refused with a reason, or removed as dead code."""
        counted = self.sites_found + self.sites_refused + self.sites_dead
        return self.capturable and self.sites_found is not None and counted == self.sites_expected

    @property
    def parity_ok(self) -> bool:
        return self.parity is not None and self.parity <= PARITY_TOL


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape:
        return math.inf
    scale = ref.abs().max().item() or 1.0
    err = (out.double() - ref.double()).abs().max().item() / scale
    return err if math.isfinite(err) else math.inf


def _run(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    torch.manual_seed(0)  # models drawing random numbers in eval (MAE masking) draw the same
    with torch.no_grad():
        return main_output(model(**inputs))


def check_model(built: Built, *, check_default_cache: bool = False) -> SweepResult:
    """Capture, count, compare, rewrite and run one built model (see the module docstring)."""
    import attnrewrite as ar
    from attnrewrite.passes.pipeline import Pipeline
    from attnrewrite.rewriter.capture import capture
    from attnrewrite.rewriter.rewrite import FIND_PASSES

    start = time.perf_counter()
    result = SweepResult(built.name, built.impl, "ok", notes=list(built.notes))
    model, example = built.model, built.inputs()
    counter = count_attention(model, example)
    result.sites_expected, result.softmax_calls = counter.sites, counter.softmax_calls
    try:
        program = capture(model, kwargs=example).program
    except Exception as exc:  # noqa: BLE001 - an uncapturable model is a fact, not a failure
        result.status, result.reason = "not capturable", _first_line(exc)
        result.seconds = time.perf_counter() - start
        return result
    if check_default_cache and built.cache_kwarg:
        result.default_cache = _default_cache(model, example)

    def failed(check: str, exc: BaseException) -> None:
        result.failures.append(f"{check}: {_first_line(exc)}")

    try:
        found = Pipeline(FIND_PASSES)(capture(program, kwargs=example).graph_module)
        sites = [m.site for m in found["find"].stats["matches"]]
        result.sites_found = len(sites)
        refused = refused_sites(counter.site_modules, [s.name for s in sites], found.diagnostics)
        result.sites_refused = len(refused)
        if refused:
            reasons = sorted({f"{r.module}: {r.reason}" for r in refused})
            result.notes.append(f"{len(refused)} refused with a reason: " + "; ".join(reasons))
        counted = result.sites_found + result.sites_refused
        # after the find pipeline's dead-code elimination
        in_graph = _graph_softmaxes(found.graph_module)
        if result.sites_expected > counted == in_graph:
            # Calls the run made whose results no output depends on: removed as dead code by
            # torch.export or before the search (the parity check shows the outputs do not
            # need them).
            result.sites_dead = result.sites_expected - in_graph
            result.notes.append(
                f"{result.sites_expected - in_graph} attention call(s) at run time are dead code "
                f"(no output depends on them); the {in_graph} left were all found or refused"
            )
        elif counted != result.sites_expected:
            result.failures.append(
                f"count: found {result.sites_found}"
                + (f" and refused {result.sites_refused}" if refused else "")
                + f", expected {result.sites_expected}"
            )
    except Exception as exc:  # noqa: BLE001
        failed("find_attention", exc)

    new_inputs, shape_note = _new_shape_inputs(built)
    try:
        exact = ar.rewrite(program, "softmax", kwargs=example, check=True)
        try:
            result.parity, result.parity_shape = _parity(
                exact, model, built, new_inputs, shape_note
            )
        except UndefinedOutput as why:
            result.status = "fail" if result.failures else MODEL_NAN
            result.reason = str(why)
            result.seconds = time.perf_counter() - start
            return result
        if not result.parity <= PARITY_TOL:
            skipped = [r.reason for r in exact.report.sites if r.status != "rewritten"]
            why = f" (skipped: {skipped[0][:80]})" if skipped else ""
            result.failures.append(
                f"parity: {result.parity:.2e} at {result.parity_shape}, "
                f"{len(exact.report.sites) - len(skipped)} sites rewritten{why}"
            )
    except Exception as exc:  # noqa: BLE001
        failed("softmax rewrite", exc)

    try:
        linear = ar.rewrite(program, "linear", kwargs=example)
        try:
            out = _run(linear, new_inputs)
        except ar.InputMismatchError:
            out = _run(linear, example)
        result.linear_ok = bool(torch.isfinite(out).all())
        if not result.linear_ok:
            result.failures.append("linear: output not finite")
    except Exception as exc:  # noqa: BLE001
        result.linear_ok = False
        failed("linear rewrite", exc)
    if result.failures:
        result.status = "fail"
    result.seconds = time.perf_counter() - start
    return result


def refused_sites(
    expected_modules: list[str], found_names: list[str], rejected: Iterable[Any]
) -> list[Any]:
    """The rejections that account for counted sites the finder did not take: per module, as
    many rejections made in that module (or a submodule, or the module holding it) as it has
    counted sites that were not found. A rejection elsewhere (a router, a pooling softmax) never
    stands in for a missing site."""
    missing = collections.Counter(expected_modules)
    missing.subtract(name.split("#")[0] for name in found_names)
    refused = []
    for rejection in rejected:
        for module, count in missing.items():
            if count > 0 and _same_module(rejection.module, module):
                missing[module] -= 1
                refused.append(rejection)
                break
    return refused


def _same_module(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _graph_softmaxes(graph_module: torch.fx.GraphModule) -> int:
    """Softmax and sdpa nodes in a graph (subgraphs of higher-order ops included)."""
    count = 0
    for module in graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                name = str(node.target) if node.op == "call_function" else ""
                count += "softmax" in name or "scaled_dot_product" in name
    return count


def _default_cache(model: nn.Module, example: dict[str, Any]) -> str:
    """Whether the model's default ``use_cache`` returns a cache object. torch.export cannot
    return ``Cache`` classes, so capture with the default needs ``use_cache=False`` (a cheap
    eager probe instead of a second capture)."""
    default = {k: v for k, v in example.items() if k != "use_cache"}
    try:
        with torch.no_grad():
            output = model(**default)
    except Exception as exc:  # noqa: BLE001
        return f"default raises {_first_line(exc)[:80]}"
    values = output.values() if hasattr(output, "values") else [output]
    caches = [type(v).__name__ for v in values if "Cache" in type(v).__name__]
    return f"returns {caches[0]}" if caches else "ok (no cache returned)"


def _new_shape_inputs(built: Built) -> tuple[dict[str, Any], str]:
    """Inputs at another batch size and (where the model takes one) length that the original
    model accepts; the note says which shape."""
    for length in _new_lengths(built.length):
        inputs = built.inputs(NEW_BATCH, length, seed=1)
        try:
            _run(built.model, inputs)
        except Exception:  # noqa: BLE001 - the model itself refuses this length: try another
            continue
        return inputs, f"batch {NEW_BATCH}" + (f", length {length}" if length else "")
    return built.inputs(EXAMPLE_BATCH, seed=1), "example shape (model refuses others)"


def _parity(
    exact: Any, model: nn.Module, built: Built, inputs: dict[str, Any], note: str
) -> tuple[float, str]:
    import attnrewrite as ar

    try:
        out = _run(exact, inputs)
    except ar.InputMismatchError:
        inputs, note = built.inputs(), "example shape (shape specialised)"
        out = _run(exact, inputs)
    ref = _run(model, inputs)
    if torch.isnan(ref).any() and any("mask" in k for k in inputs):
        # The model itself outputs NaN (a softmax over fully masked padded rows spreading): no
        # value to reproduce there. Compare where it is defined: the same inputs, no padding.
        inputs = {k: torch.ones_like(v) if "mask" in k else v for k, v in inputs.items()}
        out, ref = _run(exact, inputs), _run(model, inputs)
        note += ", without padding (the model's own output is NaN with it)"
    if torch.isnan(ref).all():
        raise UndefinedOutput(f"the model's own output is NaN everywhere at {note}")
    return _relative_error(out, ref), note


class UndefinedOutput(Exception):
    """The original model outputs only NaN at the sweep's inputs: there is nothing to compare."""


def sweep_hf(model_type: str, impl: str, *, check_default_cache: bool = False) -> SweepResult:
    """Build and check one Hugging Face model type; building trouble is a ``not buildable`` row."""
    start = time.perf_counter()
    try:
        built = build_hf(model_type, impl)
    except NotBuildable as exc:
        return SweepResult(
            model_type, impl, "not buildable", str(exc), seconds=time.perf_counter() - start
        )
    result = check_model(built, check_default_cache=check_default_cache)
    result.seconds = time.perf_counter() - start
    return result

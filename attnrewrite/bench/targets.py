"""Build a model and example inputs from a TARGET string (for the CLI and the benchmark workers).

A TARGET is one of three forms, tried in this order:

1. ``module:factory`` or ``path/to/file.py:factory`` — a callable taking no arguments and returning
   ``(model, args, kwargs)``, ``(model, kwargs_dict)`` or ``(model, args_tuple)``.
2. a local model directory — ``transformers.AutoModel.from_pretrained(path,
   local_files_only=True)``, with token inputs built from its config.
3. a Hugging Face model type (``bert``, ``gpt2``, ``llama``, ... any key of
   ``transformers.CONFIG_MAPPING``) — ``AutoConfig.for_model(name)`` shrunk to a tiny size
   (:data:`TINY_SIZES`: hidden 64, 2 layers, 4 heads, MLP 128, vocab 1024), random weights from
   ``torch.manual_seed(seed)``.

Nothing is downloaded: ``HF_HUB_OFFLINE=1`` is set before ``transformers`` is imported. A TARGET is
a plain string, so a benchmark worker process rebuilds the same model from it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnrewrite.errors import TargetError

#: Sizes of the tiny random Hugging Face models. Names not in a config are ignored; configs map
#: the common names (``hidden_size``, ``num_attention_heads``...) to theirs via ``attribute_map``.
TINY_SIZES: dict[str, int] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "head_dim": 16,
    "vocab_size": 1024,
    # Spellings of the same sizes that some families keep outside attribute_map.
    "n_inner": 128,
    "hidden_dim": 128,
    "d_ff": 128,
    "d_kv": 16,
    "num_decoder_layers": 2,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "image_size": 32,
    "patch_size": 4,
}
_POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_sequence_length")
_SPECIAL_TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")

FORMS_HELP = (
    "a TARGET is one of: 'module:factory' or 'file.py:factory' (a callable returning "
    "(model, args, kwargs) or (model, inputs_dict)); a local Hugging Face model directory; "
    "or a Hugging Face model type such as 'bert', 'gpt2', 'llama' (built tiny, random weights)"
)


@dataclasses.dataclass(frozen=True)
class TargetOptions:
    """How to build a TARGET's example inputs (and, for Hugging Face types, the model's size).

    Attributes:
        batch: example batch size (2 keeps the batch axis dynamic at capture).
        seq_len: example sequence length.
        max_length: the longest sequence the model must accept (sets position-embedding tables of
            tiny Hugging Face models); at least ``seq_len``.
        seed: seed of the random weights and inputs.
        attn_implementation: Hugging Face attention implementation (``"sdpa"`` or ``"eager"``).
        causal_lm: build Hugging Face model types and directories with their language-model head
            (``AutoModelForCausalLM``, which has ``generate``) rather than the bare ``AutoModel``.
    """

    batch: int = 2
    seq_len: int = 32
    max_length: int = 0
    seed: int = 0
    attn_implementation: str = "sdpa"
    causal_lm: bool = False


@dataclasses.dataclass(frozen=True)
class Target:
    """A model, its example inputs, and the string that rebuilds it in another process."""

    model: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    spec: str
    options: TargetOptions
    description: str


def load_target(spec: str, options: TargetOptions | None = None) -> Target:
    """Build the model named by ``spec`` (see the module docstring for the three forms).

    Raises:
        TargetError: ``spec`` matches none of the forms, or its factory returned something else.
    """
    options = options or TargetOptions()
    if not isinstance(spec, str) or not spec:
        raise TargetError(f"TARGET must be a non-empty string; {FORMS_HELP}")
    if os.path.isdir(spec):
        return _from_directory(spec, options)
    if ":" in spec:
        return _from_factory(spec, options)
    return _from_model_type(spec, options)


# -- module:factory ------------------------------------------------------------------------------


def _import_factory(spec: str) -> Any:
    module_name, _, attr = spec.rpartition(":")
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name).resolve()
        if not path.is_file():
            raise TargetError(f"TARGET '{spec}': no file {path}; {FORMS_HELP}")
        # A stable name, so the worker process that loads the same file gets the same classes.
        name = f"_attnrewrite_target_{path.stem}"
        module = sys.modules.get(name)
        if module is None or getattr(module, "__file__", None) != str(path):
            loader_spec = importlib.util.spec_from_file_location(name, path)
            assert loader_spec is not None and loader_spec.loader is not None
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # `python -m attnrewrite.cli` should see local modules
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise TargetError(
                f"TARGET '{spec}': cannot import module '{module_name}' ({exc}); check the name "
                f"and that it is importable from {os.getcwd()}; {FORMS_HELP}"
            ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise TargetError(
            f"TARGET '{spec}': '{module_name}' has no callable '{attr}'; {FORMS_HELP}"
        )
    return factory


def _from_factory(spec: str, options: TargetOptions) -> Target:
    factory = _import_factory(spec)
    torch.manual_seed(options.seed)
    built = factory()
    if not (isinstance(built, tuple) and len(built) in (2, 3) and isinstance(built[0], nn.Module)):
        raise TargetError(
            f"TARGET '{spec}': the factory returned {type(built).__name__}; it must return "
            "(model, args, kwargs), (model, inputs_dict) or (model, args_tuple)"
        )
    model = built[0]
    if len(built) == 3:
        args, kwargs = built[1], built[2]
    elif isinstance(built[1], dict):
        args, kwargs = (), built[1]
    else:
        args, kwargs = built[1], {}
    if isinstance(args, torch.Tensor):
        args = (args,)
    return Target(
        model.eval(),
        tuple(args or ()),
        dict(kwargs or {}),
        spec,
        options,
        f"{type(model).__name__} from {spec}",
    )


# -- Hugging Face ----------------------------------------------------------------------------------


def _transformers() -> Any:
    # Offline before the first import: huggingface_hub reads the variable at import time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:
        raise TargetError(
            "Hugging Face TARGETs need the `transformers` package: pip install transformers"
        ) from exc
    transformers.logging.set_verbosity_error()
    return transformers


def hf_model_types() -> list[str]:
    """The model types accepted as the third TARGET form."""
    return sorted(_transformers().CONFIG_MAPPING.keys())


def tiny_config(model_type: str, max_length: int = 0) -> Any:
    """A tiny config of ``model_type`` (see :data:`TINY_SIZES`)."""
    config = _transformers().AutoConfig.for_model(model_type)
    for key, value in TINY_SIZES.items():
        if hasattr(config, key):
            setattr(config, key, value)
    for key in _POSITION_LIMITS:
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, max(max_length, 128))
    vocab = getattr(config, "vocab_size", None)
    for key in _SPECIAL_TOKENS:
        value = getattr(config, key, None)
        if isinstance(vocab, int) and isinstance(value, int) and value >= vocab:
            setattr(config, key, vocab - 1)  # keep special ids inside the shrunk embedding
    return config


def _auto_class(transformers: Any, options: TargetOptions) -> Any:
    return transformers.AutoModelForCausalLM if options.causal_lm else transformers.AutoModel


def _from_model_type(name: str, options: TargetOptions) -> Target:
    transformers = _transformers()
    model_type = name.lower()
    if model_type not in transformers.CONFIG_MAPPING:
        raise TargetError(
            f"unknown TARGET '{name}': not a directory, not 'module:factory' and not a Hugging "
            f"Face model type; {FORMS_HELP} (the model types are the keys of "
            "transformers.CONFIG_MAPPING)"
        )
    max_length = max(options.max_length, options.seq_len)
    config = tiny_config(model_type, max_length)
    torch.manual_seed(options.seed)
    try:
        model = _auto_class(transformers, options).from_config(
            config, attn_implementation=options.attn_implementation
        )
    except Exception as exc:  # noqa: BLE001 - transformers raises many types here
        raise TargetError(
            f"TARGET '{name}': transformers could not build a tiny random {model_type} model "
            f"({type(exc).__name__}: {exc}); use the 'module:factory' form with your own builder"
        ) from exc
    kwargs = hf_inputs(model, options)
    return Target(
        model.eval(),
        (),
        kwargs,
        name,
        options,
        f"tiny random {type(model).__name__} (hidden 64, 2 layers, 4 heads)",
    )


def _from_directory(path: str, options: TargetOptions) -> Target:
    transformers = _transformers()
    torch.manual_seed(options.seed)
    try:
        model = _auto_class(transformers, options).from_pretrained(
            path, local_files_only=True, attn_implementation=options.attn_implementation
        )
    except Exception as exc:  # noqa: BLE001
        raise TargetError(
            f"TARGET '{path}' is a directory but not a loadable Hugging Face model "
            f"({type(exc).__name__}: {exc}); it needs config.json and weights; {FORMS_HELP}"
        ) from exc
    return Target(
        model.eval(),
        (),
        hf_inputs(model, options),
        path,
        options,
        f"{type(model).__name__} from {path}",
    )


def hf_inputs(model: nn.Module, options: TargetOptions) -> dict[str, Any]:
    """Random example inputs for a Hugging Face model, shaped from its config."""
    config = model.config
    g = torch.Generator().manual_seed(options.seed)
    batch, length = options.batch, options.seq_len
    main = getattr(model, "main_input_name", "input_ids")
    kwargs: dict[str, Any] = {}
    if main == "pixel_values":
        size = getattr(config, "image_size", 32)
        channels = getattr(config, "num_channels", 3)
        kwargs["pixel_values"] = torch.randn(batch, channels, size, size, generator=g)
        return kwargs
    if main != "input_ids":
        raise TargetError(
            f"{type(model).__name__} takes '{main}' as its main input; only token and image models "
            "are built automatically. Use the 'module:factory' TARGET form to supply inputs"
        )
    vocab = int(getattr(config, "vocab_size", 1024))
    low = min(3, vocab - 1)  # skip the usual pad/bos/eos ids
    kwargs["input_ids"] = torch.randint(low, vocab, (batch, length), generator=g)
    kwargs["attention_mask"] = torch.ones(batch, length, dtype=torch.long)
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = torch.randint(low, vocab, (batch, length), generator=g)
    if getattr(config, "use_cache", False):
        kwargs["use_cache"] = False  # a cache object is not an exportable output
    return kwargs

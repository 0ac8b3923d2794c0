"""How a request decodes (`Decoding`) and what one step of it feeds (`StepPlan`).

A step feeds, after the sequence's cached prefix, `[uncomputed committed tokens | drafts | MASK rows]`:
AR is the case with no drafts and no MASK rows. Logits are needed for the last K + 1 + M rows (K drafts,
M MASKs): row i predicts token i + 1, so those rows give p for each draft, the next token, and q for the
new drafts. A prefill chunk (the prompt is longer than the step's token budget) feeds committed tokens
only and needs no logits.

`lora` says where an adapter acts: "none" (base model only), "all" (every row: an adapter-converted
model), "gated" (MASK rows only: R-ISD, every kept KV entry and every p is the base model's).
"""
from __future__ import annotations

from dataclasses import dataclass

LORA_MODES = ("none", "all", "gated")
DRAFTING_MODES = ("exact", "argmax")
MAX_STRIDE = 16
MAX_TREE = 8


@dataclass(frozen=True)
class StepPlan:
    """Rows to feed after the cached prefix, in KV-slot order (row r's k/v goes to slot num_computed + r).

    `num_logits`: logits are needed for rows [logit_start, logit_start + num_logits); `lora_gate[r]` = 1 where an
    adapter delta applies. A plain plan is causal with positions num_computed + r. A plan with alternatives
    or branches also has, per row, its RoPE `offsets` (position = num_computed + offset; those rows repeat
    positions of the main block) and its attention: row r sees the cached prefix, rows [0, lead[r]) and rows
    [run_start[r], r] (a causal row: lead = run_start = r). Rows from `hidden_start` on (alternatives, then
    branches) come back as hidden states: the decoder computes logits only for the ones it uses.
    """

    token_ids: list[int]
    lora_gate: list[int]
    num_logits: int
    logit_start: int = -1  # default: the last num_logits rows
    offsets: list[int] | None = None
    lead: list[int] | None = None
    run_start: list[int] | None = None
    hidden_start: int = -1  # first row returned as hidden states (alternatives, then branches), -1 = none
    hidden_end: int = -1  # end (exclusive) of those rows, -1 = the last row (padding rows come after it)

    @property
    def first_logit(self) -> int:
        return len(self.token_ids) - self.num_logits if self.logit_start < 0 else self.logit_start


@dataclass(frozen=True)
class Decoding:
    """One request's decoding: `ar`, `isd` or `risd` at stride N (tokens a verify round can commit).

    Verification options follow the official release (see docs/architecture.md); all but the defaults
    are lossy: `fast_verify` (accept drafts in the top-k logits), `confidence_accept_threshold`,
    `verify_alpha` < 1, `verify_num_specs` < N - 1 (later drafts accepted untested), `argmax` drafting
    under sampling.
    """

    name: str = "ar"
    stride: int = 1
    lora: str = "none"
    drafting: str = "exact"
    verify_alpha: float = 1.0
    fast_verify: bool = False
    fast_verify_topk: int = 5
    confidence_accept_threshold: float = 0.0
    verify_num_specs: int | None = None
    # Drafts ready after a rejection at draft j < branches (None: every j). Off by default: measured on a
    # 2-core CPU (docs/architecture.md), the extra rows cost more time than the cold rounds they save.
    branches: int | None = 0
    # Candidates at the first draft position (1: the draft alone); the others are verified after it by the
    # exact multi-candidate rule (decoder.py). Off by default: each candidate is one more row.
    tree: int = 1

    def __post_init__(self) -> None:
        if self.name not in ("ar", "isd", "risd"):
            raise ValueError(f"unknown decoding {self.name!r}; choose ar, isd or risd")
        if self.name == "ar":
            if self.stride != 1:
                raise ValueError("ar decodes one token per step (stride 1)")
        elif not 2 <= self.stride <= MAX_STRIDE:
            raise ValueError(f"stride must be between 2 and {MAX_STRIDE}, got {self.stride}")
        if self.lora not in LORA_MODES:
            raise ValueError(f"lora must be one of {LORA_MODES}, got {self.lora!r}")
        if self.lora == "gated" and self.name != "risd":
            raise ValueError("a gated adapter acts on MASK rows: only risd has them")
        if self.drafting not in DRAFTING_MODES:
            raise ValueError(f"drafting must be one of {DRAFTING_MODES}, got {self.drafting!r}")
        if self.fast_verify_topk < 1:
            raise ValueError("fast_verify_topk must be >= 1")
        if not 0.0 <= self.confidence_accept_threshold <= 1.0:
            raise ValueError("confidence_accept_threshold must be in [0, 1]")
        if self.verify_num_specs is not None and self.verify_num_specs < 0:
            raise ValueError("verify_num_specs must be >= 0")
        if self.branches is not None and self.branches < 0:
            raise ValueError("branches must be >= 0")
        if not 1 <= self.tree <= MAX_TREE:
            raise ValueError(f"tree must be between 1 and {MAX_TREE} candidates, got {self.tree}")
        if self.tree > 1 and self.name == "ar":
            raise ValueError("a tree of first-draft candidates needs drafts: isd or risd")
        if self.tree > 1 and not self.lossless:
            raise ValueError("the tree of first-draft candidates needs exact verification (exact drafting, "
                             "verify_alpha 1, no fast_verify / confidence threshold / verify_num_specs)")

    @property
    def label(self) -> str:
        """Short name for stats: `ar`, `risd4`, `risd4+b3` (branches at the first 3 draft positions)."""
        if self.name == "ar":
            return "ar"
        b = self.num_branches(self.num_masks)
        return f"{self.name}{self.stride}" + (f"+b{b}" if b else "") + (f"+t{self.tree}" if self.tree > 1 else "")

    @property
    def lossless(self) -> bool:
        """Commits tokens distributed exactly as AR with the same KV (greedy: the same tokens): exact drafting,
        alpha = 1 and every draft verified by the exact rule."""
        return self.name == "ar" or (
            self.drafting == "exact" and self.verify_alpha == 1.0 and not self.fast_verify
            and self.confidence_accept_threshold == 0.0 and self.num_verified == self.num_masks)

    @property
    def num_masks(self) -> int:
        """MASK rows per step (N - 1): the new drafts."""
        return self.stride - 1

    @property
    def num_verified(self) -> int:
        """Drafts tested per verify round; later ones are accepted untested."""
        k = self.num_masks if self.verify_num_specs is None else self.verify_num_specs
        return max(0, min(self.num_masks, k))

    @property
    def kv_salt(self) -> int:
        """What the KV of committed tokens depends on beyond the tokens: 1 when the adapter acts on them."""
        return int(self.lora == "all")

    def num_branches(self, num_drafts: int) -> int:
        """Branches a verify step of `num_drafts` drafts feeds: one per shorter accepted prefix j < branches."""
        return num_drafts if self.branches is None else min(num_drafts, self.branches)

    @property
    def max_step_rows(self) -> int:
        """Rows a step can feed beyond its first committed token (drafts, MASK rows, alternatives, branches)."""
        return 2 * self.num_masks + self.tree - 1 + self.num_branches(self.num_masks) * self.num_masks

    @property
    def stationary_rows(self) -> int:
        """Rows of this layout's widest decode step (one committed token, all drafts, alternatives and
        branches): what every step feeds in the stationary-batch mode, cold rounds padded up to it."""
        return self.step_rows(1, self.num_masks, self.tree - 1)

    def step_rows(self, num_uncomputed: int, num_drafts: int, num_alternatives: int = 0) -> int:
        alternatives = num_alternatives if num_drafts else 0
        return num_uncomputed + num_drafts + alternatives + self.num_masks * (1 + self.num_branches(num_drafts))

    def plan(self, uncomputed: list[int], drafts: list[int], mask_token_id: int,
             alternatives: list[int] | tuple[int, ...] = (), pad_to: int = 0) -> StepPlan:
        """The full step: the uncomputed committed tokens, the drafts, the MASK rows, the alternatives, then the
        branches; then padding rows up to `pad_to` rows (the stationary-batch mode).

        An alternative is another candidate for the first draft's position: one row holding it, which sees the
        prefix and the anchor; its logits (p after it) are needed only when it is accepted.

        Branch j (the first j drafts accepted, draft j + 1 rejected) is N - 1 MASK rows whose first sits at
        draft j + 1's position, where the correction goes; it sees the prefix, the anchor, drafts 1..j and its
        own earlier rows, and drafts the N - 1 tokens after the correction, so a rejection needs no cold start.
        """
        if not uncomputed:
            raise ValueError("a step feeds at least one committed token (its row predicts the next one)")
        c, k, m = len(uncomputed), len(drafts), self.num_masks
        committed_gate = 1 if self.lora == "all" else 0
        mask_gate = 1 if self.lora in ("all", "gated") else 0
        main = c + k + m
        a = len(alternatives) if k else 0
        tokens = uncomputed + drafts + [mask_token_id] * m + list(alternatives[:a])
        gate = [committed_gate] * (c + k) + [mask_gate] * m + [committed_gate] * a
        nb = self.num_branches(k) if m else 0
        if not nb and not a:
            pad = max(0, pad_to - len(tokens))  # causal rows after every real row: they change none of them
            return StepPlan(tokens + [mask_token_id] * pad, gate + [0] * pad, k + 1 + m, logit_start=c - 1)
        rows = list(range(main + a))
        offsets, lead, run_start = list(range(main)) + [c] * a, list(range(main)) + [c] * a, rows
        for j in range(nb):
            first = main + a + j * m
            offsets += [c + j + i for i in range(m)]
            lead += [c + j] * m
            run_start += [first] * m
        tokens, gate = tokens + [mask_token_id] * (nb * m), gate + [mask_gate] * (nb * m)
        end = len(tokens)
        for r in range(end, pad_to):  # padding rows that see the prefix and themselves only
            offsets.append(main + r)
            lead.append(0)
            run_start.append(r)
            tokens.append(mask_token_id)
            gate.append(0)
        return StepPlan(tokens, gate, k + 1 + m, logit_start=c - 1, offsets=offsets, lead=lead, run_start=run_start,
                        hidden_start=main, hidden_end=end if end < len(tokens) else -1)

    def layouts(self, mask_token_id: int) -> dict[str, StepPlan]:
        """The step plans of one sequence (one committed token to feed): AR's, or its cold and verify rounds'."""
        if self.num_masks == 0:
            return {"ar": self.plan([1], [], mask_token_id)}
        return {"cold": self.plan([1], [], mask_token_id),
                "verify": self.plan([1], [2] * self.num_masks, mask_token_id, [3] * (self.tree - 1))}

    def chunk(self, tokens: list[int]) -> StepPlan:
        """A prefill chunk: committed tokens only, no logits."""
        return StepPlan(list(tokens), [1 if self.lora == "all" else 0] * len(tokens), 0)

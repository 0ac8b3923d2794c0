"""The scheduler with fake steps (no model): admission order, token budget and chunked prefill, preemption
order and what a preempted request keeps, prefix-cache hits, ISD rollback, free counts."""
from __future__ import annotations

from idlm.decoding.policy import Decoding
from idlm.decoding.sampling import SamplingParams
from idlm.engine.block_manager import BlockManager
from idlm.engine.scheduler import Scheduler
from idlm.engine.sequence import Sequence, Status


class Tok:
    def decode(self, ids, skip_special_tokens=True):  # noqa: ARG002
        return "".join(chr(65 + i % 26) for i in ids)


AR = Decoding()
_ids = iter(range(10**6))


def seq(prompt_len: int, max_tokens: int = 50, decoding: Decoding = AR, first: int = 0) -> Sequence:
    return Sequence(next(_ids), list(range(first, first + prompt_len)), SamplingParams(temperature=0, max_tokens=max_tokens,
                    ignore_eos=True), decoding, 0, Tok(), [])


def fake_step(s: Scheduler, token: int = 7, accepted: int = 0):
    """One step: every full step commits `accepted` drafts (ISD) and one token; returns {seq_id: (rows, chunk)}."""
    step = s.schedule()
    kept = []
    for sch in step:
        q = sch.seq
        if sch.chunk:
            kept.append(sch.num_rows)
            continue
        k = min(accepted, len(q.drafts))
        kept.append(q.num_uncomputed + k)
        q.emit(q.drafts[:k] + [token])
        q.drafts = [token] * q.decoding.num_masks if k == len(q.drafts) else []
    s.postprocess(step, kept)
    return {sch.seq.seq_id: (sch.num_rows, sch.chunk) for sch in step}


def test_fifo_admission_bounded_by_max_num_seqs():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    a, b, c = seq(5), seq(6, first=100), seq(7, first=200)
    for q in (a, b, c):
        s.add(q)
    rows = fake_step(s)
    assert rows == {a.seq_id: (5, False), b.seq_id: (6, False)} and list(s.waiting) == [c]
    a.finish_reason = "stop"  # a finishes in this step: c joins the next one (continuous batching)
    fake_step(s)
    assert a.finished and a.slot is None and c.status is Status.WAITING
    assert fake_step(s) == {b.seq_id: (1, False), c.seq_id: (7, False)}
    assert fake_step(s) == {b.seq_id: (1, False), c.seq_id: (1, False)}


def test_token_budget_chunks_prefill_beside_decodes():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=10)
    d = seq(3)
    s.add(d)
    fake_step(s)  # d decodes from now on: 1 row per step
    long = seq(25, first=500)
    s.add(long)
    assert fake_step(s) == {d.seq_id: (1, False), long.seq_id: (9, True)}
    assert long.num_computed_tokens == 9 and long.num_output_tokens == 0
    assert fake_step(s) == {d.seq_id: (1, False), long.seq_id: (9, True)}
    # 7 prompt tokens left: the full step (7 rows) fits
    assert fake_step(s) == {d.seq_id: (1, False), long.seq_id: (7, False)}
    assert long.num_output_tokens == 1 and long.num_computed_tokens == 25
    # an ISD step counts its drafts and MASK rows: 1 + 3 + 3 = 7 of the 10
    isd = seq(4, decoding=Decoding("isd", 4, branches=0), first=900)
    s.add(isd)
    fake_step(s)
    assert isd.drafts == [7, 7, 7]
    rows = fake_step(s)
    assert rows[isd.seq_id] == (7, False) and sum(r for r, _ in rows.values()) <= 10


def test_preemption_takes_the_newest_and_keeps_its_state():
    bm = BlockManager(6, 4)  # 24 tokens of KV
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    old, new = seq(8, decoding=Decoding("isd", 3, branches=0)), seq(8, decoding=Decoding("isd", 3, branches=0),
                                                                     first=100)
    s.add(old)
    s.add(new)
    fake_step(s, accepted=2)  # both prefilled; each step of theirs needs 5 more rows
    assert bm.num_free_blocks == 2
    drafts, out = list(new.drafts), new.output_ids
    fake_step(s, accepted=2)  # old grows into the last free blocks; new cannot: preempted
    assert new.status is Status.WAITING and s.waiting[0] is new and new.stats.preemptions == 1
    assert new.num_computed_tokens == 0 and new.block_table == [] and new.slot is not None
    assert new.drafts == drafts and new.output_ids == out  # committed tokens and drafts kept
    # the old one runs on; once it finishes the preempted one resumes from its committed tokens
    old.finish_reason = "stop"
    fake_step(s)
    rows = fake_step(s)
    # its freed blocks were still in the prefix cache: only the last committed token, drafts and MASKs run
    assert rows[new.seq_id] == (1 + 2 + 2, False) and new.stats.cached_tokens == 8
    assert new.status is Status.RUNNING and new.num_output_tokens == len(out) + 1


def test_prefix_cache_hit_skips_prompt_blocks_and_salt_separates_kv():
    bm = BlockManager(64, 4)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    a = seq(18)
    s.add(a)
    fake_step(s)
    b = seq(18)  # same 18 tokens: 4 full blocks cached (16 tokens), the 2 others recomputed
    s.add(b)
    rows = fake_step(s)
    assert rows[b.seq_id] == (2, False) and b.stats.cached_tokens == 16
    assert b.block_table[:4] == a.block_table[:4]
    c = seq(18, decoding=Decoding("isd", 2, "all"))  # adapter KV on every row: different KV, no hit
    s.add(c)
    assert fake_step(s)[c.seq_id] == (18 + 1, False) and c.stats.cached_tokens == 0


def test_isd_rollback_and_blocks_all_return():
    bm = BlockManager(64, 4)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    q = seq(6, decoding=Decoding("isd", 4, branches=None))  # with a branch per draft: 3 x 3 more MASK rows per verify step
    s.add(q)
    fake_step(s)  # 6 prompt rows + 3 MASK rows fed; the prompt kept
    assert q.num_computed_tokens == 6 and len(q.block_table) == 2
    assert fake_step(s, accepted=1)[q.seq_id] == (1 + 3 + 3 + 9, False)  # clean + 1 draft kept
    assert q.num_computed_tokens == 8 and len(q.block_table) == 2
    fake_step(s, accepted=0)
    assert q.num_computed_tokens == 9 and len(q.block_table) == 3  # rollback crossed into a new block
    s.abort(q)
    assert q.finished and q.finish_reason == "abort" and bm.num_free_blocks == 64 and not s.has_unfinished()

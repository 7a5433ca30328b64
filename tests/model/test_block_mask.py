"""The document block mask is built from document boundaries per tile: the same mask FlexAttention's
`create_block_mask` makes from the element-wise rule, without ever holding S × S."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import _ordered_to_dense, create_block_mask, create_mask

from conftest import REPO_ROOT, tiny_model
from ouro_train.model.attention import document_block_mask, document_ids


def packed_doc_ids(lengths_per_row) -> torch.Tensor:
    return document_ids(torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row]))


def elementwise_block_mask(doc_ids: torch.Tensor, block_size: int):
    """The reference: FlexAttention evaluates the causal document rule on every (query, key) pair."""
    def doc_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    batch, seq = doc_ids.shape
    return create_block_mask(doc_causal, batch, None, seq, seq, device="cpu", BLOCK_SIZE=block_size)


ROWS = {  # (block size, per-row document lengths): aligned and unaligned boundaries, ragged last blocks
    "one document per tile row": (16, [[32, 32], [16, 48]]),
    "boundaries inside tiles": (16, [[5, 40, 19], [1, 1, 62]]),
    "ragged last block": (16, [[20, 30, 27], [77, 0]]),
    "shorter than a block": (16, [[3, 4], [6, 1]]),
    "default tile": (128, [[100, 200, 300, 57], [129, 127, 1, 400]]),
}


@pytest.mark.parametrize("name", ROWS)
def test_block_mask_equals_the_elementwise_one(name):
    block_size, lengths = ROWS[name]
    doc_ids = packed_doc_ids([[n for n in row if n] for row in lengths])
    got, ref = document_block_mask(doc_ids, block_size), elementwise_block_mask(doc_ids, block_size)
    assert got.seq_lengths == ref.seq_lengths and got.BLOCK_SIZE == ref.BLOCK_SIZE
    columns = ref.kv_indices.shape[-1]
    for table in ("kv", "full_kv", "q", "full_q"):  # partial and full tiles, by query row and by key column
        got_num, ref_num = getattr(got, f"{table}_num_blocks"), getattr(ref, f"{table}_num_blocks")
        assert torch.equal(got_num, ref_num), table
        got_tiles = _ordered_to_dense(got_num, getattr(got, f"{table}_indices"), columns)
        assert torch.equal(got_tiles, _ordered_to_dense(ref_num, getattr(ref, f"{table}_indices"), columns)), table
    batch, seq = doc_ids.shape
    dense = create_mask(got.mask_mod, batch, None, seq, seq, device="cpu")
    assert torch.equal(dense, create_mask(ref.mask_mod, batch, None, seq, seq, device="cpu"))
    # The mask_mod also answers for the padded tail of the last tile, which FlexAttention may ask about.
    padded = got.kv_indices.shape[-1] * block_size
    tail = torch.arange(seq, padded)
    assert not got.mask_mod(torch.tensor(0), torch.tensor(0), tail, torch.tensor(0)).any()


def test_flex_attention_with_it_equals_the_elementwise_mask():
    doc_ids = packed_doc_ids([[9, 30, 25]])
    q, k, v = torch.randn(3, 1, 2, 64, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    from torch.nn.attention.flex_attention import flex_attention

    got = flex_attention(q, k, v, block_mask=document_block_mask(doc_ids, 16))
    allowed = create_mask(elementwise_block_mask(doc_ids, 16).mask_mod, 1, None, 64, 64, device="cpu")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


# Runs alone in a fresh process: the rise of the process's peak resident set (VmHWM, reset to the
# current resident set just before the build) bounds every allocation of the build: the tensors torch
# allocates and the kernels' own scratch. (getrusage's maxrss would not do: a child inherits its
# parent's peak.)
PEAK_SCRIPT = """
import torch
from ouro_train.model.attention import document_block_mask, document_ids
def row(seq):
    return document_ids(torch.cat([torch.arange(n) for n in (seq // 4, seq // 2 - 3, seq - seq // 4 - seq // 2 + 3)])[None])
def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))
document_block_mask(row(1000))  # load the code paths first
doc_ids = row({seq})
open("/proc/self/clear_refs", "w").write("5")  # peak resident set := the current one
resident = kib("VmRSS")
mask = document_block_mask(doc_ids)
print((kib("VmHWM") - resident) / 1024)
"""


def test_building_the_64k_mask_peaks_under_64_mib():
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("reads the resident set from /proc")
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT.format(seq=65536)], capture_output=True, text=True,
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    peak_mib = float(proc.stdout.split()[-1])
    # The element-wise mask at 64K holds 4 Gi booleans (4 GiB) before any reduction.
    assert peak_mib <= 64, f"building the 64K document block mask peaked at {peak_mib:.1f} MiB"


def test_the_memory_estimate_holds_the_mask_of_the_whole_row(monkeypatch):
    from conftest import tiny_config
    from ouro_train.config import DeepSpeedConfig
    from ouro_train.model.attention import document_block_mask_bytes
    from ouro_train.train import memory

    doc_ids = packed_doc_ids([[100, 200, 300, 57]] * 2)
    mask = document_block_mask(doc_ids)
    held = [mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices, mask.q_num_blocks,
            mask.q_indices, mask.full_q_num_blocks, mask.full_q_indices]
    held += [cell.cell_contents for cell in mask.mask_mod.__closure__ if isinstance(cell.cell_contents, torch.Tensor)]
    assert document_block_mask_bytes(2, 657) == sum(t.untyped_storage().nbytes() for t in held)
    # Every rank of a sequence-parallel group holds the mask of the whole row, above the traced activations.
    monkeypatch.setattr(memory, "trace_step", lambda *args, **kwargs: memory.StepTrace(0, 0.0))
    shape = memory.StepShape(seq_len=65536, micro_batch_size=2, sequence_parallel=4)
    estimate = memory.step_memory(tiny_config(), shape, DeepSpeedConfig(zero_stage=2), world_size=4)
    assert estimate["activations"] == document_block_mask_bytes(2, 65536)


def _sequence_parallel_rank(rank: int, size: int, store_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from ouro_train.model.sequence_parallel import SequenceParallel

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=size)
    try:
        ids, positions = sequence_parallel_row()
        model = tiny_model(seed=5, attn_implementation="flex_attention")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FlexAttention warns when it runs uncompiled on CPU
            out = model(ids, position_ids=positions, use_cache=False, compute_logits=False,
                        sequence_parallel=SequenceParallel(dist.group.WORLD, rank, size))
        torch.save(torch.stack(out.step_hidden_states), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def sequence_parallel_row():
    """One row of 3 documents, the middle one across the two shards' boundary (at token 32)."""
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(7))
    return ids, torch.cat([torch.arange(n) for n in (9, 40, 15)])[None]


def test_sequence_parallel_ranks_attend_under_the_whole_rows_block_mask(tmp_path):
    # Each of 2 ranks holds 32 tokens, exchanges q, k, v for half the heads and attends over all 64
    # tokens under the row's block mask: together they give the single-process forward.
    torch.multiprocessing.spawn(_sequence_parallel_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ids, positions = sequence_parallel_row()
    model = tiny_model(seed=5, attn_implementation="flex_attention")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.stack(model(ids, position_ids=positions, use_cache=False, compute_logits=False).step_hidden_states)
    shards = torch.cat([torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)], dim=2)
    torch.testing.assert_close(shards, ref, rtol=1e-5, atol=1e-5)

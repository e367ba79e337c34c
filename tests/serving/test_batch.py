"""A step's buffer (dsjax.serving.batch) taken apart on the device gives back what the host
meant: each request's sampling values as dsjax.settings.sampling_rows makes them, its tokens,
positions, slots and block table, and filler rows that are greedy."""

import dataclasses

import numpy as np

from dsjax import settings as st
from dsjax.serving import batch
from dsjax.serving.scheduler import PENDING, Chunk, Sequence


def test_buffer_round_trip():
    defaults = st.Defaults({}, [7])
    sampled = defaults.resolve(dict(do_sample=True, temperature=0.7, top_k=30, top_p=0.85,
                                    min_p=0.05, min_new_tokens=3,
                                    eos_token_id=list(range(100, 111))))  # 11 ids: 16 columns
    greedy = defaults.resolve({})
    a = Sequence("a", [5, 6, 7, 8, 9], 8, order=0, blocks=[3, 1], computed=0)
    b = Sequence("b", [1, 2], 8, order=1, out=[4, PENDING], blocks=[2], computed=3,
                 pending_row=6)
    chunks = [Chunk.of(a, 5), Chunk.of(b, 1)]
    records = [batch.request_record(sampled, 5, 0xFFFFFFF0), batch.request_record(greedy, 2, 9)]
    fill = batch.request_record(dataclasses.replace(greedy, eos_token_id=()), 0, 0)
    layout = batch.Layout(8, 4, batch.eos_columns(records), 6)
    assert layout.eos == 16
    buf = batch.pack(chunks, records, fill, layout, block_size=4)
    assert buf.shape == (layout.size,) and buf.dtype == np.int32
    got = batch.unpack(buf, layout)

    np.testing.assert_array_equal(got.tokens, [5, 6, 7, 8, 9, 0, 0, 0])  # b's pending: 0
    np.testing.assert_array_equal(got.from_prev, [-1] * 5 + [6, -1, -1])
    np.testing.assert_array_equal(got.positions, [0, 1, 2, 3, 4, 3, 0, 0])
    np.testing.assert_array_equal(got.meta.slots, [12, 13, 14, 15, 4, 11, -1, -1])
    np.testing.assert_array_equal(got.meta.token_seq[:6], [0] * 5 + [1])
    np.testing.assert_array_equal(got.meta.block_tables[:2], [[3, 1, 0, 0, 0, 0],
                                                              [2, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(got.sample_at[:2], [4, 5])
    np.testing.assert_array_equal(got.new_tokens[:2], [0, 2])
    np.testing.assert_array_equal(got.seeds[:2], np.asarray([0xFFFFFFF0, 9], np.uint32))

    want = st.sampling_rows([sampled, greedy, greedy, greedy], 4, [5, 2, 0, 0])
    for name in ("do_sample", "temperature", "top_k", "top_p", "min_p", "min_new"):
        np.testing.assert_array_equal(getattr(got.sampling, name), getattr(want, name), name)
    eos = np.asarray(got.sampling.eos)
    assert eos.shape == (4, 16)
    np.testing.assert_array_equal(eos[0, :11], list(range(100, 111)))
    assert (eos[0, 11:] == -1).all() and list(eos[1, :2]) == [7, -1]
    assert (eos[2:] == -1).all()  # filler rows: greedy, no EOS, nothing to mask

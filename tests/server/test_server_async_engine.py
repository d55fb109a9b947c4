"""RequestStream: chunks that wait for a slow reader are merged without losing or reordering anything."""

from __future__ import annotations

import asyncio

import pytest

from pagedserve.runtime.async_engine import EngineDeadError
from pagedserve.runtime.outputs import Logprob
from pagedserve.runtime.request_stream import ChoiceDelta, RequestChunk, RequestStream, merge_chunks


class _FakeEngine:
    def __init__(self):
        self.aborted, self.forgotten = [], []

    def abort(self, rid):
        self.aborted.append(rid)

    def _forget(self, stream):
        self.forgotten.append(stream.request_id)


def _chunk(*choices, finished=False):
    return RequestChunk("r", list(choices), finished, 5, 0)


def test_merge_concatenates_per_choice_in_order():
    lp = [{1: Logprob(-0.1, 1)}]
    a = _chunk(ChoiceDelta(0, "ab", [1], lp), ChoiceDelta(1, "x", [7], lp))
    b = _chunk(ChoiceDelta(1, "y", [8], lp, "length"), ChoiceDelta(0, "c", [2], lp))
    c = _chunk(ChoiceDelta(0, "d", [3], lp, "stop", "d"), finished=True)
    m = merge_chunks(merge_chunks(a, b), c)
    assert m.finished
    assert [(d.index, d.text, d.token_ids, len(d.logprobs), d.finish_reason, d.stop_reason) for d in m.choices] == [
        (0, "abcd", [1, 2, 3], 3, "stop", "d"), (1, "xy", [7, 8], 2, "length", None)]
    plain = merge_chunks(_chunk(ChoiceDelta(0, "a", [1])), _chunk(ChoiceDelta(0, "b", [2])))
    assert plain.choices[0].logprobs is None


def test_a_slow_reader_gets_merged_chunks_but_never_past_an_error():
    async def scenario():
        engine = _FakeEngine()
        s = RequestStream(engine, "r", 5)
        for i in range(3):
            s._put(_chunk(ChoiceDelta(0, str(i), [i])))
        s._put(EngineDeadError("gone"))
        first = await s.__anext__()
        assert first.choices[0].text == "012" and first.choices[0].token_ids == [0, 1, 2]
        with pytest.raises(EngineDeadError):
            await s.__anext__()
        assert s.finished and engine.forgotten == ["r"]
        s.close()
        assert engine.aborted == []  # it had ended: nothing to abort

        s2 = RequestStream(engine, "r2", 5)
        s2._put(_chunk(ChoiceDelta(0, "a", [1]), finished=True))
        s2._put(_chunk(ChoiceDelta(0, "late", [2])))  # nothing after the last chunk is read
        assert (await s2.__anext__()).choices[0].text == "a"
        with pytest.raises(StopAsyncIteration):
            await s2.__anext__()

        s3 = RequestStream(engine, "r3", 5)
        s3.close()
        assert engine.aborted == ["r3"]

    asyncio.run(scenario())

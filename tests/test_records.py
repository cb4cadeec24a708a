"""The event file's records: numpy's CRC-32C against TensorBoard's own, and the records on disk."""

from __future__ import annotations

import glob
import struct

import pytest
from helpers import reference_data, reference_loop, reference_model, watch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tensorboards

from gradwatch.sinks import records


@pytest.fixture(scope="module", autouse=True)
def tables():
    records._tables = records._tables or records._Tables()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3 * records.CHUNK + 7))
def test_the_checksum_is_tensorboards(data):
    assert records.masked_crc32c(data) == tensorboards(data)


@pytest.mark.parametrize("size", [0, 3, 4, records.SMALL, records.CHUNK, records.CHUNK + 3, records.CHUNK + 4])
def test_the_checksum_is_tensorboards_at_the_chunk_edges(size):
    data = bytes((7 * k + 3) % 256 for k in range(size))
    assert records.masked_crc32c(data) == tensorboards(data)


def _records(path):
    """(data, its stored checksum, the stored checksum of its length header) of each record of a TFRecord file."""
    out = []
    with open(path, "rb") as f:
        content = f.read()
    at = 0
    while at < len(content):
        header = content[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", content[at + 8 : at + 12])
        data = content[at + 12 : at + 12 + length]
        (data_crc,) = struct.unpack("<I", content[at + 12 + length : at + 16 + length])
        out.append((header, header_crc, data, data_crc))
        at += 16 + length
    return out


def test_the_sinks_event_file_holds_tensorboards_checksums(tmp_path, monkeypatch):
    installed = []

    def fast_records(writer):
        installed.append(records.fast_records(writer))
        return installed[-1]

    monkeypatch.setattr("gradwatch.sinks.tensorboard.fast_records", fast_records)
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=2, logdir=tmp_path, on_finding="record"):
        reference_loop(model, opt, reference_data(), zero_grad=False)  # a finding: the findings table, a text event
    assert [type(stream) for stream in installed] == [records.RecordStream]
    (path,) = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    found = _records(path)
    assert max(len(data) for _, _, data, _ in found) > records.CHUNK  # the timeline picture, at least
    for header, header_crc, data, data_crc in found:
        assert (header_crc, data_crc) == (tensorboards(header), tensorboards(data))


def test_a_record_writer_it_does_not_know_is_left_as_it_is(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    try:
        record_writer = writer._get_file_writer().event_writer._async_writer._writer
        record_writer.__class__ = type("OtherRecordWriter", (type(record_writer),), {"write": lambda self, data: None})
        assert records.fast_records(writer) is None
        assert "write" not in vars(record_writer)
    finally:
        record_writer.__class__ = record_writer.__class__.__mro__[1]
        writer.close()


def test_a_batch_of_events_lands_as_one_record_each_in_order(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    stream = records.fast_records(writer)
    assert stream is not None
    events = [
        Event(summary=Summary(value=[Summary.Value(tag="x", simple_value=s / 2)]), wall_time=1.0 + s, step=s)
        for s in range(5)
    ]
    stream.write([e.SerializeToString() for e in events])
    stream.write([])  # nothing to hand over: no queue item (the writer's thread would never mark it done)
    writer.flush()
    writer.close()
    (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    found = _records(path)[1:]  # after the writer's file-version event
    assert [data for _, _, data, _ in found] == [e.SerializeToString() for e in events]
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("x")] == [(s, s / 2) for s in range(5)]


@settings(max_examples=300, deadline=None)
@given(
    st.integers(-(2**63), 2**63 - 1),
    st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=4e9)),
    st.lists(st.tuples(st.text(min_size=1, max_size=300), st.floats()), min_size=1, max_size=6),
)
def test_scalar_events_are_the_bytes_protobuf_serializes(step, wall_time, values):
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    encoder = records.ScalarEncoder()
    ours = encoder.event(step, wall_time, [encoder.value(tag, v) for tag, v in values])
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in values])
    assert ours == Event(wall_time=wall_time, step=step, summary=summary).SerializeToString()


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, {
        tag: [e.step for e in acc.Histograms(tag)] for tag in acc.Tags()["histograms"]
    }


def test_without_the_fast_path_the_same_events_reach_tensorboard(tmp_path, monkeypatch):
    """A TensorBoard whose record writer fast_records does not know gets the same scalars and histograms through its
    own writer."""
    import gradwatch

    options = gradwatch.TensorBoardOptions(histogram_every=2, update_ratio_every=2, contribution_every=2)
    logged = []
    for name, fast in (("fast", records.fast_records), ("own", lambda writer: None)):
        monkeypatch.setattr("gradwatch.sinks.tensorboard.fast_records", fast)
        model, opt = reference_model()
        with watch(model, opt, accumulation_steps=2, logdir=tmp_path / name, tensorboard=options, on_finding="record"):
            reference_loop(model, opt, reference_data(), zero_grad=False)  # a finding too
        logged.append(_scalars(tmp_path / name))
    (scalars, histograms), (own_scalars, own_histograms) = logged
    assert "grad_norm/weight" in scalars and "update_ratio/weight" in scalars and "contribution_norm/weight" in scalars
    assert histograms["grad/weight"] == [0, 2]
    assert (own_scalars, own_histograms) == (scalars, histograms)

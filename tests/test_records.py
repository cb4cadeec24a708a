"""The event file's record checksums: numpy's CRC-32C against TensorBoard's own, and the records on disk."""

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
    original = records.checksum_with_numpy
    monkeypatch.setattr(
        "gradwatch.sinks.tensorboard.checksum_with_numpy", lambda writer: installed.append(original(writer))
    )
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=2, logdir=tmp_path, on_finding="record"):
        reference_loop(model, opt, reference_data(), zero_grad=False)  # a finding: the findings table, a text event
    assert installed == [True]
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
        assert records.checksum_with_numpy(writer) is False
        assert "write" not in vars(record_writer)
    finally:
        record_writer.__class__ = record_writer.__class__.__mro__[1]
        writer.close()

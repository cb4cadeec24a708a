"""TensorBoard's record checksum (masked CRC-32C) computed with numpy, for the event file gradwatch writes.

TensorBoard without TensorFlow checksums every record in pure Python, one table lookup per byte in the writer's
thread: on a small model's loop that took more of the GIL than the rest of the TensorBoard stream together. CRC-32C
is linear over GF(2), so a record's checksum is the XOR of one table entry per byte, chosen by the byte's value and
its distance from the end: ``_Tables`` holds those entries for records of up to ``CHUNK`` bytes, and longer ones
go chunk by chunk. The bytes written are the same as TensorBoard's own writer writes.

A second's worth of events also goes to the writer's thread as one queue item (``RecordStream``) instead of one
item per event: each item woke the thread, which then took the GIL from the training loop for every event. The
scalar events themselves are encoded here (``ScalarEncoder``), byte for byte as protobuf serializes them, at a
fraction of the cost of building and serializing the messages.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy

CHUNK = 1024  # bytes checksummed in one numpy pass (the table holds CHUNK x 256 entries: 1 MiB)
SMALL = 64  # below this many bytes the byte loop is cheaper than numpy's call overhead
_POLY = 0x82F63B78  # Castagnoli, reflected
_MASK = 0xFFFFFFFF


def _byte_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_POLY if crc & 1 else 0)
        table.append(crc)
    return table


_TABLE = _byte_table()


class _Tables:
    """``shifted[k][b]``: what byte ``b`` followed by ``k`` zero bytes adds to a CRC register that starts at 0."""

    def __init__(self) -> None:
        table = numpy.array(_TABLE, dtype=numpy.uint32)
        shifted = numpy.empty((CHUNK, 256), dtype=numpy.uint32)
        shifted[0] = table
        for k in range(1, CHUNK):
            previous = shifted[k - 1]
            shifted[k] = table[previous & 0xFF] ^ (previous >> 8)
        self.shifted = shifted
        self.distance = numpy.arange(CHUNK - 1, -1, -1)  # distance[CHUNK - n:] counts n - 1 down to 0


_tables: _Tables | None = None


def _update(crc: int, data: bytes) -> int:
    """The CRC register after ``data``, byte by byte (TensorBoard's loop)."""
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data``."""
    tables = _tables
    if tables is None or len(data) < SMALL:
        return _update(_MASK, data) ^ _MASK
    crc, start, n = _MASK, 0, len(data)
    while n - start >= 4:  # the register folds into a chunk's first four bytes: a chunk needs at least four
        size = min(CHUNK, n - start)
        chunk = numpy.frombuffer(data, dtype=numpy.uint8, count=size, offset=start).copy()
        chunk[:4] ^= numpy.frombuffer(crc.to_bytes(4, "little"), dtype=numpy.uint8)
        crc = int(numpy.bitwise_xor.reduce(tables.shifted[tables.distance[CHUNK - size :], chunk]))
        start += size
    return _update(crc, data[start:]) ^ _MASK


def masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C that TFRecord files (TensorBoard's event files) store."""
    x = crc32c(data)
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & _MASK


_DOUBLE = struct.Struct("<d")
_FLOAT = struct.Struct("<f")


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _float32(value: float) -> bytes:
    try:
        return _FLOAT.pack(value)
    except OverflowError:  # beyond float32: protobuf stores it as infinity
        return _FLOAT.pack(float("inf") if value > 0 else float("-inf"))


class ScalarEncoder:
    """Serialized ``Event``s of scalar summaries: what ``Event(wall_time=t, step=s, summary=Summary(value=[
    Summary.Value(tag=tag, simple_value=v), ...])).SerializeToString()`` returns, built from cached bytes per tag."""

    def __init__(self) -> None:
        self._prefixes: dict[str, bytes] = {}

    def value(self, tag: str, value: float) -> bytes:
        """One ``Summary.Value`` as it sits in a ``Summary`` (field 1, length-delimited)."""
        prefix = self._prefixes.get(tag)
        if prefix is None:
            name = tag.encode("utf-8")
            inner = b"\x0a" + _varint(len(name)) + name + b"\x15"  # tag (1, string), simple_value (2, float)
            prefix = self._prefixes[tag] = b"\x0a" + _varint(len(inner) + 4) + inner
        return prefix + _float32(value)

    @staticmethod
    def event(step: int, wall_time: float, values: list[bytes]) -> bytes:
        """An ``Event`` (wall_time: field 1, step: 2, summary: 5) holding the ``values``."""
        summary = b"".join(values)
        head = b"\x09" + _DOUBLE.pack(wall_time) if wall_time else b""  # proto3 leaves zeros out
        if step:
            head += b"\x10" + _varint(step if step > 0 else step + (1 << 64))
        return head + b"\x2a" + _varint(len(summary)) + summary


class Records(list):
    """Serialized events handed to the writer's thread as one queue item; it frames and checksums each."""


class RecordStream:
    """Hands serialized events to a ``SummaryWriter``'s thread, many at a time."""

    def __init__(self, async_writer: Any) -> None:
        self._async_writer = async_writer

    def write(self, events: list[bytes]) -> None:
        if events:  # (the writer's thread marks an item done only if it is truthy)
            self._async_writer.write(Records(events))


def fast_records(summary_writer: Any) -> RecordStream | None:
    """Have ``summary_writer`` (a ``torch.utils.tensorboard.SummaryWriter``) checksum its records with
    ``masked_crc32c`` and take ``Records``; returns the stream to write those with, or None, leaving the writer as
    it is, when its record writer is not the one this replaces."""
    global _tables
    try:
        from tensorboard.summary.writer.record_writer import RecordWriter

        async_writer = summary_writer._get_file_writer().event_writer._async_writer
        record_writer = async_writer._writer
        file = record_writer._writer
    except (AttributeError, ImportError):  # another TensorBoard layout: its own path stays
        return None
    if type(record_writer).write is not RecordWriter.write:
        return None
    if _tables is None:
        _tables = _Tables()  # built here, before the writer's thread checksums anything with it

    def frame(data: bytes) -> bytes:  # RecordWriter.write's record: length, its checksum, the data, its checksum
        header = struct.pack("<Q", len(data))
        return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))

    def write(data: bytes | Records) -> None:
        file.write(b"".join(map(frame, data)) if isinstance(data, Records) else frame(data))

    record_writer.write = write
    return RecordStream(async_writer)

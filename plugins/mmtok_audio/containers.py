"""Checks that an MP3 or Ogg file is complete, before libsndfile decodes it.

libsndfile decodes a truncated MP3 or Ogg file without an error: it returns the samples
up to the cut. These checks walk the file's frames or pages and raise
:class:`MmtokError` when the file ends inside one, or when its own headers declare more
than it contains. The layouts follow ISO/IEC 11172-3 and 13818-3 (MPEG audio frame
headers), the Xing/Info header that LAME writes, and RFC 3533 (Ogg pages).
"""

from __future__ import annotations

import struct
from pathlib import Path

from mmtok.errors import MmtokError

# Bitrates in kbit/s by (MPEG-1, layer) and (MPEG-2 or 2.5, layer). Index 0 is the free
# format, whose frame length the header does not give. Index 15 is invalid.
_BITRATES = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
# Sample rates in Hz by the header's version bits: 0 is MPEG-2.5, 2 MPEG-2, 3 MPEG-1.
_SAMPLE_RATES = {0: (11025, 12000, 8000), 2: (22050, 24000, 16000), 3: (44100, 48000, 32000)}
_LAYERS = {1: 3, 2: 2, 3: 1}  # layer bits to layer number

_XING_FRAMES_FLAG = 0x1


def looks_like_mp3(head: bytes) -> bool:
    """Return True when ``head`` starts with an ID3v2 tag or an MPEG audio frame sync."""
    return head.startswith(b"ID3") or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)


def _mp3_frame(data: bytes, position: int, end: int) -> tuple[int, bool, int] | None:
    """Parse the frame header at ``position``: ``(length in bytes, MPEG-1, channel mode)``, or None."""
    if position + 4 > end:
        return None
    header = int.from_bytes(data[position : position + 4], "big")
    if header >> 21 != 0x7FF:
        return None
    version = (header >> 19) & 0x3
    layer = _LAYERS.get((header >> 17) & 0x3)
    bitrate_index = (header >> 12) & 0xF
    rate_index = (header >> 10) & 0x3
    if version == 1 or layer is None or bitrate_index in (0, 15) or rate_index == 3:
        return None
    mpeg1 = version == 3
    bitrate = _BITRATES[(mpeg1, layer)][bitrate_index] * 1000
    sample_rate = _SAMPLE_RATES[version][rate_index]
    padding = (header >> 9) & 0x1
    if layer == 1:
        length = (12 * bitrate // sample_rate + padding) * 4
    elif layer == 3 and not mpeg1:
        length = 72 * bitrate // sample_rate + padding
    else:
        length = 144 * bitrate // sample_rate + padding
    return length, mpeg1, (header >> 6) & 0x3


def _mp3_audio_span(data: bytes) -> tuple[int, int]:
    """Return the byte range of the MP3 frames, without ID3v2, ID3v1 and APEv2 tags."""
    start = 0
    if data.startswith(b"ID3") and len(data) >= 10:
        size = (data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F)
        start = 10 + size + (10 if data[5] & 0x10 else 0)  # flag 0x10: a footer follows the tag
    end = len(data)
    if end - start >= 128 and data[end - 128 : end - 125] == b"TAG":
        end -= 128
    if end - start >= 32 and data[end - 32 : end - 24] == b"APETAGEX":
        size, flags = struct.unpack("<II", data[end - 20 : end - 12])
        end -= size + (32 if flags & 0x80000000 else 0)  # bit 31: the tag also has a header
    return start, max(end, start)


def check_mp3_complete(path: Path, data: bytes) -> None:
    """Raise :class:`MmtokError` when the MP3 ``data`` ends inside a frame or misses declared frames.

    Walking stops without a verdict at the first byte that is not a frame header (junk
    between frames, or a free-format stream), because libsndfile may still decode it.
    """
    start, end = _mp3_audio_span(data)
    frames = _mp3_frame_lengths(data, start, end)
    position = start + sum(frames)
    if position > end:
        raise MmtokError(
            f"{path}: file is truncated: its last MP3 frame needs {frames[-1]} bytes, but only "
            f"{end - (position - frames[-1])} are present"
        )
    if not frames or end - position >= 4:
        return
    declared = _xing_frame_count(data, start)
    if declared is not None and len(frames) - 1 < declared:
        raise MmtokError(
            f"{path}: file is truncated: its Xing header declares {declared} MP3 frames, but only "
            f"{len(frames) - 1} are present"
        )


def _mp3_frame_lengths(data: bytes, start: int, end: int) -> list[int]:
    lengths = []
    position = start
    while position < end:
        frame = _mp3_frame(data, position, end)
        if frame is None:
            # Fewer than 4 bytes left, or not a header: a cut header counts as a cut frame.
            if position + 4 > end and data[position : position + 1] == b"\xff":
                lengths.append(4)
            break
        lengths.append(frame[0])
        position += frame[0]
    return lengths


def _xing_frame_count(data: bytes, start: int) -> int | None:
    """Return the frame count of the Xing or Info header in the first frame, if it has one."""
    frame = _mp3_frame(data, start, len(data))
    if frame is None:
        return None
    _, mpeg1, channel_mode = frame
    mono = channel_mode == 3
    # The tag follows the 4-byte header and the side information, whose size depends on
    # the version and the number of channels.
    if mpeg1:
        side_information = 17 if mono else 32
    else:
        side_information = 9 if mono else 17
    offset = start + 4 + side_information
    if data[offset : offset + 4] not in (b"Xing", b"Info") or len(data) < offset + 12:
        return None
    flags, count = struct.unpack(">II", data[offset + 4 : offset + 12])
    return count if flags & _XING_FRAMES_FLAG else None


# Ogg ---------------------------------------------------------------------------------

_OGG_PAGE_HEADER = struct.Struct("<4sBBqIIIB")  # capture pattern ... number of segments
_BEGINNING_OF_STREAM = 0x02
_END_OF_STREAM = 0x04


def check_ogg_complete(path: Path, data: bytes) -> None:
    """Raise :class:`MmtokError` when the Ogg ``data`` ends inside a page or before a stream's last page.

    Every logical stream that begins (BOS flag) must end with a page carrying the EOS
    flag; a file cut at a page boundary lacks it.
    """
    position = 0
    open_streams: set[int] = set()
    while position < len(data):
        if len(data) - position < _OGG_PAGE_HEADER.size:
            raise MmtokError(f"{path}: file is truncated inside an Ogg page header at byte {position}")
        capture, version, flags, _, serial, _, _, segments = _OGG_PAGE_HEADER.unpack_from(data, position)
        if capture != b"OggS" or version != 0:
            return  # not a page: leave the verdict to libsndfile
        table_start = position + _OGG_PAGE_HEADER.size
        table = data[table_start : table_start + segments]
        size = _OGG_PAGE_HEADER.size + segments + sum(table)
        if len(table) < segments or position + size > len(data):
            raise MmtokError(
                f"{path}: file is truncated: the Ogg page at byte {position} needs {size} bytes, but only "
                f"{len(data) - position} are present"
            )
        if flags & _BEGINNING_OF_STREAM:
            open_streams.add(serial)
        if flags & _END_OF_STREAM:
            open_streams.discard(serial)
        position += size
    if open_streams:
        raise MmtokError(f"{path}: file is truncated: an Ogg stream ends without its end-of-stream page")

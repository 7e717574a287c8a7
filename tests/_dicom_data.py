"""DICOM test inputs that no file pydicom ships provides."""

from __future__ import annotations

import zlib

from ctsynth.data.dicom import DEFLATED_SYNTAX


def deflate_bomb(inflated_bytes: int) -> bytes:
    """A Deflated Explicit VR Little Endian file whose data set inflates to `inflated_bytes`: a
    128 x 128 header and one huge private OB element of zeros, compressed ~1000:1."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = DEFLATED_SYNTAX
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=False)

    def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        return group.to_bytes(2, "little") + elem.to_bytes(2, "little") + vr + len(value).to_bytes(2, "little") + value

    header = element(0x0028, 0x0010, b"US", (128).to_bytes(2, "little")) + element(0x0028, 0x0011, b"US", (128).to_bytes(2, "little"))
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(header)]
    # (0009,1010) OB, 4-byte length: explicit VR long form
    parts.append(deflater.compress((0x0009).to_bytes(2, "little") + (0x1010).to_bytes(2, "little") + b"OB\x00\x00" + inflated_bytes.to_bytes(4, "little")))
    zeros = bytes(1 << 20)
    for _ in range(inflated_bytes >> 20):
        parts.append(deflater.compress(zeros))
    parts.append(deflater.flush())
    return bytes(out.getvalue()) + b"".join(parts)

"""Writes a DICOM Segmentation (SEG) with pydicom, for medmesh's import test.

The test describes the SEG in a JSON file: its referenced series, the grid (rows, columns,
ImageOrientationPatient, PixelSpacing) and, per frame, ImagePositionPatient, segment number
and an offset into a mask file of one byte (0 or 1) per pixel. This script builds the
Segmentation IOD's attributes (shared and per-frame functional groups, SegmentSequence,
BINARY pixel data of one bit per pixel, bits running on across frames, least significant
first) and lets pydicom encode the file. Run with Debian's python3-pydicom:

    /usr/bin/python3 make_seg.py spec.json masks.u8 out.dcm
"""

import json
import sys

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def item(**attributes):
    ds = Dataset()
    for name, value in attributes.items():
        setattr(ds, name, value)
    return ds


def main(spec_path, mask_path, out_path):
    spec = json.load(open(spec_path))
    masks = open(mask_path, "rb").read()
    rows, columns = spec["rows"], spec["columns"]
    plane = rows * columns

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SEG_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(out_path, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SEG_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SEG"
    ds.StudyInstanceUID = spec["study"]
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = spec["frame_of_reference"]
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.ContentLabel = "BRAIN"
    ds.ReferencedSeriesSequence = Sequence(
        [item(SeriesInstanceUID=spec["series"], ReferencedInstanceSequence=Sequence([]))]
    )
    ds.SegmentationType = "BINARY"
    ds.SegmentSequence = Sequence(
        [
            item(SegmentNumber=number, SegmentLabel=label, SegmentAlgorithmType="MANUAL")
            for number, label in spec["segments"]
        ]
    )
    ds.SharedFunctionalGroupsSequence = Sequence(
        [
            item(
                PlaneOrientationSequence=Sequence(
                    [item(ImageOrientationPatient=spec["orientation"])]
                ),
                PixelMeasuresSequence=Sequence(
                    [
                        item(
                            PixelSpacing=spec["pixel_spacing"],
                            SliceThickness=spec["thickness"],
                        )
                    ]
                ),
            )
        ]
    )
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [
            item(
                PlanePositionSequence=Sequence([item(ImagePositionPatient=f["position"])]),
                SegmentIdentificationSequence=Sequence(
                    [item(ReferencedSegmentNumber=f["segment"])]
                ),
            )
            for f in spec["frames"]
        ]
    )
    ds.NumberOfFrames = len(spec["frames"])
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 1
    ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    bits = bytearray((len(spec["frames"]) * plane + 7) // 8)
    for f, frame in enumerate(spec["frames"]):
        mask = masks[frame["offset"] : frame["offset"] + plane]
        for p, v in enumerate(mask):
            if v:
                i = f * plane + p
                bits[i // 8] |= 1 << (i % 8)
    if len(bits) % 2:
        bits.append(0)
    ds.PixelData = bytes(bits)
    ds.is_little_endian = True
    ds.is_implicit_VR = False
    ds.save_as(out_path, write_like_original=False)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Turns a folder of single-frame DICOM slices into one multi-frame image with pydicom, for
medmesh's import test: an Enhanced MR Image whose frames (in the order given) carry their
ImagePositionPatient in per-frame functional groups, with orientation, pixel spacing and the
rescale in the shared ones, as scanners write them. Run with Debian's python3-pydicom:

    /usr/bin/python3 make_multiframe.py OUT.dcm SLICE.dcm...
"""

import sys

import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def item(**attributes):
    ds = Dataset()
    for name, value in attributes.items():
        setattr(ds, name, value)
    return ds


def main(out_path, *slice_paths):
    slices = [pydicom.dcmread(p) for p in slice_paths]
    first = slices[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENHANCED_MR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(out_path, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = ENHANCED_MR
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for name in [
        "Modality",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "FrameOfReferenceUID",
        "SeriesDescription",
        "SeriesNumber",
        "StudyDate",
        "StudyTime",
    ]:
        if name in first:
            setattr(ds, name, first.data_element(name).value)
    ds.InstanceNumber = 1
    ds.SharedFunctionalGroupsSequence = Sequence(
        [
            item(
                PlaneOrientationSequence=Sequence(
                    [item(ImageOrientationPatient=first.ImageOrientationPatient)]
                ),
                PixelMeasuresSequence=Sequence(
                    [
                        item(
                            PixelSpacing=first.PixelSpacing,
                            SliceThickness=first.SliceThickness,
                        )
                    ]
                ),
                PixelValueTransformationSequence=Sequence(
                    [
                        item(
                            RescaleSlope=first.RescaleSlope,
                            RescaleIntercept=first.RescaleIntercept,
                            RescaleType="US",
                        )
                    ]
                ),
            )
        ]
    )
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [
            item(PlanePositionSequence=Sequence([item(ImagePositionPatient=s.ImagePositionPatient)]))
            for s in slices
        ]
    )
    ds.NumberOfFrames = len(slices)
    ds.Rows, ds.Columns = first.Rows, first.Columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = first.BitsAllocated
    ds.BitsStored = first.BitsStored
    ds.HighBit = first.HighBit
    ds.PixelRepresentation = first.PixelRepresentation
    ds.PixelData = b"".join(s.PixelData for s in slices)
    ds.is_little_endian = True
    ds.is_implicit_VR = False
    ds.save_as(out_path, write_like_original=False)


if __name__ == "__main__":
    main(*sys.argv[1:])

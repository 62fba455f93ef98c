//! One DICOM file from a PACS export (`medmesh data import --dicom`): decoded as a slice of a
//! volume or refused with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok([rows, columns]) =
        medmesh_imaging::dicom::decode_slice(data, Path::new("fuzz.dcm"))
    {
        assert!(rows > 0 && columns > 0);
    }
});

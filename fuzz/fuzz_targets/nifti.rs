//! A NIfTI volume (`.nii` or `.nii.gz`) from a clinic's disk: decoded or refused with an
//! error, never a panic or an allocation beyond what the file can hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok((shape, values)) = medmesh_imaging::msd::decode_nifti(data, Path::new("fuzz.nii")) {
        assert_eq!(shape.iter().product::<usize>(), values.len());
    }
});

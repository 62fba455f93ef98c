//! A PNG image or mask: decoded as 8- or 16-bit grayscale or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok((w, h, pixels)) =
        medmesh_imaging::png_pairs::decode_gray(data, Path::new("fuzz.png"), &[8, 16])
    {
        assert_eq!(w * h, pixels.len());
    }
});

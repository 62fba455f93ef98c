//! PNG image/mask pairs: `images/NAME.png` with `masks/NAME.png`, one 2D case each.
//! Images are 8- or 16-bit grayscale; masks are 8-bit grayscale class indices.

use std::fs;
use std::path::{Path, PathBuf};

use super::{Case, DataError, LabelVolume, Volume, io_error};

/// Reads every pair in `dir`, checking bit depths, sizes and label range.
pub fn read_pairs(dir: &Path, classes: usize) -> Result<Vec<Case>, DataError> {
    let images_dir = dir.join("images");
    let masks_dir = dir.join("masks");
    let mut names: Vec<PathBuf> = fs::read_dir(&images_dir)
        .map_err(io_error(&images_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(DataError::Empty { path: images_dir });
    }
    for mask in fs::read_dir(&masks_dir)
        .map_err(io_error(&masks_dir))?
        .filter_map(|e| e.ok())
    {
        let partner = images_dir.join(mask.file_name());
        if !partner.exists() {
            return Err(DataError::Unpaired {
                path: mask.path(),
                missing: "image in images/",
            });
        }
    }
    names
        .iter()
        .map(|image_path| {
            let mask_path = masks_dir.join(image_path.file_name().unwrap_or_default());
            if !mask_path.exists() {
                return Err(DataError::Unpaired {
                    path: image_path.clone(),
                    missing: "mask in masks/",
                });
            }
            let (w, h, pixels) = read_gray(image_path, &[8, 16])?;
            let (mw, mh, mask) = read_gray(&mask_path, &[8])?;
            if (mw, mh) != (w, h) {
                return Err(DataError::ShapeMismatch {
                    image: image_path.clone(),
                    label: mask_path,
                    image_shape: vec![w, h],
                    label_shape: vec![mw, mh],
                });
            }
            let label = mask
                .iter()
                .map(|&v| {
                    if (v as usize) < classes {
                        Ok(v as u8)
                    } else {
                        Err(DataError::LabelOutOfRange {
                            path: mask_path.clone(),
                            value: v,
                            classes,
                        })
                    }
                })
                .collect::<Result<Vec<u8>, _>>()?;
            Ok(Case {
                name: image_path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                image: Volume {
                    dims: [w, h, 1],
                    spacing: [1.0; 3],
                    channels: 1,
                    data: pixels,
                },
                label: LabelVolume {
                    dims: [w, h, 1],
                    data: label,
                },
            })
        })
        .collect()
}

/// Reads a grayscale PNG of one of `depths` bits, row-major (which is x fastest).
fn read_gray(path: &Path, depths: &[u8]) -> Result<(usize, usize, Vec<f32>), DataError> {
    let bytes = fs::read(path).map_err(io_error(path))?;
    decode_gray(&bytes, path, depths)
}

/// Decodes a grayscale PNG of one of `depths` bits (8 or 16) into `(width, height,
/// pixels)`, row-major. `path` only names the source in errors.
pub fn decode_gray(
    bytes: &[u8],
    path: &Path,
    depths: &[u8],
) -> Result<(usize, usize, Vec<f32>), DataError> {
    let png_err = |reason: String| DataError::Png {
        path: path.to_owned(),
        reason,
    };
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder
        .read_info()
        .map_err(|e| png_err(format!("not a readable PNG: {e}")))?;
    let info = reader.info();
    let depth = info.bit_depth as u8;
    if info.color_type != png::ColorType::Grayscale {
        return Err(png_err(format!(
            "colour type {:?}; expected grayscale",
            info.color_type
        )));
    }
    if !depths.contains(&depth) {
        return Err(png_err(format!(
            "bit depth {depth}; expected {}",
            depths
                .iter()
                .map(u8::to_string)
                .collect::<Vec<_>>()
                .join(" or ")
        )));
    }
    let (w, h) = (info.width as usize, info.height as usize);
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| png_err(format!("{w}x{h} pixels is too large an image")))?;
    if size > bytes.len().saturating_mul(crate::MAX_DEFLATE_RATIO) {
        return Err(png_err(format!(
            "the header declares {w}x{h} pixels, more than the file's {} bytes can hold",
            bytes.len()
        )));
    }
    let mut buf = vec![0; size];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| png_err(format!("corrupt image data: {e}")))?;
    let bytes = &buf[..frame.buffer_size()];
    let pixels = if depth == 16 {
        bytes
            .chunks_exact(2)
            .map(|b| f32::from(u16::from_be_bytes([b[0], b[1]])))
            .collect()
    } else {
        bytes.iter().map(|&b| f32::from(b)).collect()
    };
    Ok((w, h, pixels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    fn write_png(
        path: &Path,
        w: u32,
        h: u32,
        depth: png::BitDepth,
        color: png::ColorType,
        data: &[u8],
    ) {
        let file = File::create(path).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
        enc.set_color(color);
        enc.set_depth(depth);
        enc.write_header().unwrap().write_image_data(data).unwrap();
    }

    fn layout() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("images")).unwrap();
        fs::create_dir_all(dir.path().join("masks")).unwrap();
        dir
    }

    #[test]
    fn reads_pairs_and_names_bad_files() {
        let dir = layout();
        let img: Vec<u8> = (0..16).collect();
        let mask: Vec<u8> = (0..16).map(|i| u8::from(i > 8)).collect();
        write_png(
            &dir.path().join("images/a.png"),
            4,
            4,
            png::BitDepth::Eight,
            png::ColorType::Grayscale,
            &img,
        );
        write_png(
            &dir.path().join("masks/a.png"),
            4,
            4,
            png::BitDepth::Eight,
            png::ColorType::Grayscale,
            &mask,
        );
        let cases = read_pairs(dir.path(), 2).unwrap();
        assert_eq!(cases[0].image.data[5], 5.0);
        assert_eq!(cases[0].label.data.iter().filter(|&&l| l == 1).count(), 7);

        let err = read_pairs(dir.path(), 1).unwrap_err();
        assert!(matches!(err, DataError::LabelOutOfRange { .. }), "{err}");

        // A 16-bit mask is the wrong bit depth.
        write_png(
            &dir.path().join("masks/a.png"),
            4,
            4,
            png::BitDepth::Sixteen,
            png::ColorType::Grayscale,
            &[0; 32],
        );
        let err = read_pairs(dir.path(), 2).unwrap_err();
        assert!(
            err.to_string().contains("bit depth 16") && err.to_string().contains("masks/a.png"),
            "{err}"
        );

        // An RGB image.
        write_png(
            &dir.path().join("masks/a.png"),
            4,
            4,
            png::BitDepth::Eight,
            png::ColorType::Grayscale,
            &mask,
        );
        write_png(
            &dir.path().join("images/a.png"),
            4,
            4,
            png::BitDepth::Eight,
            png::ColorType::Rgb,
            &[0; 48],
        );
        assert!(
            read_pairs(dir.path(), 2)
                .unwrap_err()
                .to_string()
                .contains("colour type")
        );

        // A truncated file.
        let bytes = fs::read(dir.path().join("masks/a.png")).unwrap();
        write_png(
            &dir.path().join("images/a.png"),
            4,
            4,
            png::BitDepth::Eight,
            png::ColorType::Grayscale,
            &img,
        );
        fs::write(dir.path().join("masks/a.png"), &bytes[..bytes.len() - 20]).unwrap();
        assert!(matches!(
            read_pairs(dir.path(), 2),
            Err(DataError::Png { .. })
        ));

        fs::remove_file(dir.path().join("masks/a.png")).unwrap();
        assert!(matches!(
            read_pairs(dir.path(), 2),
            Err(DataError::Unpaired { .. })
        ));
    }

    /// Found by `fuzz/run.sh` (target `png`): an 85-byte file whose header claimed a
    /// huge image made the loader allocate 6 GB before reading a pixel.
    #[test]
    fn header_claiming_more_pixels_than_the_file_holds_is_refused() {
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, 4, 4);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        encoder
            .write_header()
            .unwrap()
            .write_image_data(&[0; 16])
            .unwrap();
        // IHDR's width and height (bytes 16..24), then its CRC (29..33), recomputed.
        bytes[16..20].copy_from_slice(&60_000u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        let err = decode_gray(&bytes, Path::new("huge.png"), &[8]).unwrap_err();
        assert!(
            err.to_string().contains("huge.png") && err.to_string().contains("60000x100000 pixels"),
            "{err}"
        );
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn empty_folder_is_an_error() {
        let dir = layout();
        assert!(matches!(
            read_pairs(dir.path(), 2),
            Err(DataError::Empty { .. })
        ));
    }
}

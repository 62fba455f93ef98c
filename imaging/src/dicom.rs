//! DICOM series in. dicom-rs parses the files (`dicom-object`) and decodes their pixel
//! data with the Modality LUT applied (`dicom-pixeldata`: rescale slope and intercept);
//! this module groups the files of a folder into series, sorts each series' slices along
//! the slice normal, checks that they form one regular grid, and gives the volume its
//! geometry. DICOM's patient coordinates are LPS; volumes leave here in RAS, like every
//! volume medmesh reads.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions, Tag};
use dicom_pixeldata::PixelDecoder;
use dicom_pixeldata::{ConvertOptions, ModalityLutOption};

use crate::Volume;
use crate::geometry::{Affine, GeometryError, Reorientation};

/// Why a DICOM folder could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DicomError {
    /// The folder or a file in it could not be read.
    #[error("{path}: {source}")]
    Io {
        /// Which.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file that says it is DICOM could not be parsed or decoded.
    #[error("{path}: {reason}")]
    File {
        /// Which.
        path: PathBuf,
        /// dicom-rs's explanation, or the missing attribute.
        reason: String,
    },
    /// The slices of a series do not form one regular grid.
    #[error("series {series}: {reason}")]
    Series {
        /// Its SeriesInstanceUID.
        series: String,
        /// What does not fit.
        reason: String,
    },
    /// The geometry has no canonical orientation.
    #[error("series {series}: {source}")]
    Geometry {
        /// Its SeriesInstanceUID.
        series: String,
        /// Why.
        source: GeometryError,
    },
    /// No DICOM image in the folder.
    #[error("{0}: no DICOM image found")]
    Empty(PathBuf),
}

/// One series, as a volume in RAS.
#[derive(Debug, Clone)]
pub struct Series {
    /// SeriesInstanceUID.
    pub uid: String,
    /// SeriesDescription, when set.
    pub description: Option<String>,
    /// Modality ("CT", "MR", ...), when set.
    pub modality: Option<String>,
    /// The folder holding its first slice (where a label NIfTI sits beside it).
    pub dir: PathBuf,
    /// The voxels, rescaled, in RAS, with their spacing.
    pub volume: Volume,
    /// Voxel to RAS millimetres, after reorientation.
    pub affine: Affine,
}

/// One image file's geometry and pixels.
struct Slice {
    path: PathBuf,
    series: String,
    description: Option<String>,
    modality: Option<String>,
    position: [f64; 3],
    orientation: [f64; 6],
    /// (between rows, between columns), millimetres.
    pixel_spacing: [f64; 2],
    thickness: Option<f64>,
    rows: usize,
    columns: usize,
    pixels: Vec<f32>,
}

/// Every series of image files under `dir` (searched recursively; files without the DICOM
/// preamble are skipped), sorted by SeriesInstanceUID.
pub fn read_series(dir: &Path) -> Result<Vec<Series>, DicomError> {
    let mut files = Vec::new();
    collect_files(dir, &mut files)?;
    files.sort();
    let mut by_series: BTreeMap<String, Vec<Slice>> = BTreeMap::new();
    for path in files {
        if !has_preamble(&path)? {
            continue;
        }
        let slice = read_slice(&path)?;
        by_series
            .entry(slice.series.clone())
            .or_default()
            .push(slice);
    }
    if by_series.is_empty() {
        return Err(DicomError::Empty(dir.to_owned()));
    }
    by_series
        .into_iter()
        .map(|(uid, slices)| assemble(uid, slices))
        .collect()
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DicomError> {
    let io = |source| DicomError::Io {
        path: dir.to_owned(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if path.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// Whether `path` starts with the 128-byte preamble and `DICM`.
fn has_preamble(path: &Path) -> Result<bool, DicomError> {
    use std::io::Read;
    let mut head = [0u8; 132];
    let mut f = fs::File::open(path).map_err(|source| DicomError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut read = 0;
    while read < head.len() {
        match f.read(&mut head[read..]) {
            Ok(0) => return Ok(false),
            Ok(n) => read += n,
            Err(source) => {
                return Err(DicomError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(&head[128..] == b"DICM")
}

/// The largest single DICOM file read (one slice of one series).
pub const MAX_FILE_BYTES: u64 = 512 << 20;

fn read_slice(path: &Path) -> Result<Slice, DicomError> {
    let io = |source| DicomError::Io {
        path: path.to_owned(),
        source,
    };
    let len = fs::metadata(path).map_err(io)?.len();
    if len > MAX_FILE_BYTES {
        return Err(DicomError::File {
            path: path.to_owned(),
            reason: format!("{len} bytes, over the {MAX_FILE_BYTES} a slice may have"),
        });
    }
    slice_from_bytes(&fs::read(path).map_err(io)?, path)
}

/// Decodes one DICOM file's bytes (preamble included) as a slice of a volume and returns its
/// rows and columns, or says why it is not one. What `read_series` does to each file, for the
/// fuzzer and for tests of hostile input.
pub fn decode_slice(bytes: &[u8], path: &Path) -> Result<[usize; 2], DicomError> {
    slice_from_bytes(bytes, path).map(|s| [s.rows, s.columns])
}

fn slice_from_bytes(bytes: &[u8], path: &Path) -> Result<Slice, DicomError> {
    let fail = |reason: String| DicomError::File {
        path: path.to_owned(),
        reason,
    };
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .from_reader(bytes)
        .map_err(|e| fail(e.to_string()))?;
    let text = |tag, name: &str| -> Result<String, DicomError> {
        obj.element(tag)
            .map_err(|_| fail(format!("no {name}")))?
            .to_str()
            .map(|s| s.trim().to_owned())
            .map_err(|e| fail(format!("{name}: {e}")))
    };
    let floats = |tag, name: &str, n: usize| -> Result<Vec<f64>, DicomError> {
        let v = decimals(&obj, tag, name)
            .map_err(fail)?
            .ok_or_else(|| fail(format!("no {name}: not a slice of a volume")))?;
        if v.len() != n {
            return Err(fail(format!("{name} must be {n} finite numbers, is {v:?}")));
        }
        Ok(v)
    };
    let series = text(tags::SERIES_INSTANCE_UID, "SeriesInstanceUID")?;
    let position = floats(tags::IMAGE_POSITION_PATIENT, "ImagePositionPatient", 3)?;
    let orientation = floats(
        tags::IMAGE_ORIENTATION_PATIENT,
        "ImageOrientationPatient",
        6,
    )?;
    let pixel_spacing = floats(tags::PIXEL_SPACING, "PixelSpacing", 2)?;
    if pixel_spacing.iter().any(|s| *s <= 0.0) {
        return Err(fail(format!(
            "PixelSpacing {pixel_spacing:?} must be positive"
        )));
    }
    let thickness = obj
        .element(tags::SLICE_THICKNESS)
        .ok()
        .and_then(|e| e.to_float64().ok())
        .filter(|t| *t > 0.0);
    let description = text(tags::SERIES_DESCRIPTION, "SeriesDescription").ok();
    let modality = text(tags::MODALITY, "Modality")
        .ok()
        .filter(|m| !m.is_empty());
    let (pixels, rows, columns) = decode(&obj).map_err(fail)?;
    Ok(Slice {
        path: path.to_owned(),
        series,
        description,
        modality,
        position: [position[0], position[1], position[2]],
        orientation: std::array::from_fn(|i| orientation[i]),
        pixel_spacing: [pixel_spacing[0], pixel_spacing[1]],
        thickness,
        rows,
        columns,
        pixels,
    })
}

/// The pixels of a single-frame, single-sample image, rescaled (Modality LUT).
fn decode(obj: &DefaultDicomObject) -> Result<(Vec<f32>, usize, usize), String> {
    let ts = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_owned();
    check_pixel_module(obj)?;
    let data = obj
        .decode_pixel_data()
        .map_err(|e| format!("pixel data (transfer syntax {ts}): {e}"))?;
    if data.number_of_frames() != 1 {
        return Err(format!(
            "{} frames in one file: multi-frame images are not read (one file per slice)",
            data.number_of_frames()
        ));
    }
    if data.samples_per_pixel() != 1 {
        return Err(format!(
            "{} samples per pixel: only grey-level images are read",
            data.samples_per_pixel()
        ));
    }
    // The stored values, rescaled here: dicom-pixeldata reads a RescaleSlope whose VR a tool
    // lost (UN) as its raw bytes, so "2" would become 50.
    let raw = ConvertOptions::new().with_modality_lut(ModalityLutOption::None);
    let stored: Vec<f32> = data
        .to_vec_with_options(&raw)
        .map_err(|e| format!("pixel data: {e}"))?;
    let (slope, intercept) = rescale(obj)?;
    let pixels = stored
        .iter()
        .map(|v| (f64::from(*v) * slope + intercept) as f32)
        .collect();
    Ok((pixels, data.rows() as usize, data.columns() as usize))
}

/// Decimal strings (DS) of `tag`, read from the value's bytes: a file rewritten by a tool
/// that lost the VR (so the element reads as UN) still says "10\-20\30". `None` when absent.
fn decimals(obj: &DefaultDicomObject, tag: Tag, name: &str) -> Result<Option<Vec<f64>>, String> {
    let Ok(element) = obj.element(tag) else {
        return Ok(None);
    };
    let bytes = element.to_bytes().map_err(|e| format!("{name}: {e}"))?;
    let text = String::from_utf8_lossy(&bytes);
    let values = text
        .trim_end_matches(['\0', ' '])
        .split('\\')
        .map(|x| x.trim().parse::<f64>())
        .collect::<Result<Vec<f64>, _>>()
        .map_err(|e| format!("{name} {text:?}: {e}"))?;
    if values.iter().any(|v| !v.is_finite()) {
        return Err(format!("{name} {text:?} is not finite"));
    }
    Ok(Some(values))
}

/// RescaleSlope and RescaleIntercept (the Modality LUT), 1 and 0 when absent.
fn rescale(obj: &DefaultDicomObject) -> Result<(f64, f64), String> {
    let one = |tag, name, default| -> Result<f64, String> {
        match decimals(obj, tag, name)? {
            None => Ok(default),
            Some(v) if v.len() == 1 => Ok(v[0]),
            Some(v) => Err(format!("{name} has {} values", v.len())),
        }
    };
    Ok((
        one(tags::RESCALE_SLOPE, "RescaleSlope", 1.0)?,
        one(tags::RESCALE_INTERCEPT, "RescaleIntercept", 0.0)?,
    ))
}

/// The Image Pixel module's numbers, checked before dicom-pixeldata sees them: it asserts
/// (panics) on some impossible values rather than returning an error.
fn check_pixel_module(obj: &DefaultDicomObject) -> Result<(), String> {
    let number = |tag, name: &str| -> Result<u32, String> {
        obj.element(tag)
            .map_err(|_| format!("no {name}"))?
            .to_int::<u32>()
            .map_err(|e| format!("{name}: {e}"))
    };
    let allocated = number(tags::BITS_ALLOCATED, "BitsAllocated")?;
    let stored = number(tags::BITS_STORED, "BitsStored")?;
    if ![8, 16, 32].contains(&allocated) || stored == 0 || stored > allocated {
        return Err(format!(
            "BitsAllocated {allocated} with BitsStored {stored}: not a grey-level image of 8, \
             16 or 32 bits"
        ));
    }
    if let Ok(high) = number(tags::HIGH_BIT, "HighBit")
        && high >= allocated
    {
        return Err(format!(
            "HighBit {high} is outside BitsAllocated {allocated}"
        ));
    }
    let (rows, columns) = (
        number(tags::ROWS, "Rows")?,
        number(tags::COLUMNS, "Columns")?,
    );
    if rows == 0 || columns == 0 {
        return Err(format!("{rows} rows by {columns} columns"));
    }
    // Native pixel data must hold the image it declares; checked before decoding, so that a
    // small file cannot make the decoder allocate for 65535 x 65535 pixels.
    let needed = u64::from(rows) * u64::from(columns) * u64::from(allocated / 8);
    let pixels = obj
        .element(tags::PIXEL_DATA)
        .map_err(|_| "no PixelData".to_owned())?;
    if let Some(len) = pixels.header().len.get()
        && u64::from(len) < needed
    {
        return Err(format!(
            "PixelData holds {len} bytes, {rows} x {columns} pixels of {allocated} bits need \
             {needed}"
        ));
    }
    Ok(())
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Stacks a series' slices along the slice normal into a RAS volume.
fn assemble(uid: String, mut slices: Vec<Slice>) -> Result<Series, DicomError> {
    let bad = |reason: String| DicomError::Series {
        series: uid.clone(),
        reason,
    };
    let first = &slices[0];
    let (rows, columns, o, ps) = (
        first.rows,
        first.columns,
        first.orientation,
        first.pixel_spacing,
    );
    for s in &slices {
        if (s.rows, s.columns) != (rows, columns) {
            return Err(bad(format!(
                "{} is {}x{} pixels, {} is {}x{}",
                s.path.display(),
                s.columns,
                s.rows,
                first.path.display(),
                columns,
                rows
            )));
        }
        let same = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4);
        if !same(&s.orientation, &o) || !same(&s.pixel_spacing, &ps) {
            return Err(bad(format!(
                "{} has another orientation or pixel spacing than {}",
                s.path.display(),
                first.path.display()
            )));
        }
    }
    // ImageOrientationPatient: the direction of a row (increasing column), then of a
    // column (increasing row).
    let row_dir = [o[0], o[1], o[2]];
    let col_dir = [o[3], o[4], o[5]];
    let normal = cross(row_dir, col_dir);
    let norm = dot(normal, normal).sqrt();
    if !(0.99..=1.01).contains(&norm) || dot(row_dir, col_dir).abs() > 1e-3 {
        return Err(bad(format!(
            "ImageOrientationPatient {o:?} is not two orthogonal unit vectors"
        )));
    }
    slices.sort_by(|a, b| dot(a.position, normal).total_cmp(&dot(b.position, normal)));
    let along: Vec<f64> = slices.iter().map(|s| dot(s.position, normal)).collect();
    let gaps: Vec<f64> = along.windows(2).map(|w| w[1] - w[0]).collect();
    let step = match gaps.first() {
        Some(&g) => g,
        None => first_thickness(&slices),
    };
    if step <= 1e-6 {
        return Err(bad(format!(
            "two slices at the same position ({} mm along the normal)",
            along[0]
        )));
    }
    if let Some(g) = gaps
        .iter()
        .find(|g| (**g - step).abs() > 1e-3 * step.max(1.0))
    {
        return Err(bad(format!(
            "uneven slice spacing ({step} mm, then {g} mm): a missing or extra slice?"
        )));
    }
    // Voxel (column i, row j, slice k) in LPS millimetres: origin + i * dc * row_dir
    // + j * dr * col_dir + k * step * normal; then LPS to RAS (x and y negated).
    let [dr, dc] = ps;
    let origin = slices[0].position;
    let mut lps = [[0.0; 4]; 3];
    for a in 0..3 {
        lps[a] = [
            row_dir[a] * dc,
            col_dir[a] * dr,
            normal[a] * step,
            origin[a],
        ];
    }
    let affine = Affine([lps[0].map(|v| -v), lps[1].map(|v| -v), lps[2]]);
    let dims = [columns, rows, slices.len()];
    let data: Vec<f32> = slices
        .iter()
        .flat_map(|s| s.pixels.iter().copied())
        .collect();
    if let Some(v) = data.iter().find(|v| !v.is_finite()) {
        return Err(bad(format!("a pixel rescales to {v}")));
    }
    let turn = Reorientation::to_ras(&affine).map_err(|source| DicomError::Geometry {
        series: uid.clone(),
        source,
    })?;
    let ras = turn.affine(&affine, dims);
    let volume = Volume {
        dims: turn.dims(dims),
        spacing: ras.spacing(),
        channels: 1,
        data: turn.apply(&data, dims, 1),
    };
    let dir = slices[0]
        .path
        .parent()
        .map_or_else(PathBuf::new, Path::to_owned);
    Ok(Series {
        uid,
        description: slices[0].description.clone(),
        modality: slices[0].modality.clone(),
        dir,
        volume,
        affine: ras,
    })
}

/// A single slice's extent along the normal: its SliceThickness, else 1 mm.
fn first_thickness(slices: &[Slice]) -> f64 {
    slices[0].thickness.unwrap_or(1.0)
}

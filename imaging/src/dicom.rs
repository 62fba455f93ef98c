//! DICOM series in. dicom-rs parses the files (`dicom-object`) and decodes their pixel
//! data with the Modality LUT applied (`dicom-pixeldata`: rescale slope and intercept);
//! this module groups the files of a folder into series, sorts each series' slices along
//! the slice normal, checks that they form one regular grid, and gives the volume its
//! geometry. DICOM's patient coordinates are LPS; volumes leave here in RAS, like every
//! volume medmesh reads.
//!
//! A multi-frame image (Enhanced CT or MR) is read as its frames, each a slice with the
//! position, orientation, spacing and rescale of its functional groups.
//!
//! A DICOM Segmentation (SEG: one multi-frame file, a frame per segment and slice, each with
//! its ImagePositionPatient) becomes its referenced series' label map: each frame is placed
//! on the slice of the series at its position, and its voxels take the segment's number.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions, Tag};
use dicom_pixeldata::PixelDecoder;
use dicom_pixeldata::{ConvertOptions, ModalityLutOption};

use crate::geometry::{Affine, GeometryError, Reorientation};
use crate::{LabelVolume, Volume};

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
    /// The DICOM SEG that references this series, placed on its grid, when there is one.
    pub segmentation: Option<Segmentation>,
}

/// A DICOM SEG's segments on its series' grid.
#[derive(Debug, Clone)]
pub struct Segmentation {
    /// The SEG file.
    pub path: PathBuf,
    /// (SegmentNumber, SegmentLabel) of each segment it defines, ascending.
    pub segments: Vec<(u16, String)>,
    /// The segment number of each voxel (0: in none), on the series' RAS grid.
    pub label: LabelVolume,
}

/// SOP Class UID of Segmentation Storage.
pub const SEGMENTATION_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.66.4";

/// One frame of a SEG: where it lies and which segment it draws.
#[derive(Debug, Clone, Copy)]
struct SegFrame {
    position: [f64; 3],
    segment: u16,
}

/// A SEG as read, before it meets its series.
#[derive(Debug)]
struct RawSegmentation {
    path: PathBuf,
    series: String,
    segments: Vec<(u16, String)>,
    orientation: [f64; 6],
    /// (between rows, between columns).
    pixel_spacing: [f64; 2],
    rows: usize,
    columns: usize,
    frames: Vec<SegFrame>,
    /// Whether each pixel of each frame is in its segment, frame after frame.
    inside: Vec<bool>,
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
    let mut segmentations: BTreeMap<String, RawSegmentation> = BTreeMap::new();
    for path in files {
        if !has_preamble(&path)? {
            continue;
        }
        match read_file(&path)? {
            Object::Slices(slices) => {
                for slice in slices {
                    by_series
                        .entry(slice.series.clone())
                        .or_default()
                        .push(slice);
                }
            }
            Object::Segmentation(seg) => {
                if let Some(other) = segmentations.get(&seg.series) {
                    return Err(DicomError::Series {
                        series: seg.series.clone(),
                        reason: format!(
                            "two DICOM SEGs reference it ({} and {}); keep one",
                            other.path.display(),
                            seg.path.display()
                        ),
                    });
                }
                segmentations.insert(seg.series.clone(), seg);
            }
        }
    }
    if by_series.is_empty() {
        return Err(DicomError::Empty(dir.to_owned()));
    }
    if let Some((series, seg)) = segmentations
        .iter()
        .find(|(series, _)| !by_series.contains_key(*series))
    {
        return Err(DicomError::File {
            path: seg.path.clone(),
            reason: format!(
                "this DICOM SEG references series {series}, which is not among the images read"
            ),
        });
    }
    by_series
        .into_iter()
        .map(|(uid, slices)| {
            let seg = segmentations.remove(&uid);
            assemble(uid, slices, seg)
        })
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

/// What a DICOM file holds, for import.
enum Object {
    /// Slices of an image series: one, or each frame of a multi-frame image.
    Slices(Vec<Slice>),
    /// A segmentation of one.
    Segmentation(RawSegmentation),
}

fn read_file(path: &Path) -> Result<Object, DicomError> {
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
    object_from_bytes(&fs::read(path).map_err(io)?, path)
}

/// Decodes one DICOM file's bytes (preamble included) as a slice of a volume and returns its
/// rows and columns, or says why it is not one. What `read_series` does to each file, for the
/// fuzzer and for tests of hostile input.
pub fn decode_slice(bytes: &[u8], path: &Path) -> Result<[usize; 2], DicomError> {
    match object_from_bytes(bytes, path)? {
        Object::Slices(s) => Ok(s.first().map_or([0, 0], |s| [s.rows, s.columns])),
        Object::Segmentation(s) => Ok([s.rows, s.columns]),
    }
}

fn object_from_bytes(bytes: &[u8], path: &Path) -> Result<Object, DicomError> {
    let fail = |reason: String| DicomError::File {
        path: path.to_owned(),
        reason,
    };
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .from_reader(bytes)
        .map_err(|e| fail(e.to_string()))?;
    let sop_class = text(&obj, tags::SOP_CLASS_UID, "SOPClassUID").ok();
    let modality = text(&obj, tags::MODALITY, "Modality").ok();
    if sop_class.as_deref() == Some(SEGMENTATION_STORAGE) || modality.as_deref() == Some("SEG") {
        return segmentation(&obj, path)
            .map(Object::Segmentation)
            .map_err(fail);
    }
    let frames = match obj.element(tags::NUMBER_OF_FRAMES) {
        Ok(e) => e
            .to_int::<u32>()
            .map_err(|e| fail(format!("NumberOfFrames: {e}")))?,
        Err(_) => 1,
    };
    if frames != 1
        || obj
            .element(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
            .is_ok()
    {
        return multiframe(&obj, path, frames)
            .map(Object::Slices)
            .map_err(fail);
    }
    slice(&obj, path)
        .map(|s| Object::Slices(vec![s]))
        .map_err(fail)
}

/// Each frame of a multi-frame image (Enhanced CT or MR: geometry and rescale in its
/// functional groups) as a slice of its series.
fn multiframe(obj: &DefaultDicomObject, path: &Path, frames: u32) -> Result<Vec<Slice>, String> {
    if frames == 0 || frames > MAX_FRAMES {
        return Err(format!("NumberOfFrames {frames} must be 1 to {MAX_FRAMES}"));
    }
    let (_, geometry) = frame_geometry(obj, frames)?;
    let series = text(obj, tags::SERIES_INSTANCE_UID, "SeriesInstanceUID")?;
    let description = text(obj, tags::SERIES_DESCRIPTION, "SeriesDescription").ok();
    let modality = text(obj, tags::MODALITY, "Modality")
        .ok()
        .filter(|m| !m.is_empty());
    let rescales: Vec<(f64, f64)> = geometry.iter().map(|g| g.rescale).collect();
    let (pixels, rows, columns) = decode(obj, &rescales)?;
    Ok(pixels
        .into_iter()
        .zip(&geometry)
        .enumerate()
        .map(|(f, (pixels, g))| Slice {
            path: PathBuf::from(format!("{} (frame {})", path.display(), f + 1)),
            series: series.clone(),
            description: description.clone(),
            modality: modality.clone(),
            position: g.position,
            orientation: g.orientation,
            pixel_spacing: g.pixel_spacing,
            thickness: None,
            rows,
            columns,
            pixels,
        })
        .collect())
}

/// A text attribute, trimmed.
fn text(obj: &InMemDicomObject, tag: Tag, name: &str) -> Result<String, String> {
    obj.element(tag)
        .map_err(|_| format!("no {name}"))?
        .to_str()
        .map(|s| s.trim().trim_end_matches('\0').to_owned())
        .map_err(|e| format!("{name}: {e}"))
}

/// `n` decimal numbers of `tag`.
fn numbers(obj: &InMemDicomObject, tag: Tag, name: &str, n: usize) -> Result<Vec<f64>, String> {
    let v = decimals(obj, tag, name)?.ok_or_else(|| format!("no {name}"))?;
    if v.len() != n {
        return Err(format!("{name} must be {n} finite numbers, is {v:?}"));
    }
    Ok(v)
}

fn slice(obj: &DefaultDicomObject, path: &Path) -> Result<Slice, String> {
    let text = |tag, name: &str| text(obj, tag, name);
    let floats = |tag, name: &str, n: usize| -> Result<Vec<f64>, String> {
        match decimals(obj, tag, name)? {
            None => Err(format!("no {name}: not a slice of a volume")),
            Some(_) => numbers(obj, tag, name, n),
        }
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
        return Err(format!("PixelSpacing {pixel_spacing:?} must be positive"));
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
    let (mut frames, rows, columns) = decode(obj, &[rescale(obj)?])?;
    let pixels = frames.pop().unwrap_or_default();
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

/// The one item of sequence `tag`, if present.
fn item(obj: &InMemDicomObject, tag: Tag) -> Option<&InMemDicomObject> {
    obj.element(tag).ok()?.items()?.first()
}

/// An unsigned number of `tag` (US or IS).
fn count(obj: &InMemDicomObject, tag: Tag, name: &str) -> Result<u32, String> {
    obj.element(tag)
        .map_err(|_| format!("no {name}"))?
        .to_int::<u32>()
        .map_err(|e| format!("{name}: {e}"))
}

/// The most frames a multi-frame file (image or SEG) may have.
pub const MAX_FRAMES: u32 = 65_536;

/// Where one frame of a multi-frame file lies.
#[derive(Debug, Clone, Copy)]
struct FrameGeometry {
    position: [f64; 3],
    orientation: [f64; 6],
    /// (between rows, between columns).
    pixel_spacing: [f64; 2],
    /// RescaleSlope and RescaleIntercept (Pixel Value Transformation), 1 and 0 when absent.
    rescale: (f64, f64),
}

/// The item of functional group `sequence` that holds `tag`: the frame's own, else the
/// shared one.
fn group<'a>(
    frame: &'a InMemDicomObject,
    shared: Option<&'a InMemDicomObject>,
    sequence: Tag,
    tag: Tag,
) -> Option<&'a InMemDicomObject> {
    [Some(frame), shared]
        .into_iter()
        .flatten()
        .find_map(|g| item(g, sequence).filter(|i| i.element(tag).is_ok()))
}

/// The per-frame functional groups of a multi-frame file (`frames` of them) and each frame's
/// geometry: its own group's attribute, else the shared group's. Every frame must share the
/// first one's orientation and pixel spacing.
fn frame_geometry(
    obj: &DefaultDicomObject,
    frames: u32,
) -> Result<(&[InMemDicomObject], Vec<FrameGeometry>), String> {
    let per_frame = obj
        .element(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .ok()
        .and_then(|e| e.items())
        .ok_or_else(|| {
            "no PerFrameFunctionalGroupsSequence: where does each frame lie?".to_owned()
        })?;
    if per_frame.len() != frames as usize {
        return Err(format!(
            "{} per-frame functional groups for NumberOfFrames {frames}",
            per_frame.len()
        ));
    }
    let shared = item(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE);
    let numbers_of = |frame, sequence, tag, name: &str, n| {
        group(frame, shared, sequence, tag)
            .ok_or(format!("frame without {name}"))
            .and_then(|i| numbers(i, tag, name, n))
    };
    let mut out: Vec<FrameGeometry> = Vec::with_capacity(per_frame.len());
    for (f, frame) in per_frame.iter().enumerate() {
        let o = numbers_of(
            frame,
            tags::PLANE_ORIENTATION_SEQUENCE,
            tags::IMAGE_ORIENTATION_PATIENT,
            "ImageOrientationPatient",
            6,
        )?;
        let s = numbers_of(
            frame,
            tags::PIXEL_MEASURES_SEQUENCE,
            tags::PIXEL_SPACING,
            "PixelSpacing",
            2,
        )?;
        let p = numbers_of(
            frame,
            tags::PLANE_POSITION_SEQUENCE,
            tags::IMAGE_POSITION_PATIENT,
            "ImagePositionPatient",
            3,
        )?;
        let rescale = match group(
            frame,
            shared,
            tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE,
            tags::RESCALE_SLOPE,
        ) {
            Some(t) => rescale(t)?,
            None => rescale(obj)?,
        };
        let g = FrameGeometry {
            position: [p[0], p[1], p[2]],
            orientation: std::array::from_fn(|i| o[i]),
            pixel_spacing: [s[0], s[1]],
            rescale,
        };
        if g.pixel_spacing.iter().any(|v| *v <= 0.0) {
            return Err(format!(
                "frame {}: PixelSpacing {s:?} must be positive",
                f + 1
            ));
        }
        if let Some(first) = out.first()
            && !(same(&first.orientation, &g.orientation)
                && same(&first.pixel_spacing, &g.pixel_spacing))
        {
            return Err(format!(
                "frame {} has another orientation or pixel spacing than frame 1",
                f + 1
            ));
        }
        out.push(g);
    }
    Ok((per_frame, out))
}

/// Reads a DICOM Segmentation: its referenced series, segments, frame geometry (shared and
/// per-frame functional groups) and pixels (BINARY, one bit per pixel; or FRACTIONAL,
/// inside where at least half the maximum). Frames must share orientation and pixel spacing.
fn segmentation(obj: &DefaultDicomObject, path: &Path) -> Result<RawSegmentation, String> {
    let series = item(obj, tags::REFERENCED_SERIES_SEQUENCE)
        .ok_or_else(|| {
            "no ReferencedSeriesSequence: the SEG does not say which series it segments".to_owned()
        })
        .and_then(|i| text(i, tags::SERIES_INSTANCE_UID, "referenced SeriesInstanceUID"))?;
    let mut segments = Vec::new();
    for s in obj
        .element(tags::SEGMENT_SEQUENCE)
        .ok()
        .and_then(|e| e.items())
        .ok_or_else(|| "no SegmentSequence".to_owned())?
    {
        let number = count(s, tags::SEGMENT_NUMBER, "SegmentNumber")?;
        let number = u16::try_from(number)
            .ok()
            .filter(|n| (1..=255).contains(n))
            .ok_or(format!("SegmentNumber {number} must be 1 to 255"))?;
        let label = text(s, tags::SEGMENT_LABEL, "SegmentLabel").unwrap_or_default();
        segments.push((number, label));
    }
    segments.sort();
    if segments.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err("two segments share a SegmentNumber".into());
    }
    let kind = text(obj, tags::SEGMENTATION_TYPE, "SegmentationType")?;
    let bits = count(obj, tags::BITS_ALLOCATED, "BitsAllocated")?;
    let threshold = match (kind.as_str(), bits) {
        ("BINARY", 1) => None,
        ("FRACTIONAL", 8) => {
            let max = count(
                obj,
                tags::MAXIMUM_FRACTIONAL_VALUE,
                "MaximumFractionalValue",
            )?;
            Some(max.max(1).div_ceil(2))
        }
        (kind, bits) => {
            return Err(format!(
                "SegmentationType {kind} with BitsAllocated {bits}: a SEG is BINARY (1 bit) or \
                 FRACTIONAL (8 bits)"
            ));
        }
    };
    let (rows, columns) = (
        count(obj, tags::ROWS, "Rows")?,
        count(obj, tags::COLUMNS, "Columns")?,
    );
    let frames = count(obj, tags::NUMBER_OF_FRAMES, "NumberOfFrames")?;
    if rows == 0 || columns == 0 || rows > 65_535 || columns > 65_535 {
        return Err(format!("{rows} rows by {columns} columns"));
    }
    if frames == 0 || frames > MAX_FRAMES {
        return Err(format!("NumberOfFrames {frames} must be 1 to {MAX_FRAMES}"));
    }
    let (per_frame, geometry) = frame_geometry(obj, frames)?;
    let mut placed = Vec::with_capacity(frames as usize);
    for (f, (frame, g)) in per_frame.iter().zip(&geometry).enumerate() {
        let segment = item(frame, tags::SEGMENT_IDENTIFICATION_SEQUENCE)
            .ok_or(format!("frame {} names no segment", f + 1))
            .and_then(|i| {
                count(
                    i,
                    tags::REFERENCED_SEGMENT_NUMBER,
                    "ReferencedSegmentNumber",
                )
            })?;
        if !segments.iter().any(|(n, _)| u32::from(*n) == segment) {
            return Err(format!(
                "frame {} draws segment {segment}, which the SegmentSequence does not define",
                f + 1
            ));
        }
        placed.push(SegFrame {
            position: g.position,
            segment: segment as u16,
        });
    }
    let (orientation, spacing) = (geometry[0].orientation, geometry[0].pixel_spacing);
    let ts = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_owned();
    let pixels = obj
        .element(tags::PIXEL_DATA)
        .map_err(|_| "no PixelData".to_owned())?;
    if pixels.fragments().is_some() {
        return Err(format!(
            "compressed SEG pixel data (transfer syntax {ts}) is not read"
        ));
    }
    let bytes = pixels.to_bytes().map_err(|e| format!("PixelData: {e}"))?;
    let n = rows as usize * columns as usize * frames as usize;
    let inside: Vec<bool> = match threshold {
        None => {
            if bytes.len() < n.div_ceil(8) {
                return Err(format!(
                    "PixelData holds {} bytes, {frames} frames of {rows} x {columns} bits need {}",
                    bytes.len(),
                    n.div_ceil(8)
                ));
            }
            // Bits run on across frames, least significant bit first.
            (0..n).map(|i| bytes[i / 8] >> (i % 8) & 1 == 1).collect()
        }
        Some(half) => {
            if bytes.len() < n {
                return Err(format!(
                    "PixelData holds {} bytes, {frames} frames of {rows} x {columns} need {n}",
                    bytes.len()
                ));
            }
            bytes[..n].iter().map(|&v| u32::from(v) >= half).collect()
        }
    };
    Ok(RawSegmentation {
        path: path.to_owned(),
        series,
        segments,
        orientation,
        pixel_spacing: spacing,
        rows: rows as usize,
        columns: columns as usize,
        frames: placed,
        inside,
    })
}

fn same(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4)
}

/// The pixels of each frame of a single-sample image, frame `f` rescaled by `rescales[f]`
/// (slope, intercept; one per frame the file declares).
fn decode(
    obj: &DefaultDicomObject,
    rescales: &[(f64, f64)],
) -> Result<(Vec<Vec<f32>>, usize, usize), String> {
    let ts = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_owned();
    check_pixel_module(obj)?;
    let data = obj
        .decode_pixel_data()
        .map_err(|e| format!("pixel data (transfer syntax {ts}): {e}"))?;
    if data.number_of_frames() as usize != rescales.len() {
        return Err(format!(
            "{} frames of pixel data where the file describes {}",
            data.number_of_frames(),
            rescales.len()
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
    let frames = rescales
        .iter()
        .enumerate()
        .map(|(f, &(slope, intercept))| {
            let stored: Vec<f32> = data
                .to_vec_frame_with_options(f as u32, &raw)
                .map_err(|e| format!("pixel data of frame {}: {e}", f + 1))?;
            Ok(stored
                .iter()
                .map(|v| (f64::from(*v) * slope + intercept) as f32)
                .collect())
        })
        .collect::<Result<Vec<Vec<f32>>, String>>()?;
    Ok((frames, data.rows() as usize, data.columns() as usize))
}

/// Decimal strings (DS) of `tag`, read from the value's bytes: a file rewritten by a tool
/// that lost the VR (so the element reads as UN) still says "10\-20\30". `None` when absent.
fn decimals(obj: &InMemDicomObject, tag: Tag, name: &str) -> Result<Option<Vec<f64>>, String> {
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
fn rescale(obj: &InMemDicomObject) -> Result<(f64, f64), String> {
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
    let frames = match obj.element(tags::NUMBER_OF_FRAMES) {
        Ok(e) => e
            .to_int::<u32>()
            .map_err(|e| format!("NumberOfFrames: {e}"))?,
        Err(_) => 1,
    };
    // Native pixel data must hold the frames it declares; checked before decoding, so that a
    // small file cannot make the decoder allocate for 65535 x 65535 pixels.
    let needed =
        u64::from(rows) * u64::from(columns) * u64::from(allocated / 8) * u64::from(frames);
    let pixels = obj
        .element(tags::PIXEL_DATA)
        .map_err(|_| "no PixelData".to_owned())?;
    if let Some(len) = pixels.header().len.get()
        && u64::from(len) < needed
    {
        return Err(format!(
            "PixelData holds {len} bytes, {frames} frame(s) of {rows} x {columns} pixels of \
             {allocated} bits need {needed}"
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

/// A series' grid in LPS millimetres, for placing a SEG's frames on it.
struct Grid {
    origin: [f64; 3],
    row_dir: [f64; 3],
    col_dir: [f64; 3],
    normal: [f64; 3],
    /// Between rows, between columns, between slices.
    spacing: [f64; 3],
    orientation: [f64; 6],
    rows: usize,
    columns: usize,
    slices: usize,
}

/// A SEG's frames as a label map in the series' voxel order (column fastest, then row, then
/// slice): each frame on the slice at its position, its pixels set to its segment number.
fn place(seg: &RawSegmentation, g: &Grid) -> Result<Vec<u8>, String> {
    if (seg.rows, seg.columns) != (g.rows, g.columns) {
        return Err(format!(
            "frames of {}x{} pixels for slices of {}x{}",
            seg.columns, seg.rows, g.columns, g.rows
        ));
    }
    if !same(&seg.orientation, &g.orientation)
        || !same(&seg.pixel_spacing, &[g.spacing[0], g.spacing[1]])
    {
        return Err(format!(
            "frames oriented {:?} with pixel spacing {:?}, its series {:?} with {:?}",
            seg.orientation,
            seg.pixel_spacing,
            g.orientation,
            [g.spacing[0], g.spacing[1]]
        ));
    }
    let plane = g.rows * g.columns;
    let mut label = vec![0u8; plane * g.slices];
    for (f, frame) in seg.frames.iter().enumerate() {
        let d: [f64; 3] = std::array::from_fn(|a| frame.position[a] - g.origin[a]);
        let k = dot(d, g.normal) / g.spacing[2];
        let (i, j) = (
            dot(d, g.row_dir) / g.spacing[1],
            dot(d, g.col_dir) / g.spacing[0],
        );
        let slice = k.round();
        if (k - slice).abs() > 0.05
            || i.abs() > 0.05
            || j.abs() > 0.05
            || slice < 0.0
            || slice >= g.slices as f64
        {
            return Err(format!(
                "frame {} lies at {:?} mm, on no slice of its series",
                f + 1,
                frame.position
            ));
        }
        let start = slice as usize * plane;
        let pixels = &seg.inside[f * plane..(f + 1) * plane];
        for (v, _) in label[start..start + plane]
            .iter_mut()
            .zip(pixels)
            .filter(|(_, inside)| **inside)
        {
            if *v != 0 && u16::from(*v) != frame.segment {
                return Err(format!(
                    "segments {} and {} overlap: a label map holds one class per voxel",
                    v, frame.segment
                ));
            }
            *v = frame.segment as u8;
        }
    }
    Ok(label)
}

/// Stacks a series' slices along the slice normal into a RAS volume, with the label map of
/// its SEG when there is one.
fn assemble(
    uid: String,
    mut slices: Vec<Slice>,
    seg: Option<RawSegmentation>,
) -> Result<Series, DicomError> {
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
    let segmentation = match seg {
        None => None,
        Some(seg) => {
            let grid = Grid {
                origin,
                row_dir,
                col_dir,
                normal,
                spacing: [dr, dc, step],
                orientation: o,
                rows,
                columns,
                slices: slices.len(),
            };
            let data = place(&seg, &grid).map_err(|reason| DicomError::File {
                path: seg.path.clone(),
                reason,
            })?;
            Some(Segmentation {
                path: seg.path,
                segments: seg.segments,
                label: LabelVolume {
                    dims: turn.dims(dims),
                    data: turn.apply(&data, dims, 1),
                },
            })
        }
    };
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
        segmentation,
    })
}

/// A single slice's extent along the normal: its SliceThickness, else 1 mm.
fn first_thickness(slices: &[Slice]) -> f64 {
    slices[0].thickness.unwrap_or(1.0)
}

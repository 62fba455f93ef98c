//! The Medical Segmentation Decathlon layout: `dataset.json`, `imagesTr/*.nii.gz`,
//! `labelsTr/*.nii.gz`. Also written by `medmesh data prepare`.

use std::fs;
use std::path::{Path, PathBuf};

use ndarray::{Array, IxDyn, ShapeBuilder};
use nifti::writer::WriterOptions;
use nifti::{IntoNdArray, NiftiObject};
use serde::{Deserialize, Serialize};

use super::{Case, DataError, LabelVolume, Volume, io_error};
use crate::geometry::{Affine, Reorientation};

/// The parts of `dataset.json` medmesh reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetJson {
    /// Dataset name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Channel index -> modality name.
    #[serde(default)]
    pub modality: std::collections::BTreeMap<String, String>,
    /// Class index -> class name.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Number of training cases.
    #[serde(rename = "numTraining", default)]
    pub num_training: usize,
    /// Training pairs, paths relative to the dataset directory.
    pub training: Vec<TrainingPair>,
}

/// One image/label pair of `dataset.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingPair {
    /// Image path, e.g. `./imagesTr/case_000.nii.gz`.
    pub image: String,
    /// Label path, e.g. `./labelsTr/case_000.nii.gz`.
    pub label: String,
}

/// Reads `dir/dataset.json`.
pub fn read_meta(dir: &Path) -> Result<DatasetJson, DataError> {
    let json_path = dir.join("dataset.json");
    let text = fs::read_to_string(&json_path).map_err(io_error(&json_path))?;
    serde_json::from_str(&text).map_err(|e| DataError::DatasetJson {
        path: json_path,
        reason: e.to_string(),
    })
}

/// Reads every training case of an MSD-layout dataset, checking channels and label range.
pub fn read_dataset(dir: &Path, channels: usize, classes: usize) -> Result<Vec<Case>, DataError> {
    let reader = DatasetReader::open(dir, channels, classes)?;
    (0..reader.len()).map(|i| reader.read(i)).collect()
}

/// An MSD-layout dataset read one case at a time, so a dataset larger than memory can be
/// sliced case by case.
#[derive(Debug, Clone)]
pub struct DatasetReader {
    dir: PathBuf,
    meta: DatasetJson,
    channels: usize,
    classes: usize,
}

impl DatasetReader {
    /// Reads `dir/dataset.json`; refuses a dataset without training cases.
    pub fn open(dir: &Path, channels: usize, classes: usize) -> Result<Self, DataError> {
        let meta = read_meta(dir)?;
        if meta.training.is_empty() {
            return Err(DataError::Empty {
                path: dir.to_owned(),
            });
        }
        Ok(Self {
            dir: dir.to_owned(),
            meta,
            channels,
            classes,
        })
    }

    /// Number of training cases.
    pub fn len(&self) -> usize {
        self.meta.training.len()
    }

    /// Whether there are none (never, once opened).
    pub fn is_empty(&self) -> bool {
        self.meta.training.is_empty()
    }

    /// Case `i`, checking channels, label range and that image and label share a grid.
    pub fn read(&self, i: usize) -> Result<Case, DataError> {
        let pair = &self.meta.training[i];
        let image_path = self.dir.join(&pair.image);
        let label_path = self.dir.join(&pair.label);
        let image = read_image(&image_path)?;
        if image.channels != self.channels {
            return Err(DataError::Channels {
                path: image_path,
                found: image.channels,
                expected: self.channels,
            });
        }
        let label = read_label(&label_path, self.classes)?;
        if label.dims != image.dims {
            return Err(DataError::ShapeMismatch {
                image: image_path,
                label: label_path,
                image_shape: image.dims.to_vec(),
                label_shape: label.dims.to_vec(),
            });
        }
        Ok(Case {
            name: case_name(&image_path),
            image,
            label,
        })
    }
}

fn case_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.trim_end_matches(".gz")
        .trim_end_matches(".nii")
        .to_owned()
}

/// Reads a NIfTI volume as f32 with x fastest: `[x, y, z]` or `[x, y, z, channels]`.
pub fn read_nifti(path: &Path) -> Result<(Vec<usize>, Vec<f32>), DataError> {
    let bytes = fs::read(path).map_err(io_error(path))?;
    decode_nifti(&bytes, path)
}

/// Decodes a single-file NIfTI-1 volume (`.nii`, or gzip-compressed `.nii.gz`, told apart
/// by the gzip magic bytes, not the name) as f32 with x fastest. `path` only names the
/// source in errors. The header's declared voxel data is checked against what `bytes`
/// can hold before anything is allocated for it.
pub fn decode_nifti(bytes: &[u8], path: &Path) -> Result<(Vec<usize>, Vec<f32>), DataError> {
    decode_with_header(bytes, path).map(|(shape, data, _)| (shape, data))
}

/// [`decode_nifti`], with the header (for the volume's geometry).
fn decode_with_header(
    bytes: &[u8],
    path: &Path,
) -> Result<(Vec<usize>, Vec<f32>, nifti::NiftiHeader), DataError> {
    let nifti_err = |reason: String| DataError::Nifti {
        path: path.to_owned(),
        reason,
    };
    let gzipped = bytes.starts_with(&[0x1f, 0x8b]);
    let capacity = if gzipped {
        bytes.len().saturating_mul(crate::MAX_DEFLATE_RATIO)
    } else {
        bytes.len()
    };
    let header = if gzipped {
        nifti::NiftiHeader::from_reader(flate2::read::GzDecoder::new(bytes))
    } else {
        nifti::NiftiHeader::from_reader(bytes)
    }
    .map_err(|e| nifti_err(e.to_string()))?;
    let declared = declared_bytes(&header).ok_or_else(|| {
        nifti_err("the header's dimensions, data type or bit depth are invalid or disagree".into())
    })?;
    let offset = header.vox_offset;
    if !(offset.is_finite() && offset >= 0.0 && (offset as usize) <= capacity) {
        return Err(nifti_err(format!(
            "the header puts the voxel data at offset {offset}, beyond the file's {} bytes",
            bytes.len()
        )));
    }
    check_extensions(bytes, gzipped, &header, offset as usize).map_err(nifti_err)?;
    if declared > capacity {
        return Err(nifti_err(format!(
            "the header declares {declared} bytes of voxel data, more than the file's {} bytes can hold",
            bytes.len()
        )));
    }
    let kept = header.clone();
    let object = if gzipped {
        nifti::InMemNiftiObject::from_reader(flate2::read::GzDecoder::new(bytes))
    } else {
        nifti::InMemNiftiObject::from_reader(bytes)
    }
    .map_err(|e| nifti_err(e.to_string()))?;
    let array = object
        .into_volume()
        .into_ndarray::<f32>()
        .map_err(|e| nifti_err(e.to_string()))?;
    let shape = array.shape().to_vec();
    // An empty axis would make every later step (slicing, resizing) meaningless.
    if shape.is_empty() || shape.contains(&0) {
        return Err(DataError::Dimensions {
            path: path.to_owned(),
            shape,
        });
    }
    // Reversing the axes makes logical iteration order x-fastest, whatever the memory order.
    let data: Vec<f32> = array.reversed_axes().iter().copied().collect();
    Ok((shape, data, kept))
}

/// A volume as read: its shape (x, y, z first, then channels), x-fastest data, and its
/// voxel-to-RAS affine (millimetres) after reorientation.
type Read = (Vec<usize>, Vec<f32>, Affine);

/// Reads a NIfTI file and brings it to RAS (shape and spacing as reoriented).
fn read_ras(path: &Path) -> Result<Read, DataError> {
    let bytes = fs::read(path).map_err(io_error(path))?;
    let (shape, data, header) = decode_with_header(&bytes, path)?;
    let affine = Affine::from_nifti(&header);
    let geometry = |source| DataError::Geometry {
        path: path.to_owned(),
        source,
    };
    let turn = Reorientation::to_ras(&affine).map_err(geometry)?;
    let dims = [0, 1, 2].map(|a| shape.get(a).copied().unwrap_or(1));
    let channels = shape.iter().skip(3).product::<usize>().max(1);
    let placed = turn.affine(&affine, dims);
    if turn.is_identity() {
        return Ok((shape, data, placed));
    }
    let data = turn.apply(&data, dims, channels);
    let mut shape = shape;
    for (a, d) in turn.dims(dims).into_iter().enumerate() {
        if let Some(s) = shape.get_mut(a) {
            *s = d;
        }
    }
    Ok((shape, data, placed))
}

/// Walks the extension chain between the header and the voxel data: each extension must
/// be at least its own 8-byte preamble and end before the data starts. (The nifti crate
/// reserves whatever size an extension claims, so a 2 kB file could ask for gigabytes.)
fn check_extensions(
    bytes: &[u8],
    gzipped: bool,
    header: &nifti::NiftiHeader,
    data_offset: usize,
) -> Result<(), String> {
    use std::io::Read;
    let mut head = Vec::new();
    let source: Box<dyn Read + '_> = if gzipped {
        Box::new(flate2::read::GzDecoder::new(bytes))
    } else {
        Box::new(bytes)
    };
    source
        .take(data_offset as u64)
        .read_to_end(&mut head)
        .map_err(|e| format!("reading the header and extensions: {e}"))?;
    // No extender bytes, or extender says "none": nothing to walk.
    if head.len() < 352 || head[348] == 0 {
        return Ok(());
    }
    let mut at = 352;
    while at < data_offset {
        let Some(size) = head.get(at..at + 4) else {
            return Err(format!("extension at byte {at} is cut off"));
        };
        let size: [u8; 4] = size.try_into().unwrap_or_default();
        let size = match header.endianness {
            nifti::Endianness::Little => i32::from_le_bytes(size),
            nifti::Endianness::Big => i32::from_be_bytes(size),
        };
        let end = usize::try_from(size)
            .ok()
            .filter(|s| *s >= 8)
            .and_then(|s| at.checked_add(s))
            .filter(|end| *end <= data_offset);
        match end {
            Some(end) => at = end,
            None => {
                return Err(format!(
                    "extension at byte {at} claims {size} bytes, past the voxel data at byte {data_offset}"
                ));
            }
        }
    }
    Ok(())
}

/// Voxel bytes the header declares, or `None` when its dimensions or bit depth make no sense.
fn declared_bytes(header: &nifti::NiftiHeader) -> Option<usize> {
    let rank = usize::from(header.dim[0]);
    if !(1..=7).contains(&rank) {
        return None;
    }
    let voxels = header.dim[1..=rank]
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(usize::from(d)))?;
    // The reader sizes the data by `bitpix` but converts it by `datatype`: they must agree,
    // or the conversion finds the wrong number of bytes (and the nifti crate panics).
    let element = header.data_type().ok()?.size_of();
    if usize::try_from(header.bitpix).ok()? != element * 8 {
        return None;
    }
    voxels.checked_mul(element)
}

/// Reads an image volume (3D, or 4D with channels) and brings it to RAS.
pub fn read_image(path: &Path) -> Result<Volume, DataError> {
    let (shape, data, placed) = read_ras(path)?;
    let spacing = placed.spacing();
    let (dims, channels) = match shape.as_slice() {
        [x, y, z] => ([*x, *y, *z], 1),
        [x, y, z, c] => ([*x, *y, *z], *c),
        [x, y] => ([*x, *y, 1], 1),
        _ => {
            return Err(DataError::Dimensions {
                path: path.to_owned(),
                shape,
            });
        }
    };
    if let Some(bad) = data.iter().find(|v| !v.is_finite()) {
        return Err(DataError::Nifti {
            path: path.to_owned(),
            reason: format!("contains a non-finite voxel value ({bad})"),
        });
    }
    Ok(Volume {
        dims,
        spacing,
        channels,
        data,
    })
}

/// Reads a label volume, brought to RAS, its values checked against `classes`.
pub fn read_label(path: &Path, classes: usize) -> Result<LabelVolume, DataError> {
    read_label_placed(path, classes).map(|(label, _)| label)
}

/// [`read_label`], with where its file places it: the voxel-to-RAS affine (millimetres)
/// after reorientation.
pub fn read_label_placed(path: &Path, classes: usize) -> Result<(LabelVolume, Affine), DataError> {
    let (shape, data, placed) = read_ras(path)?;
    let dims = match shape.as_slice() {
        [x, y, z] => [*x, *y, *z],
        [x, y] => [*x, *y, 1],
        [x, y, z, 1] => [*x, *y, *z],
        _ => {
            return Err(DataError::Dimensions {
                path: path.to_owned(),
                shape,
            });
        }
    };
    let labels = data
        .iter()
        .map(|v| {
            if v.fract() == 0.0 && *v >= 0.0 && (*v as usize) < classes {
                Ok(*v as u8)
            } else {
                Err(DataError::LabelOutOfRange {
                    path: path.to_owned(),
                    value: *v,
                    classes,
                })
            }
        })
        .collect::<Result<Vec<u8>, _>>()?;
    Ok((LabelVolume { dims, data: labels }, placed))
}

/// Writes cases as an MSD-layout dataset of MRI images in `dir` (created if needed).
pub fn write_dataset(
    dir: &Path,
    name: &str,
    description: &str,
    class_names: &[&str],
    cases: &[Case],
) -> Result<(), DataError> {
    write_dataset_of(dir, name, description, "MRI", class_names, cases)
}

/// Writes cases as an MSD-layout dataset in `dir` (created if needed), every channel of
/// `modality` ("CT", "MRI", ...) in `dataset.json`.
pub fn write_dataset_of(
    dir: &Path,
    name: &str,
    description: &str,
    modality: &str,
    class_names: &[&str],
    cases: &[Case],
) -> Result<(), DataError> {
    for sub in ["imagesTr", "labelsTr"] {
        let p = dir.join(sub);
        fs::create_dir_all(&p).map_err(io_error(&p))?;
    }
    let mut training = Vec::with_capacity(cases.len());
    for case in cases {
        let file = format!("{}.nii.gz", case.name);
        write_volume(&dir.join("imagesTr").join(&file), &case.image)?;
        write_labels(
            &dir.join("labelsTr").join(&file),
            &case.label,
            case.image.spacing,
        )?;
        training.push(TrainingPair {
            image: format!("./imagesTr/{file}"),
            label: format!("./labelsTr/{file}"),
        });
    }
    let meta = DatasetJson {
        name: name.to_owned(),
        description: description.to_owned(),
        modality: (0..cases.first().map_or(1, |c| c.image.channels))
            .map(|c| (c.to_string(), modality.to_owned()))
            .collect(),
        labels: class_names
            .iter()
            .enumerate()
            .map(|(i, n)| (i.to_string(), (*n).to_owned()))
            .collect(),
        num_training: cases.len(),
        training,
    };
    let path = dir.join("dataset.json");
    let text = serde_json::to_string_pretty(&meta).map_err(|e| DataError::DatasetJson {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    fs::write(&path, text).map_err(io_error(&path))
}

fn write_volume(path: &PathBuf, v: &Volume) -> Result<(), DataError> {
    let [x, y, z] = v.dims;
    let shape = if v.channels == 1 {
        vec![x, y, z]
    } else {
        vec![x, y, z, v.channels]
    };
    write_array(path, &shape, v.data.clone(), v.spacing)
}

fn write_labels(path: &PathBuf, l: &LabelVolume, spacing: [f64; 3]) -> Result<(), DataError> {
    write_array(path, &l.dims, l.data.clone(), spacing)
}

/// A header that says what medmesh's volumes are: RAS, `spacing` millimetres apart (as
/// sform and qform, both "scanner anatomical").
fn ras_header(spacing: [f64; 3]) -> nifti::NiftiHeader {
    let [a, b, c] = spacing.map(|s| s as f32);
    nifti::NiftiHeader {
        pixdim: [1.0, a, b, c, 1.0, 1.0, 1.0, 1.0],
        sform_code: 1,
        qform_code: 1,
        srow_x: [a, 0.0, 0.0, 0.0],
        srow_y: [0.0, b, 0.0, 0.0],
        srow_z: [0.0, 0.0, c, 0.0],
        xyzt_units: 2, // millimetres
        ..nifti::NiftiHeader::default()
    }
}

/// Writes x-fastest `data` of `shape` as NIfTI (gzip-compressed for `.nii.gz`).
fn write_array<A: nifti::DataElement + bytemuck::Pod>(
    path: &PathBuf,
    shape: &[usize],
    data: Vec<A>,
    spacing: [f64; 3],
) -> Result<(), DataError> {
    let err = |reason: String| DataError::Nifti {
        path: path.clone(),
        reason,
    };
    let array = Array::from_shape_vec(IxDyn(shape).f(), data).map_err(|e| err(e.to_string()))?;
    let header = ras_header(spacing);
    WriterOptions::new(path)
        .reference_header(&header)
        .write_nifti(&array)
        .map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(name: &str, dims: [usize; 3]) -> Case {
        let n: usize = dims.iter().product();
        Case {
            name: name.into(),
            image: Volume {
                dims,
                spacing: [1.0, 0.5, 2.5],
                channels: 1,
                data: (0..n).map(|i| i as f32 * 0.5).collect(),
            },
            label: LabelVolume {
                dims,
                data: (0..n).map(|i| (i % 3 == 0) as u8).collect(),
            },
        }
    }

    #[test]
    fn round_trip_keeps_orientation() {
        let dir = tempfile::tempdir().unwrap();
        let cases = vec![case("a", [5, 4, 3]), case("b", [6, 2, 2])];
        write_dataset(dir.path(), "t", "test", &["background", "lesion"], &cases).unwrap();
        let back = read_dataset(dir.path(), 1, 2).unwrap();
        assert_eq!(back, cases);
    }

    /// A dataset whose files another tool wrote in a flipped and permuted orientation
    /// comes back in RAS, image and label alike, with its spacing.
    #[test]
    fn volumes_are_brought_to_ras() {
        fn write<A: nifti::DataElement + bytemuck::Pod>(
            path: &Path,
            dims: [usize; 3],
            data: Vec<A>,
            h: &nifti::NiftiHeader,
        ) {
            let array = Array::from_shape_vec(IxDyn(&dims).f(), data).unwrap();
            WriterOptions::new(path)
                .reference_header(h)
                .write_nifti(&array)
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let ras = case("a", [2, 3, 4]);
        write_dataset(
            dir.path(),
            "t",
            "test",
            &["bg", "fg"],
            std::slice::from_ref(&ras),
        )
        .unwrap();
        // Stored as a scanner might: axis 0 runs right to left (1 mm), axis 1 is the RAS
        // volume's axis 2 (S, 2.5 mm), axis 2 its axis 1 reversed (P, 0.5 mm).
        let stored = Reorientation {
            axes: [0, 2, 1],
            flip: [true, false, true],
        };
        let header = nifti::NiftiHeader {
            pixdim: [1.0, 1.0, 2.5, 0.5, 1.0, 1.0, 1.0, 1.0],
            sform_code: 1,
            srow_x: [-1.0, 0.0, 0.0, 0.0],
            srow_y: [0.0, 0.0, -0.5, 0.0],
            srow_z: [0.0, 2.5, 0.0, 0.0],
            ..nifti::NiftiHeader::default()
        };
        let dims = stored.dims(ras.image.dims);
        assert_eq!(dims, [2, 4, 3]);
        let image = stored.apply(&ras.image.data, ras.image.dims, 1);
        let label = stored.apply(&ras.label.data, ras.label.dims, 1);
        assert_ne!(image, ras.image.data);
        write(&dir.path().join("imagesTr/a.nii.gz"), dims, image, &header);
        write(&dir.path().join("labelsTr/a.nii.gz"), dims, label, &header);
        let back = read_dataset(dir.path(), 1, 2).unwrap();
        assert_eq!(back, vec![ras]);
    }

    #[test]
    fn defects_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(
            dir.path(),
            "t",
            "test",
            &["bg", "fg"],
            &[case("a", [4, 4, 2])],
        )
        .unwrap();

        let err = read_dataset(dir.path(), 1, 1).unwrap_err();
        assert!(
            matches!(err, DataError::LabelOutOfRange { value, .. } if value == 1.0),
            "{err}"
        );
        assert!(err.to_string().contains("labelsTr/a.nii.gz"), "{err}");

        let err = read_dataset(dir.path(), 2, 2).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::Channels {
                    found: 1,
                    expected: 2,
                    ..
                }
            ),
            "{err}"
        );

        let img = dir.path().join("imagesTr/a.nii.gz");
        let bytes = fs::read(&img).unwrap();
        fs::write(&img, &bytes[..bytes.len() / 2]).unwrap();
        let err = read_dataset(dir.path(), 1, 2).unwrap_err();
        assert!(matches!(err, DataError::Nifti { .. }), "{err}");
        assert!(err.to_string().contains("imagesTr/a.nii.gz"), "{err}");

        // A label of another shape.
        write_labels(
            &dir.path().join("labelsTr/a.nii.gz"),
            &case("a", [4, 3, 2]).label,
            [1.0; 3],
        )
        .unwrap();
        write_volume(&img, &case("a", [4, 4, 2]).image).unwrap();
        let err = read_dataset(dir.path(), 1, 2).unwrap_err();
        assert!(matches!(err, DataError::ShapeMismatch { .. }), "{err}");

        // A volume whose header claims an empty axis is refused, not sliced.
        let raw = dir.path().join("zero.nii");
        write_volume(&raw, &case("z", [4, 4, 2]).image).unwrap();
        let mut bytes = fs::read(&raw).unwrap();
        bytes[42..44].copy_from_slice(&0i16.to_le_bytes()); // dim[1] of the NIfTI-1 header
        fs::write(&raw, bytes).unwrap();
        let err = read_nifti(&raw).unwrap_err();
        assert!(err.to_string().contains("zero.nii"), "{err}");

        // A header claiming a 30000^3 volume in a file of a few hundred bytes is refused
        // before anything is allocated for it, plain or gzipped.
        let mut bytes = fs::read(&raw).unwrap();
        for axis in 0..3 {
            let at = 42 + 2 * axis;
            bytes[at..at + 2].copy_from_slice(&30_000i16.to_le_bytes());
        }
        let err = decode_nifti(&bytes, Path::new("huge.nii")).unwrap_err();
        assert!(
            err.to_string().contains("huge.nii") && err.to_string().contains("declares"),
            "{err}"
        );
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &bytes).unwrap();
        let err = decode_nifti(&gz.finish().unwrap(), Path::new("huge.nii.gz")).unwrap_err();
        assert!(err.to_string().contains("declares"), "{err}");

        // Found by `fuzz/run.sh` (target `nifti`): a 1.6 kB file with an extension claiming
        // 1.6 GB made the nifti crate reserve it; now refused by name.
        let mut bytes = fs::read(&raw).unwrap();
        let data_at = 352 + 16;
        bytes[108..112].copy_from_slice(&(data_at as f32).to_le_bytes()); // vox_offset
        bytes[348] = 1;
        let mut with_ext = bytes[..352].to_vec();
        with_ext.extend_from_slice(&1_600_000_000i32.to_le_bytes());
        with_ext.extend_from_slice(&[0; 12]);
        with_ext.extend_from_slice(&bytes[352..]);
        let err = decode_nifti(&with_ext, Path::new("ext.nii")).unwrap_err();
        assert!(err.to_string().contains("claims 1600000000 bytes"), "{err}");

        // Found by `fuzz/run.sh` (target `nifti`): a bit depth that disagrees with the data
        // type made the nifti crate panic while converting; now a named error.
        let mut bytes = fs::read(&raw).unwrap();
        bytes[42..44].copy_from_slice(&4i16.to_le_bytes());
        bytes[72..74].copy_from_slice(&8i16.to_le_bytes()); // bitpix 8 with datatype float32
        let err = decode_nifti(&bytes, Path::new("mixed.nii")).unwrap_err();
        assert!(err.to_string().contains("disagree"), "{err}");

        fs::write(
            dir.path().join("dataset.json"),
            r#"{"name":"x","training":[]}"#,
        )
        .unwrap();
        assert!(matches!(
            read_dataset(dir.path(), 1, 2),
            Err(DataError::Empty { .. })
        ));
        fs::write(dir.path().join("dataset.json"), "{").unwrap();
        assert!(matches!(
            read_dataset(dir.path(), 1, 2),
            Err(DataError::DatasetJson { .. })
        ));
    }
}

//! Medical image formats for medmesh, without any training machinery (so the fuzzers and
//! tools that only read data stay light):
//!
//! * [`msd`]: the Medical Segmentation Decathlon layout (`dataset.json`, NIfTI files).
//! * [`png_pairs`]: `images/NAME.png` with `masks/NAME.png`.
//!
//! Both decoders take bytes ([`msd::decode_nifti`], [`png_pairs::decode_gray`]) as well as
//! paths, and check a file's declared sizes against its length before allocating: a
//! 300-byte file cannot make a node reserve gigabytes.

pub mod dicom;
pub mod geometry;
pub mod msd;
pub mod png_pairs;

/// The most a deflate stream (gzip, PNG's zlib) can expand: 1032:1 (RFC 1951's longest
/// match costs at least two bits per 258 bytes). A header declaring more decoded bytes
/// than its file's length times this is lying.
pub const MAX_DEFLATE_RATIO: usize = 1032;

use std::path::PathBuf;

/// An image volume: `channels` stacked 3D volumes, x fastest, then y, z, channel
/// (NIfTI's order). Volumes read from NIfTI are in RAS orientation ([`geometry`]): axis 2
/// slices are axial planes.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    /// Size along x, y, z.
    pub dims: [usize; 3],
    /// Distance between voxel centres along x, y, z, in millimetres (1 where the format
    /// says nothing, as for PNG).
    pub spacing: [f64; 3],
    /// Number of channels (modalities).
    pub channels: usize,
    /// Voxel values.
    pub data: Vec<f32>,
}

/// A label volume of class indices, x fastest.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelVolume {
    /// Size along x, y, z.
    pub dims: [usize; 3],
    /// Class index per voxel.
    pub data: Vec<u8>,
}

/// One case: an image and its mask, with a name for reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// Case name (file stem).
    pub name: String,
    /// The image.
    pub image: Volume,
    /// Its segmentation.
    pub label: LabelVolume,
}

impl Case {
    /// Stacks square `size x size` slices (image in f64, labels) into a one-channel case.
    pub fn from_slices(name: &str, size: usize, slices: Vec<(Vec<f64>, Vec<u8>)>) -> Self {
        let dims = [size, size, slices.len()];
        let (mut image, mut label) = (Vec::with_capacity(size * size * slices.len()), Vec::new());
        for (img, lab) in slices {
            image.extend(img.iter().map(|v| *v as f32));
            label.extend(lab);
        }
        Self::one_channel(name, dims, image, label)
    }

    /// A one-channel case of 1 mm voxels, x fastest.
    pub fn one_channel(name: &str, dims: [usize; 3], image: Vec<f32>, label: Vec<u8>) -> Self {
        Case {
            name: name.to_owned(),
            image: Volume {
                dims,
                spacing: [1.0; 3],
                channels: 1,
                data: image,
            },
            label: LabelVolume { dims, data: label },
        }
    }
}

impl Case {
    /// The case at voxel spacing `to` (millimetres): the image resampled linearly, the
    /// label by nearest neighbour.
    pub fn resampled(&self, to: [f64; 3]) -> Result<Case, DataError> {
        let from = self.image.spacing;
        let geometry = |source| DataError::Geometry {
            path: PathBuf::from(&self.name),
            source,
        };
        let (image, dims) = geometry::resample_linear(
            &self.image.data,
            self.image.dims,
            self.image.channels,
            from,
            to,
        )
        .map_err(geometry)?;
        let (label, label_dims) =
            geometry::resample_nearest(&self.label.data, self.label.dims, from, to)
                .map_err(geometry)?;
        debug_assert_eq!(dims, label_dims);
        Ok(Case {
            name: self.name.clone(),
            image: Volume {
                dims,
                spacing: to,
                channels: self.image.channels,
                data: image,
            },
            label: LabelVolume {
                dims: label_dims,
                data: label,
            },
        })
    }
}

impl Volume {
    /// Number of voxels per channel.
    pub fn voxels(&self) -> usize {
        self.dims.iter().product()
    }
}

/// Why data could not be loaded or written. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A volume whose voxel-to-world affine cannot be used.
    #[error("{path}: {source}")]
    Geometry {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: geometry::GeometryError,
    },
    /// Not a readable NIfTI file (corrupt, truncated, unsupported).
    #[error("{path}: not a readable NIfTI volume: {reason}")]
    Nifti {
        /// The file.
        path: PathBuf,
        /// The reader's complaint.
        reason: String,
    },
    /// A volume with an unsupported number of dimensions.
    #[error("{path}: expected a 3D volume (or 4D with channels), found shape {shape:?}")]
    Dimensions {
        /// The file.
        path: PathBuf,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// Image and label disagree in size.
    #[error(
        "{label}: label shape {label_shape:?} does not match image {image} shape {image_shape:?}"
    )]
    ShapeMismatch {
        /// The image file.
        image: PathBuf,
        /// The label file.
        label: PathBuf,
        /// Image shape.
        image_shape: Vec<usize>,
        /// Label shape.
        label_shape: Vec<usize>,
    },
    /// A label value that is not a class of the task.
    #[error("{path}: label value {value} is outside the task's {classes} classes (0..{classes})")]
    LabelOutOfRange {
        /// The file.
        path: PathBuf,
        /// The value found.
        value: f32,
        /// The task's class count.
        classes: usize,
    },
    /// An image whose channel count differs from the task's.
    #[error("{path}: image has {found} channel(s), the task expects {expected}")]
    Channels {
        /// The file.
        path: PathBuf,
        /// Channels found.
        found: usize,
        /// Channels expected.
        expected: usize,
    },
    /// No cases at all.
    #[error("{path}: dataset is empty (no cases found)")]
    Empty {
        /// The dataset directory.
        path: PathBuf,
    },
    /// A malformed `dataset.json`.
    #[error("{path}: invalid dataset.json: {reason}")]
    DatasetJson {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A PNG that cannot be used.
    #[error("{path}: {reason}")]
    Png {
        /// The file.
        path: PathBuf,
        /// What is wrong (bit depth, colour type, corruption).
        reason: String,
    },
    /// A PNG image without a mask or the other way round.
    #[error("{path}: no matching {missing}")]
    Unpaired {
        /// The file that has no partner.
        path: PathBuf,
        /// What is missing.
        missing: &'static str,
    },
    /// A directory that holds neither layout.
    #[error("{path}: not a dataset directory (no dataset.json, and no images/ + masks/ folders)")]
    NotADataset {
        /// The directory.
        path: PathBuf,
    },
    /// A source file that the brain task needs is not installed.
    #[error(
        "{path}: not found; install the Debian package `mricron-data` (apt-get install mricron-data)"
    )]
    TemplateMissing {
        /// The expected template path.
        path: PathBuf,
    },
}

/// Loads every case of a dataset directory: the MSD layout if it has a `dataset.json`,
/// PNG pairs if it has `images/` and `masks/`.
pub fn load_dir(
    dir: &std::path::Path,
    channels: usize,
    classes: usize,
) -> Result<Vec<Case>, DataError> {
    if dir.join("dataset.json").exists() {
        msd::read_dataset(dir, channels, classes)
    } else if dir.join("images").is_dir() {
        png_pairs::read_pairs(dir, classes)
    } else {
        Err(DataError::NotADataset {
            path: dir.to_owned(),
        })
    }
}

/// Wraps an I/O error with the path it concerns.
pub fn io_error(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DataError {
    let path = path.into();
    move |source| DataError::Io { path, source }
}

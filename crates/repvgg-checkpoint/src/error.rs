//! The crate's one error type: the file, the tensor or metadata key when there is one, and the
//! kind of problem, so that callers can act on it (a server answers 400 for a corrupt upload
//! and 500 for a full disk) rather than match on words.

use std::path::{Path, PathBuf};

/// What is wrong, by kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckpointErrorKind {
    /// Reading or writing failed: a missing file, permissions, a full disk.
    Io,
    /// The bytes break their own format: a truncated zip, a malformed header or pickle.
    Corrupt,
    /// The file declares more than the loader accepts, refused before allocating: a tensor's
    /// element count, a zip entry's size, a pickle's expansion or nesting.
    TooLarge,
    /// The pickle names a global the loader does not call.
    RefusedGlobal,
    /// A tensor the architecture needs is absent.
    MissingKey,
    /// Keys that belong to no naming or to another architecture.
    UnexpectedKey,
    /// A tensor whose shape or element type is not the one its key needs.
    ShapeMismatch,
    /// Values no trained model has: NaN, infinities, a negative BN variance.
    BadValue,
    /// The tensors do not form the architecture asked for, the one the file records, or any
    /// RepVGG at all; [`CheckpointError::details`] lists every key concerned.
    ArchMismatch,
    /// Metadata (preprocessing, class names, run state, INT8 parameters) that is unreadable
    /// or does not fit the model.
    BadMetadata,
    /// A caller's argument that does not fit the model: a block index past the last block, a
    /// count of activation ranges that is not one per block input.
    InvalidArgument,
    /// Valid, but not something this toolkit does: an unknown naming, INT8 with SE blocks.
    Unsupported,
    /// A bug in the reader itself, reported instead of a panic: not the file's fault.
    Internal,
}

/// A problem before it is tied to a file: the readers and converters return these, and
/// [`CheckpointError`] adds the path.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Problem {
    pub kind: CheckpointErrorKind,
    /// The tensor or metadata key concerned, when there is one.
    pub key: Option<String>,
    /// One line a person can read.
    pub message: String,
}

impl Problem {
    pub fn new(kind: CheckpointErrorKind, message: impl Into<String>) -> Problem {
        Problem {
            kind,
            key: None,
            message: message.into(),
        }
    }

    /// The same problem, about `key`.
    pub fn about(mut self, key: impl Into<String>) -> Problem {
        self.key = Some(key.into());
        self
    }

    /// The same problem, its message prefixed with where it was found.
    pub(crate) fn within(mut self, place: &str) -> Problem {
        self.message = format!("{place}: {}", self.message);
        self
    }

    pub(crate) fn corrupt(message: impl Into<String>) -> Problem {
        Problem::new(CheckpointErrorKind::Corrupt, message)
    }

    pub(crate) fn io(action: &str, e: &std::io::Error) -> Problem {
        Problem::new(CheckpointErrorKind::Io, format!("{action}: {e}"))
    }
}

/// Every failure names the file and says what is wrong with it, in one line a person can
/// read; when that line had to summarise (a long list of mismatching keys), `details` holds
/// the whole list.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct CheckpointError {
    pub path: PathBuf,
    pub problem: Problem,
    pub details: Vec<String>,
}

impl CheckpointError {
    pub fn new(path: &Path, problem: Problem) -> Self {
        CheckpointError {
            path: path.to_path_buf(),
            problem,
            details: Vec::new(),
        }
    }

    pub fn kind(&self) -> CheckpointErrorKind {
        self.problem.kind
    }

    /// The tensor or metadata key concerned, when there is one.
    pub fn key(&self) -> Option<&str> {
        self.problem.key.as_deref()
    }
}

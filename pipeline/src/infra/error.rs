//! The one error type shared by every stage.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in a lorakit stage.
///
/// Variants that concern one input file carry its path so messages always name the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying operating-system error.
        source: std::io::Error,
    },
    /// A file exists but its content is unusable (bad encoding, bad JSON, wrong shape, ...).
    #[error("{}: {message}", path.display())]
    BadFile {
        /// The offending file.
        path: PathBuf,
        /// What is wrong and, where possible, what to do about it.
        message: String,
    },
    /// A JSON document does not follow the schema version this tool expects.
    #[error("{}: {message}", path.display())]
    Schema {
        /// The offending document.
        path: PathBuf,
        /// Which schema was expected and what differs.
        message: String,
    },
    /// The command line asks for something impossible or contradictory.
    #[error("{0}")]
    Usage(String),
    /// A model could not be loaded or run.
    #[error("{0}")]
    Model(String),
    /// The run was stopped by a signal after saving what it had (the message says where).
    #[error("{0}")]
    Interrupted(String),
    /// Another rank of a data-parallel run failed, left or could not be reached.
    #[error("{0}")]
    Group(String),
}

impl Error {
    /// The message without the path prefix (for reports that name the file themselves).
    pub fn detail(&self) -> String {
        match self {
            Error::Io { source, .. } => source.to_string(),
            Error::BadFile { message, .. } | Error::Schema { message, .. } => message.clone(),
            Error::Usage(message)
            | Error::Model(message)
            | Error::Interrupted(message)
            | Error::Group(message) => message.clone(),
        }
    }

    /// An I/O error about `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A content error about `path`.
    pub fn bad_file(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    /// A schema/version error about `path`.
    pub fn schema(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::Schema {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    /// The file this error is about, if it concerns one file.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::Io { path, .. } | Error::BadFile { path, .. } | Error::Schema { path, .. } => {
                Some(path)
            }
            Error::Usage(_) | Error::Model(_) | Error::Interrupted(_) | Error::Group(_) => None,
        }
    }
}

/// Result alias used throughout the pipeline.
pub type Result<T> = std::result::Result<T, Error>;

impl From<candle_core::Error> for Error {
    /// A tensor-library failure is a model error.
    fn from(e: candle_core::Error) -> Self {
        Error::Model(e.to_string())
    }
}

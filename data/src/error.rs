//! The error type of `dcdit-data`: every variant names the file (or the
//! argument) and the problem.

use std::fmt;
use std::path::{Path, PathBuf};

/// What went wrong while reading or writing data, pictures or weights.
#[derive(Debug)]
pub enum Error {
    /// The operating system refused a read or write.
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done (`"read"`, `"create"`, `"list"`...).
        action: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file exists but its contents are wrong: bad magic, truncated,
    /// checksum mismatch, unsupported dtype or shape...
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A caller passed arguments that do not fit together (buffer length vs
    /// shape, index out of range, empty input...).
    Input(String),
    /// Drawing a picture failed (plotters).
    Draw {
        /// The picture file.
        path: PathBuf,
        /// The drawing error.
        msg: String,
    },
    /// An error from `dcdit-core` (safetensors encoding/decoding).
    Core {
        /// The file, when there is one.
        path: Option<PathBuf>,
        /// The core error.
        source: dcdit_core::Error,
    },
}

/// `Result` with this crate's [`enum@Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A [`Error::Format`] for `path`.
    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl AsRef<Path>, action: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            action,
            source,
        }
    }

    /// An [`Error::Input`].
    pub fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io {
                path,
                action,
                source,
            } => write!(f, "{}: cannot {action}: {source}", path.display()),
            Error::Format { path, msg } => write!(f, "{}: {msg}", path.display()),
            Error::Input(m) => write!(f, "invalid input: {m}"),
            Error::Draw { path, msg } => write!(f, "{}: drawing failed: {msg}", path.display()),
            Error::Core {
                path: Some(p),
                source,
            } => write!(f, "{}: {source}", p.display()),
            Error::Core { path: None, source } => write!(f, "{source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Core { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<dcdit_core::Error> for Error {
    fn from(e: dcdit_core::Error) -> Self {
        Error::Core {
            path: None,
            source: e,
        }
    }
}

/// Lets code that returns `dcdit_core::Result` use `?` on this crate's results.
impl From<Error> for dcdit_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Core { path: None, source } => source,
            Error::Input(m) => dcdit_core::Error::Input(m),
            Error::Format { .. } | Error::Core { .. } | Error::Draw { .. } => {
                dcdit_core::Error::Format(e.to_string())
            }
            Error::Io { .. } => dcdit_core::Error::Input(e.to_string()),
        }
    }
}

/// Reads a whole file, naming it on failure.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, "read", e))
}

/// Writes a whole file, naming it on failure.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, "write", e))
}

//! The one error type of the library: every failure names what was wrong.

use alloc::string::String;
use core::fmt;

/// Everything that can go wrong in dcdit, with enough context to act on it.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// A configuration field is missing, malformed or inconsistent.
    Config {
        /// Dotted path of the field, e.g. `model.hnet.num_heads`.
        field: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A weight file lacks a tensor the model needs.
    MissingKey(String),
    /// A weight file holds a tensor the model does not know.
    UnexpectedKey(String),
    /// A tensor has the wrong shape.
    Shape {
        /// The tensor's name (weight key or input name).
        name: String,
        /// The shape the model expects.
        expected: alloc::vec::Vec<usize>,
        /// The shape found.
        got: alloc::vec::Vec<usize>,
    },
    /// A tensor is stored in a dtype that cannot be used for it.
    DType {
        /// The tensor's name.
        name: String,
        /// The dtype found on disk.
        got: String,
    },
    /// A file is not a valid safetensors / data file (truncated, corrupt header...).
    Format(String),
    /// Bad user input to an operation (wrong input shapes, label out of range...).
    Input(String),
    /// A device or backend failure (allocation, driver, missing device).
    Backend(String),
    /// Numerical trouble that would corrupt state (NaN or Inf).
    NonFinite(String),
}

/// `Result` with [`Error`].
pub type Result<T> = core::result::Result<T, Error>;

impl Error {
    /// Shorthand for a [`Error::Config`] error.
    pub fn config(field: &str, msg: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            msg: msg.into(),
        }
    }
    /// Shorthand for an [`Error::Input`] error.
    pub fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }
    /// Shorthand for an [`Error::Backend`] error.
    pub fn backend(msg: impl Into<String>) -> Self {
        Error::Backend(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config { field, msg } => write!(f, "config field `{field}`: {msg}"),
            Error::MissingKey(k) => write!(f, "weights: missing tensor `{k}`"),
            Error::UnexpectedKey(k) => write!(f, "weights: unexpected tensor `{k}`"),
            Error::Shape {
                name,
                expected,
                got,
            } => write!(
                f,
                "tensor `{name}`: expected shape {expected:?}, got {got:?}"
            ),
            Error::DType { name, got } => {
                write!(
                    f,
                    "tensor `{name}`: unsupported dtype {got} (want F32, F16 or BF16)"
                )
            }
            Error::Format(m) => write!(f, "invalid file: {m}"),
            Error::Input(m) => write!(f, "invalid input: {m}"),
            Error::Backend(m) => write!(f, "backend: {m}"),
            Error::NonFinite(m) => write!(f, "non-finite value: {m}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}

//! One error type for the whole crate, with a kind callers can branch on.

use std::fmt;
use std::sync::Arc;

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong, in a form a caller can match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The builder was given an invalid setting.
    Config,
    /// Redis could not be reached or answered with an error.
    L2,
    /// A value could not be encoded or decoded.
    Codec,
    /// A loader or Redis call took longer than its configured timeout.
    Timeout,
    /// No process-wide cache was installed with `install`.
    NotInstalled,
    /// A write-behind queue was full (with `WhenFull::Error`).
    QueueFull,
    /// A write-behind queue was shut down.
    Closed,
}

/// The crate's error: a [`kind`](Error::kind), a message that says what to do,
/// and the underlying cause as [`source`](std::error::Error::source).
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Source>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// A value that a [`Codec`](crate::Codec) could not encode or decode,
    /// for codecs of your own. A decode failure is then a counted miss
    /// (`stats.decode_failures`), an encode failure the error of `set`.
    ///
    /// ```
    /// let e = tiered_cache::Error::codec("not valid JSON");
    /// assert!(e.is_codec());
    /// ```
    pub fn codec(source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Error::new(
            ErrorKind::Codec,
            "a value could not be encoded or decoded by the key's codec; if the type changed, bump the key's schema version",
        )
        .with_source(source)
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// True when Redis (the second tier) failed.
    pub fn is_l2(&self) -> bool {
        self.kind == ErrorKind::L2
    }

    /// True when a value failed to encode or decode.
    pub fn is_codec(&self) -> bool {
        self.kind == ErrorKind::Codec
    }

    /// True when a loader or Redis call exceeded its timeout.
    pub fn is_timeout(&self) -> bool {
        self.kind == ErrorKind::Timeout
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// The error of a loading read ([`get_or_load`](crate::TieredCache::get_or_load)
/// and friends): the loader's own error, shared by every caller that waited
/// on the same load, or a failure of the cache itself (a hard timeout).
#[non_exhaustive]
pub enum LoadError<E> {
    /// The loader returned this error. Coalesced callers share one `Arc`.
    /// Errors are never cached.
    Loader(Arc<E>),
    /// The cache gave up, for example at the hard timeout.
    Cache(Error),
}

impl<E> LoadError<E> {
    /// The loader's error, if the loader failed.
    pub fn loader_error(&self) -> Option<&Arc<E>> {
        match self {
            LoadError::Loader(e) => Some(e),
            LoadError::Cache(_) => None,
        }
    }

    /// True when the load was abandoned at its hard timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, LoadError::Cache(e) if e.is_timeout())
    }
}

impl<E> Clone for LoadError<E> {
    fn clone(&self) -> Self {
        match self {
            LoadError::Loader(e) => LoadError::Loader(Arc::clone(e)),
            LoadError::Cache(e) => LoadError::Cache(Error::new(e.kind, e.message.clone())),
        }
    }
}

impl<E: fmt::Debug> fmt::Debug for LoadError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Loader(e) => f.debug_tuple("Loader").field(e).finish(),
            LoadError::Cache(e) => f.debug_tuple("Cache").field(e).finish(),
        }
    }
}

impl<E: fmt::Display> fmt::Display for LoadError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Loader(e) => write!(f, "loader failed: {e}"),
            LoadError::Cache(e) => e.fmt(f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for LoadError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoadError::Loader(e) => Some(&**e),
            LoadError::Cache(e) => Some(e),
        }
    }
}

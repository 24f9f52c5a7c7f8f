//! How values are turned into bytes for Redis. Postcard by default.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, ErrorKind};

/// A serde format for values stored in the second tier. A codec of your
/// own reports failures with [`Error::codec`].
///
/// A codec is chosen per key type (`Key<V, C>`), and its [`ID`](Codec::ID) is
/// written into every stored entry: switching codecs makes old entries read as
/// misses instead of garbage.
pub trait Codec: Send + Sync + 'static {
    /// A byte that identifies this format in stored entries. 0 is postcard.
    const ID: u8;

    /// Appends the encoding of `value` to `out`.
    ///
    /// # Errors
    /// When the value cannot be represented in this format.
    fn encode<V: Serialize + ?Sized>(value: &V, out: &mut Vec<u8>) -> Result<(), Error>;

    /// Decodes a value from `bytes`.
    ///
    /// # Errors
    /// When `bytes` are not a valid encoding of a `V`.
    fn decode<V: DeserializeOwned>(bytes: &[u8]) -> Result<V, Error>;
}

/// The default codec: [postcard](https://docs.rs/postcard), compact and fast.
#[derive(Debug, Clone, Copy, Default)]
pub struct Postcard;

impl Codec for Postcard {
    const ID: u8 = 0;

    fn encode<V: Serialize + ?Sized>(value: &V, out: &mut Vec<u8>) -> Result<(), Error> {
        let buf = std::mem::take(out);
        *out = postcard::to_extend(value, buf).map_err(codec_error)?;
        Ok(())
    }

    fn decode<V: DeserializeOwned>(bytes: &[u8]) -> Result<V, Error> {
        postcard::from_bytes(bytes).map_err(codec_error)
    }
}

fn codec_error(e: postcard::Error) -> Error {
    Error::new(
        ErrorKind::Codec,
        "a value could not be (de)serialized with postcard; if the type changed, bump the key's schema version",
    )
    .with_source(e)
}

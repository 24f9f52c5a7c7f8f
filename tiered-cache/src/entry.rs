//! The envelope stored in Redis: a small fixed header, the entry's tags, then
//! the codec's bytes of the value.
//!
//! ```text
//! u8 format | u8 codec | u8 flags | u64 created_ms | u64 expires_ms
//! | u64 stale_until_ms | u32 load_micros | u64 version
//! | u16 tag count | (u16 len, utf-8 tag, u64 tag version)* | value bytes
//! ```
//! All integers are little-endian; times are Unix milliseconds so that every
//! instance reads them alike. Anything that does not parse is a miss.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Bumped whenever the layout above changes; older entries become misses.
pub(crate) const FORMAT: u8 = 0xA1;
const FLAG_NEGATIVE: u8 = 1;
const FIXED_HEADER: usize = 3 + 8 * 3 + 4 + 8 + 2;
/// Where the version sits in the header: Redis's store script writes the
/// version it assigns there (`l2/scripts/store.lua`).
pub(crate) const VERSION_AT: usize = 3 + 8 * 3 + 4;

/// A tag and the version it had when the entry's value was loaded.
pub(crate) type TagStamp = (Arc<str>, u64);

/// Everything about an entry except its value.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Meta {
    pub(crate) created_ms: u64,
    /// Logical expiry: after it the entry is stale.
    pub(crate) expires_ms: u64,
    /// End of the grace window: after it the entry is gone.
    pub(crate) stale_until_ms: u64,
    /// How long the last load took (XFetch's delta).
    pub(crate) load_micros: u32,
    /// The entry's version, for compare-and-set writes: assigned by Redis
    /// when the entry is stored there (it only grows, per key), 0 otherwise.
    pub(crate) version: u64,
    pub(crate) tags: Arc<[TagStamp]>,
}

impl Meta {
    /// The remaining time until the entry leaves Redis, if any is left.
    pub(crate) fn remaining(&self, now_ms: u64) -> Option<Duration> {
        self.stale_until_ms
            .checked_sub(now_ms)
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis)
    }
}

/// A decoded envelope borrowing its value bytes from the Redis reply.
#[derive(Debug)]
pub(crate) struct Envelope<'a> {
    pub(crate) meta: Meta,
    /// `None` is a cached negative result.
    pub(crate) value: Option<&'a [u8]>,
}

/// Why stored bytes were not a usable entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BadEntry {
    Truncated,
    UnknownFormat,
    WrongCodec,
}

impl BadEntry {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            BadEntry::Truncated => "truncated or not an entry",
            BadEntry::UnknownFormat => "written by another format version",
            BadEntry::WrongCodec => "written with another codec",
        }
    }
}

/// Writes the header for `meta` into a fresh buffer; the caller appends the
/// value bytes (so the value is encoded once, straight into the buffer).
pub(crate) fn encode_header(meta: &Meta, codec: u8, negative: bool, value_hint: usize) -> Vec<u8> {
    let tags_len: usize = meta.tags.iter().map(|(t, _)| 2 + t.len() + 8).sum();
    let mut out = Vec::with_capacity(FIXED_HEADER + tags_len + value_hint);
    out.push(FORMAT);
    out.push(codec);
    out.push(if negative { FLAG_NEGATIVE } else { 0 });
    out.extend_from_slice(&meta.created_ms.to_le_bytes());
    out.extend_from_slice(&meta.expires_ms.to_le_bytes());
    out.extend_from_slice(&meta.stale_until_ms.to_le_bytes());
    out.extend_from_slice(&meta.load_micros.to_le_bytes());
    out.extend_from_slice(&meta.version.to_le_bytes());
    let count = u16::try_from(meta.tags.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&count.to_le_bytes());
    for (tag, version) in meta.tags.iter().take(usize::from(count)) {
        let bytes = &tag.as_bytes()[..tag.len().min(usize::from(u16::MAX))];
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(bytes);
        out.extend_from_slice(&version.to_le_bytes());
    }
    out
}

/// Parses stored bytes. `codec` is the codec the reader expects.
pub(crate) fn decode(bytes: &[u8], codec: u8) -> Result<Envelope<'_>, BadEntry> {
    let mut r = Reader(bytes);
    if r.u8()? != FORMAT {
        return Err(BadEntry::UnknownFormat);
    }
    if r.u8()? != codec {
        return Err(BadEntry::WrongCodec);
    }
    let flags = r.u8()?;
    let created_ms = r.u64()?;
    let expires_ms = r.u64()?;
    let stale_until_ms = r.u64()?;
    let load_micros = r.u32()?;
    let version = r.u64()?;
    let count = r.u16()?;
    let stamps = TagStamps { r, left: count };
    // Checked first, so that the stamps are then built in one allocation.
    let mut after_tags = stamps.clone();
    for stamp in after_tags.by_ref() {
        let (name, _) = stamp?;
        std::str::from_utf8(name).map_err(|_| BadEntry::Truncated)?;
    }
    let tags = shared_stamps(stamps);
    let negative = flags & FLAG_NEGATIVE != 0;
    Ok(Envelope {
        meta: Meta {
            created_ms,
            expires_ms,
            stale_until_ms,
            load_micros,
            version,
            tags,
        },
        value: if negative { None } else { Some(after_tags.r.0) },
    })
}

thread_local! {
    /// The tag stamps this thread decoded last.
    static LAST_STAMPS: std::cell::RefCell<Option<Arc<[TagStamp]>>> =
        const { std::cell::RefCell::new(None) };
}

/// An entry's checked tag stamps, sharing what they can with the stamps of
/// the entry this thread decoded before (per thread, so that reads on
/// different threads do not all count references on one `Arc`): those very
/// stamps when names and versions are equal (entries written between two
/// invalidations of their tags carry the same ones), else new stamps in one
/// allocation that keep the names found at the same positions (entries of a
/// kind carry the same tags in the same order).
fn shared_stamps(stamps: TagStamps<'_>) -> Arc<[TagStamp]> {
    let shared = LAST_STAMPS.try_with(|last| {
        let mut last = last.try_borrow_mut().ok()?;
        if let Some(previous) = last.as_ref().filter(|p| same_stamps(p, stamps.clone())) {
            return Some(Arc::clone(previous));
        }
        let built = build_stamps(stamps.clone(), last.as_deref());
        *last = Some(Arc::clone(&built));
        Some(built)
    });
    // On a thread being torn down: stamps of its own.
    shared
        .ok()
        .flatten()
        .unwrap_or_else(|| build_stamps(stamps, None))
}

fn same_stamps(previous: &[TagStamp], stamps: TagStamps<'_>) -> bool {
    previous.len() == stamps.len()
        && previous.iter().zip(stamps).all(|((name, version), stamp)| {
            stamp.is_ok_and(|(tag, v)| v == *version && name.as_bytes() == tag)
        })
}

/// Stamps in one allocation (an `Arc<[_]>` collected from a range knows its
/// length up front), with the names of `previous` where they are equal.
fn build_stamps(mut stamps: TagStamps<'_>, previous: Option<&[TagStamp]>) -> Arc<[TagStamp]> {
    (0..stamps.len())
        .map(|i| match stamps.next() {
            Some(Ok((tag, version))) => {
                let name = previous
                    .and_then(|p| p.get(i))
                    .filter(|(name, _)| name.as_bytes() == tag)
                    .map(|(name, _)| Arc::clone(name));
                // Checked to be UTF-8 by `decode`.
                let name =
                    name.unwrap_or_else(|| Arc::from(std::str::from_utf8(tag).unwrap_or("")));
                (name, version)
            }
            _ => (Arc::from(""), 0), // checked by `decode`: never
        })
        .collect()
}

/// The tag names of stored bytes, read in place (none when the bytes are
/// not an entry of `codec`: [`decode`] says why).
pub(crate) fn tag_names(bytes: &[u8], codec: u8) -> impl Iterator<Item = &str> {
    let header = 1 + 1 + 1 + 8 + 8 + 8 + 4 + 8;
    let mut r = Reader(bytes);
    let ours = r.u8() == Ok(FORMAT) && r.u8() == Ok(codec) && r.take(header - 2).is_ok();
    let left = if ours { r.u16().unwrap_or(0) } else { 0 };
    TagStamps { r, left }
        .map_while(Result::ok)
        .map_while(|(tag, _)| std::str::from_utf8(tag).ok())
}

/// The `(tag, version)` stamps of an entry's header, read in place; a tag
/// is its name's bytes, which the caller checks to be UTF-8.
#[derive(Clone)]
struct TagStamps<'a> {
    r: Reader<'a>,
    left: u16,
}

impl<'a> Iterator for TagStamps<'a> {
    type Item = Result<(&'a [u8], u64), BadEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let mut stamp = || {
            let len = usize::from(self.r.u16()?);
            let tag = self.r.take(len)?;
            Ok((tag, self.r.u64()?))
        };
        let stamp = stamp();
        if stamp.is_err() {
            self.left = 0;
        }
        Some(stamp)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (usize::from(self.left), Some(usize::from(self.left)))
    }
}

impl ExactSizeIterator for TagStamps<'_> {}

#[derive(Clone)]
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BadEntry> {
        if self.0.len() < n {
            return Err(BadEntry::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], BadEntry> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, BadEntry> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, BadEntry> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, BadEntry> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, BadEntry> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

/// Wall-clock milliseconds since the Unix epoch, shared by all instances.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            created_ms: 1,
            expires_ms: 2,
            stale_until_ms: 3,
            load_micros: 4,
            version: 5,
            tags: vec![(Arc::from("products"), 7), (Arc::from(""), 0)].into(),
        }
    }

    #[test]
    fn round_trips_header_tags_and_value() {
        let mut bytes = encode_header(&meta(), 0, false, 3);
        bytes.extend_from_slice(b"abc");
        let env = decode(&bytes, 0).unwrap();
        assert_eq!(env.meta, meta());
        assert_eq!(env.value, Some(&b"abc"[..]));
    }

    #[test]
    fn the_version_is_where_the_store_script_writes_it() {
        let bytes = encode_header(&meta(), 0, false, 0);
        let at = &bytes[VERSION_AT..VERSION_AT + 8];
        assert_eq!(u64::from_le_bytes(at.try_into().unwrap()), meta().version);
    }

    #[test]
    fn negative_entries_have_no_value() {
        let bytes = encode_header(&meta(), 0, true, 0);
        assert_eq!(decode(&bytes, 0).unwrap().value, None);
    }

    #[test]
    fn every_truncation_is_rejected_not_panicking() {
        let bytes = encode_header(&meta(), 0, false, 0);
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n], 0).is_err(), "prefix of {n} bytes");
        }
    }

    #[test]
    fn other_formats_and_codecs_are_rejected() {
        let mut bytes = encode_header(&meta(), 0, false, 0);
        assert_eq!(decode(&bytes, 1).unwrap_err(), BadEntry::WrongCodec);
        bytes[0] = 0;
        assert_eq!(decode(&bytes, 0).unwrap_err(), BadEntry::UnknownFormat);
    }

    #[test]
    fn tag_names_are_read_in_place_and_stop_at_bad_bytes() {
        let bytes = encode_header(&meta(), 0, false, 0);
        assert_eq!(tag_names(&bytes, 0).collect::<Vec<_>>(), ["products", ""]);
        assert_eq!(tag_names(&bytes, 1).count(), 0, "another codec's entry");
        for n in 0..bytes.len() {
            let names: Vec<_> = tag_names(&bytes[..n], 0).collect();
            assert!(names.len() < 2, "prefix of {n} bytes gave {names:?}");
        }
        let mut bad = bytes.clone();
        // The first tag's first byte: before it, from the end, the second
        // tag (length, empty name, version) and the first's 8-byte name
        // and version.
        let first = bad.len() - (2 + 8) - (8 + 8);
        bad[first] = 0xff;
        assert!(decode(&bad, 0).is_err(), "a tag that is not UTF-8");
        assert_eq!(tag_names(&bad, 0).count(), 0);
    }

    #[test]
    fn entries_with_the_same_tags_share_their_names() {
        let bytes = encode_header(&meta(), 0, false, 0);
        let (a, b) = (decode(&bytes, 0).unwrap(), decode(&bytes, 0).unwrap());
        assert_eq!(a.meta, meta());
        for n in 0..2 {
            assert!(Arc::ptr_eq(&a.meta.tags[n].0, &b.meta.tags[n].0), "tag {n}");
        }
        let other = Meta {
            tags: vec![(Arc::from("orders"), 1)].into(),
            ..meta()
        };
        let other_bytes = encode_header(&other, 0, false, 0);
        let c = decode(&other_bytes, 0).unwrap();
        assert_eq!(
            &*c.meta.tags[0].0, "orders",
            "another name is not taken for the last"
        );
        assert_eq!(decode(&bytes, 0).unwrap().meta, meta());
        // Equal stamps are the same stamps; a newer version is not.
        let (d, e) = (decode(&bytes, 0).unwrap(), decode(&bytes, 0).unwrap());
        assert!(Arc::ptr_eq(&d.meta.tags, &e.meta.tags));
        let mut newer = meta();
        newer.tags = vec![(Arc::from("products"), 8), (Arc::from(""), 0)].into();
        let newer_bytes = encode_header(&newer, 0, false, 0);
        let f = decode(&newer_bytes, 0).unwrap();
        assert_eq!(f.meta.tags[0].1, 8);
        assert!(!Arc::ptr_eq(&f.meta.tags, &d.meta.tags));
        assert!(
            Arc::ptr_eq(&f.meta.tags[0].0, &d.meta.tags[0].0),
            "the name is still shared"
        );
    }
}

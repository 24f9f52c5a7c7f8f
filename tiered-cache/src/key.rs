//! Typed, versioned keys and their unambiguous string encoding.
//!
//! A key's body is `{entity:v{version}:arg1:arg2}`. Every part is escaped so
//! that it never contains `:`, `{`, `}` or a bare `%`; an empty argument is
//! written as a lone `%`. Splitting the body on `:` therefore gives back the
//! exact parts, which makes the encoding injective: two different argument
//! tuples can never produce the same key. The braces make the whole body a
//! Redis Cluster hash tag, so an entry's auxiliary keys (its lock, its meta),
//! which append a suffix after the closing brace, land in the same slot.

use std::fmt::{self, Write as _};
use std::marker::PhantomData;
use std::sync::OnceLock;

use crate::codec::{Codec, Postcard};

/// A typed, versioned cache key: it can only ever yield a `V`.
///
/// The entity name and the schema version are part of the stored key, so
/// bumping the version after changing `V` makes old entries read as misses
/// instead of failing to decode. `C` picks the serde format used in Redis.
///
/// ```
/// use tiered_cache::Key;
/// # #[derive(serde::Serialize, serde::Deserialize)] struct Product;
/// let key = Key::<Product>::new("product", 3).arg(42).arg("eu");
/// assert_eq!(key.as_str(), "{product:v3:42:eu}");
/// ```
pub struct Key<V, C = Postcard> {
    body: String,
    _value: PhantomData<fn() -> (V, C)>,
}

impl<V, C: Codec> Key<V, C> {
    /// A key for `entity` at schema `version`, with no arguments yet.
    pub fn new(entity: &str, version: u32) -> Self {
        let mut body = String::with_capacity(entity.len() + 24);
        begin(&mut body, entity, version);
        Key {
            body,
            _value: PhantomData,
        }
    }

    /// Appends one argument (its `Display` form) and returns the key.
    pub fn arg(mut self, arg: impl fmt::Display) -> Self {
        self.push_arg(arg);
        self
    }

    /// Appends one argument (its `Display` form) in place.
    pub fn push_arg(&mut self, arg: impl fmt::Display) {
        push_arg(&mut self.body, arg);
    }

    /// Appends an integer argument: the same part as [`Key::push_arg`]
    /// writes for it, without going through `fmt`. The `#[cached]` macro
    /// uses it for integer parts.
    pub(crate) fn push_integer(&mut self, magnitude: u64, negative: bool) {
        push_integer(&mut self.body, magnitude, negative);
    }
}

impl<V> Key<V> {
    /// The key whose body is `body`, as [`KeyDraft`] wrote it.
    pub(crate) fn from_body(body: String) -> Self {
        Key {
            body,
            _value: PhantomData,
        }
    }
}

/// Where a key's body is written: a [`Key`]'s `String`, or the stack
/// buffer of a [`KeyDraft`]. Both get the same bytes from the functions
/// below, which are the one definition of the encoding.
pub(crate) trait KeyText {
    fn push_str(&mut self, s: &str);
    /// Appends one ASCII byte (a separator).
    fn push_ascii(&mut self, byte: u8);
    /// Removes the last byte (the closing brace, before a new part).
    fn pop_byte(&mut self);
    fn text_len(&self) -> usize;
}

impl KeyText for String {
    #[inline]
    fn push_str(&mut self, s: &str) {
        String::push_str(self, s);
    }

    #[inline]
    fn push_ascii(&mut self, byte: u8) {
        self.push(char::from(byte));
    }

    #[inline]
    fn pop_byte(&mut self) {
        self.pop();
    }

    #[inline]
    fn text_len(&self) -> usize {
        self.len()
    }
}

/// `{entity:v{version}}`.
#[inline]
pub(crate) fn begin(out: &mut impl KeyText, entity: &str, version: u32) {
    out.push_ascii(b'{');
    escape_into(out, entity);
    out.push_str(":v");
    push_decimal(out, u64::from(version), false);
    out.push_ascii(b'}');
}

/// Appends one part: its `Display` form, escaped (`%` when empty).
pub(crate) fn push_arg(out: &mut impl KeyText, arg: impl fmt::Display) {
    out.pop_byte(); // the closing brace, put back below
    out.push_ascii(b':');
    let start = out.text_len();
    let _ = write!(EscapingWriter(out), "{arg}");
    if out.text_len() == start {
        out.push_ascii(b'%');
    }
    out.push_ascii(b'}');
}

/// Appends an integer part: the same text as [`push_arg`] writes for it
/// (its decimal form needs no escaping), without going through `fmt`.
#[inline]
pub(crate) fn push_integer(out: &mut impl KeyText, magnitude: u64, negative: bool) {
    out.pop_byte(); // the closing brace
    out.push_ascii(b':');
    push_decimal(out, magnitude, negative);
    out.push_ascii(b'}');
}

/// Writes `magnitude` in decimal, after a `-` when `negative`: what
/// `Display` writes for an integer.
#[inline]
fn push_decimal(out: &mut impl KeyText, magnitude: u64, negative: bool) {
    if negative {
        out.push_ascii(b'-');
    }
    out.push_str(itoa::Buffer::new().format(magnitude));
}

/// Bytes a [`KeyDraft`] holds on the stack; a longer key moves to a
/// `String`. A `#[cached]` key is `{module::path::function:vN:args}`.
const DRAFT_BYTES: usize = 96;

/// A key's body written on the stack: what a `#[cached]` call builds
/// first, so that an L1 hit allocates nothing; it becomes a [`Key`] only
/// when the call goes past L1. For generated code (`__private`) only.
#[doc(hidden)]
pub struct KeyDraft<V> {
    text: DraftText,
    _value: PhantomData<fn() -> V>,
}

enum DraftText {
    Stack {
        len: usize,
        bytes: [u8; DRAFT_BYTES],
    },
    Heap(String),
}

/// The start of one call site's keys, `{entity:vN}`, escaped once and
/// copied by the site's later calls ([`KeyDraft::at`]): a `static` of the
/// generated code. For generated code (`__private`) only.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct KeyHead(OnceLock<Head>);

/// What [`KeyHead`] keeps: the entity and version it was written for, and
/// the draft's buffer as it stood then.
#[derive(Debug)]
struct Head {
    entity: Box<str>,
    version: u32,
    len: usize,
    bytes: [u8; DRAFT_BYTES],
}

impl KeyHead {
    /// A head that holds nothing yet.
    pub const fn new() -> Self {
        KeyHead(OnceLock::new())
    }
}

impl<V> KeyDraft<V> {
    /// [`KeyDraft::new`], copied from `head` when it was written for this
    /// entity and version (a site's `name` and `version` are almost always
    /// constants; when they are not, only the first pair is kept and the
    /// others are written afresh).
    #[inline]
    pub(crate) fn at(head: &KeyHead, entity: &str, version: u32) -> Self {
        match head.0.get() {
            Some(kept) if kept.version == version && *kept.entity == *entity => KeyDraft {
                text: DraftText::Stack {
                    len: kept.len,
                    bytes: kept.bytes,
                },
                _value: PhantomData,
            },
            Some(_) => Self::new(entity, version),
            None => Self::first_at(head, entity, version),
        }
    }

    /// The first draft of a site: written, and kept in `head` if it fits
    /// on the stack.
    #[cold]
    fn first_at(head: &KeyHead, entity: &str, version: u32) -> Self {
        let draft = Self::new(entity, version);
        if let DraftText::Stack { len, bytes } = &draft.text {
            let _ = head.0.set(Head {
                entity: entity.into(),
                version,
                len: *len,
                bytes: *bytes,
            });
        }
        draft
    }

    /// A draft for `entity` at `version`, with no arguments yet.
    #[inline]
    pub(crate) fn new(entity: &str, version: u32) -> Self {
        let mut draft = KeyDraft {
            text: DraftText::Stack {
                len: 0,
                bytes: [0; DRAFT_BYTES],
            },
            _value: PhantomData,
        };
        begin(&mut draft.text, entity, version);
        draft
    }

    /// Appends an integer part (see [`push_integer`]).
    #[inline]
    pub(crate) fn push_integer(&mut self, magnitude: u64, negative: bool) {
        push_integer(&mut self.text, magnitude, negative);
    }

    /// Appends a part (see [`push_arg`]).
    pub(crate) fn push_arg(&mut self, arg: impl fmt::Display) {
        push_arg(&mut self.text, arg);
    }

    /// The body's bytes so far: what an L1 lookup takes, unchecked (every
    /// piece was a whole `&str`, so they are UTF-8; [`KeyDraft::as_str`]
    /// checks).
    #[inline]
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match &self.text {
            DraftText::Stack { len, bytes } => &bytes[..*len],
            DraftText::Heap(body) => body.as_bytes(),
        }
    }

    /// The body so far: `None` only if it were not UTF-8, which whole
    /// `&str` pieces cannot make.
    #[inline]
    pub(crate) fn as_str(&self) -> Option<&str> {
        match &self.text {
            DraftText::Stack { len, bytes } => std::str::from_utf8(&bytes[..*len]).ok(),
            DraftText::Heap(body) => Some(body),
        }
    }

    /// The [`Key`] of this body.
    pub(crate) fn into_key(self) -> Key<V> {
        Key::from_body(match self.text {
            DraftText::Stack { len, bytes } => String::from_utf8_lossy(&bytes[..len]).into_owned(),
            DraftText::Heap(body) => body,
        })
    }
}

impl KeyText for DraftText {
    #[inline]
    fn push_str(&mut self, s: &str) {
        if let DraftText::Stack { len, bytes } = self {
            if let Some(room) = bytes.get_mut(*len..*len + s.len()) {
                room.copy_from_slice(s.as_bytes());
                *len += s.len();
                return;
            }
        }
        self.push_str_past_stack(s);
    }

    #[inline]
    fn push_ascii(&mut self, byte: u8) {
        if let DraftText::Stack { len, bytes } = self {
            if let Some(slot) = bytes.get_mut(*len) {
                *slot = byte;
                *len += 1;
                return;
            }
        }
        self.push_str_past_stack(char::from(byte).encode_utf8(&mut [0; 4]));
    }

    #[inline]
    fn pop_byte(&mut self) {
        match self {
            DraftText::Stack { len, .. } => *len = len.saturating_sub(1),
            DraftText::Heap(body) => {
                body.pop();
            }
        }
    }

    #[inline]
    fn text_len(&self) -> usize {
        match self {
            DraftText::Stack { len, .. } => *len,
            DraftText::Heap(body) => body.len(),
        }
    }
}

impl DraftText {
    /// Appends `s` to a draft on the heap, moving it there if `s` does not
    /// fit on the stack.
    #[cold]
    fn push_str_past_stack(&mut self, s: &str) {
        match self {
            DraftText::Stack { len, bytes } => {
                let mut body = String::with_capacity(2 * DRAFT_BYTES + s.len());
                body.push_str(&String::from_utf8_lossy(&bytes[..*len]));
                body.push_str(s);
                *self = DraftText::Heap(body);
            }
            DraftText::Heap(body) => body.push_str(s),
        }
    }
}

impl<V> fmt::Debug for KeyDraft<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("KeyDraft").field(&self.as_str()).finish()
    }
}

impl<V, C> Key<V, C> {
    /// The encoded key without the namespace: `{entity:vN:arg1:arg2}`.
    pub fn as_str(&self) -> &str {
        &self.body
    }
}

impl<V, C> Clone for Key<V, C> {
    fn clone(&self) -> Self {
        Key {
            body: self.body.clone(),
            _value: PhantomData,
        }
    }
}

impl<V, C> PartialEq for Key<V, C> {
    fn eq(&self, other: &Self) -> bool {
        self.body == other.body
    }
}

impl<V, C> Eq for Key<V, C> {}

impl<V, C> std::hash::Hash for Key<V, C> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.body.hash(state);
    }
}

impl<V, C> fmt::Debug for Key<V, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Key").field(&self.body).finish()
    }
}

impl<V, C> fmt::Display for Key<V, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.body)
    }
}

/// Escapes `%`, `:`, `{` and `}` as `%XX` so a part never contains a separator.
/// Runs between separators are copied whole: the four are ASCII, so each
/// byte index where one sits is a char boundary.
#[inline]
pub(crate) fn escape_into(out: &mut impl KeyText, part: &str) {
    let mut copied = 0;
    for (at, byte) in part.bytes().enumerate() {
        let escaped = match byte {
            b'%' => "%25",
            b':' => "%3A",
            b'{' => "%7B",
            b'}' => "%7D",
            _ => continue,
        };
        out.push_str(&part[copied..at]);
        out.push_str(escaped);
        copied = at + 1;
    }
    out.push_str(&part[copied..]);
}

struct EscapingWriter<'a, T: KeyText>(&'a mut T);

impl<T: KeyText> fmt::Write for EscapingWriter<'_, T> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape_into(self.0, s);
        Ok(())
    }
}

/// `product` of `{product:v3:7}`; the whole key if it has no such shape.
pub(crate) fn entity_of(key: &str) -> &str {
    let body = key.strip_prefix('{').unwrap_or(key);
    body.split(':').next().unwrap_or(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key_of(args: &[String]) -> String {
        let mut key = Key::<u8>::new("e:n{t}", 1);
        for a in args {
            key.push_arg(a);
        }
        key.as_str().to_owned()
    }

    #[test]
    fn separators_inside_arguments_do_not_collide() {
        let a = key_of(&["a:b".into(), "c".into()]);
        let b = key_of(&["a".into(), "b:c".into()]);
        assert_ne!(a, b);
        assert_ne!(key_of(&[]), key_of(&[String::new()]));
        assert_ne!(key_of(&["%".into()]), key_of(&[String::new()]));
    }

    #[test]
    fn body_is_one_hash_tag() {
        let k = key_of(&["x}y".into(), "{z".into()]);
        assert!(k.starts_with('{') && k.ends_with('}'));
        assert_eq!(k.matches('{').count(), 1);
        assert_eq!(k.matches('}').count(), 1);
    }

    #[test]
    fn integer_parts_are_their_display_form() {
        let by_display = |n: &dyn fmt::Display| {
            let mut key = Key::<u8>::new("e", u32::MAX);
            key.push_arg(n);
            key.as_str().to_owned()
        };
        let cases: [(u64, bool, &dyn fmt::Display); 6] = [
            (0, false, &0),
            (7, false, &7),
            (u64::MAX, false, &u64::MAX),
            (1, true, &-1),
            (1 << 63, true, &i64::MIN),
            (42, true, &-42_i128),
        ];
        for (magnitude, negative, display) in cases {
            let mut key = Key::<u8>::new("e", u32::MAX);
            key.push_integer(magnitude, negative);
            assert_eq!(key.as_str(), by_display(display));
        }
        assert_eq!(Key::<u8>::new("e", 0).as_str(), "{e:v0}");
    }

    /// The buffer's edge: a key of exactly its size stays on the stack,
    /// one byte more moves it to a `String`, and both read back whole.
    #[test]
    fn a_draft_spills_past_its_buffer_whole() {
        let head = Key::<u8>::new("e", 1).as_str().len(); // "{e:v1}"
        for extra in [0, 1, 2, DRAFT_BYTES] {
            // ":" and the part go before the closing brace.
            let part = "x".repeat((DRAFT_BYTES - head - 1) + extra);
            let mut draft = KeyDraft::<u8>::new("e", 1);
            draft.push_arg(&part);
            let on_stack = matches!(draft.text, DraftText::Stack { .. });
            assert_eq!(on_stack, extra == 0, "extra {extra}");
            let key = Key::<u8>::new("e", 1).arg(&part);
            assert_eq!(draft.as_str(), Some(key.as_str()));
            assert_eq!(draft.into_key(), key);
        }
    }

    /// A part of either kind, pushed to a key and to a draft alike.
    #[derive(Debug, Clone)]
    enum TestPart {
        Text(String),
        Integer(u64, bool),
    }

    fn test_part() -> impl Strategy<Value = TestPart> {
        prop_oneof![
            "[:{}%a-c\\u{e9}\\u{1F600}]{0,40}".prop_map(TestPart::Text),
            (any::<u64>(), any::<bool>()).prop_map(|(m, n)| TestPart::Integer(m, n)),
        ]
    }

    proptest! {
        /// A draft writes a key's exact text, on the stack or, past its
        /// buffer, in a `String`, and becomes that key.
        #[test]
        fn a_draft_writes_the_keys_text(
            entity in "[:{}%a-z\\u{1F600}]{0,60}",
            version in any::<u32>(),
            parts in proptest::collection::vec(test_part(), 0..6),
        ) {
            let mut key = Key::<u8>::new(&entity, version);
            let mut draft = KeyDraft::<u8>::new(&entity, version);
            for part in &parts {
                match part {
                    TestPart::Text(text) => {
                        key.push_arg(text);
                        draft.push_arg(text);
                    }
                    TestPart::Integer(magnitude, negative) => {
                        key.push_integer(*magnitude, *negative);
                        draft.push_integer(*magnitude, *negative);
                    }
                }
            }
            prop_assert_eq!(draft.as_str(), Some(key.as_str()));
            prop_assert_eq!(draft.into_key(), key);
        }

        /// A site's kept head gives the text `new` writes, for the pair it
        /// was written for and for any other pair the same site passes.
        #[test]
        fn a_kept_head_writes_the_keys_text(
            first in "[:{}%a-z\\u{1F600}]{0,60}",
            second in "[:{}%a-z]{0,8}",
            versions in any::<(u32, u32)>(),
            part in any::<u64>(),
        ) {
            let head = KeyHead::new();
            let pairs = [(&first, versions.0), (&second, versions.0), (&first, versions.1)];
            for (entity, version) in pairs.into_iter().chain(pairs) {
                let mut draft = KeyDraft::<u8>::at(&head, entity, version);
                draft.push_integer(part, false);
                let key = Key::<u8>::new(entity, version).arg(part);
                prop_assert_eq!(draft.as_str(), Some(key.as_str()));
            }
        }

        #[test]
        fn escaping_matches_char_by_char(part in "[:{}%a-c\\u{e9}\\u{1F600}]{0,12}") {
            let mut fast = String::new();
            escape_into(&mut fast, &part);
            let slow: String = part
                .chars()
                .map(|c| match c {
                    '%' => "%25".to_owned(),
                    ':' => "%3A".to_owned(),
                    '{' => "%7B".to_owned(),
                    '}' => "%7D".to_owned(),
                    c => c.to_string(),
                })
                .collect();
            prop_assert_eq!(fast, slow);
        }

        #[test]
        fn encoding_is_injective(
            a in proptest::collection::vec("[:{}%a-c\\u{e9}\\u{1F600}]{0,4}", 0..4),
            b in proptest::collection::vec("[:{}%a-c\\u{e9}\\u{1F600}]{0,4}", 0..4),
        ) {
            prop_assume!(a != b);
            prop_assert_ne!(key_of(&a), key_of(&b));
        }

        #[test]
        fn any_strings_are_injective(
            a in proptest::collection::vec(any::<String>(), 0..3),
            b in proptest::collection::vec(any::<String>(), 0..3),
        ) {
            prop_assume!(a != b);
            prop_assert_ne!(key_of(&a), key_of(&b));
        }
    }
}

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
        body.push('{');
        escape_into(&mut body, entity);
        body.push_str(":v");
        push_decimal(&mut body, u64::from(version), false);
        body.push('}');
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
        self.body.pop(); // the closing brace, put back below
        self.body.push(':');
        let start = self.body.len();
        let _ = write!(EscapingWriter(&mut self.body), "{arg}");
        if self.body.len() == start {
            self.body.push('%');
        }
        self.body.push('}');
    }

    /// Appends an integer argument: the same part as [`Key::push_arg`]
    /// writes for it (its decimal form needs no escaping), without going
    /// through `fmt`. The `#[cached]` macro uses it for integer parts.
    pub(crate) fn push_integer(&mut self, magnitude: u64, negative: bool) {
        self.body.pop(); // the closing brace
        self.body.push(':');
        push_decimal(&mut self.body, magnitude, negative);
        self.body.push('}');
    }
}

/// Writes `magnitude` in decimal, after a `-` when `negative`: what
/// `Display` writes for an integer.
fn push_decimal(out: &mut String, magnitude: u64, negative: bool) {
    if negative {
        out.push('-');
    }
    out.push_str(itoa::Buffer::new().format(magnitude));
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
pub(crate) fn escape_into(out: &mut String, part: &str) {
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

struct EscapingWriter<'a>(&'a mut String);

impl fmt::Write for EscapingWriter<'_> {
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

    proptest! {
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

//! What an L1 entry costs in memory, so that `l1_max_bytes` bounds the
//! process's memory and not only the encoded bytes.
//!
//! A decoded value can be several times its encoding (postcard writes a
//! small `u64` in one byte; in memory it takes eight, and a `String` or a
//! map entry adds headers, table slots and allocator rounding). L1 holds
//! decoded values, so it weighs them by walking the value with a
//! [`Serializer`] that adds up heap sizes instead of writing bytes:
//!
//! - the value itself sits in the `Arc` L1 holds: `size_of::<V>()` plus
//!   the `Arc`'s two counts;
//! - a string or byte string owns a heap block of its length (a decoded
//!   `String` has no spare capacity);
//! - a sequence owns a block of its elements' inline sizes (primitives
//!   at their size, a `String` or `Vec` header at 24, a struct at its
//!   fields' sum rounded to their alignment), and each element's own heap
//!   on top;
//! - a map is weighed as the larger of a hashbrown table (buckets, control
//!   bytes) and a `BTreeMap` filled in key order (nodes about 6/11 full):
//!   serde does not say which it is;
//! - structs, tuples, options and enums own nothing beyond their fields;
//! - every heap block is rounded as glibc's malloc rounds it (8 bytes of
//!   header, 16-byte steps, 32 at least).
//!
//! The walk does no allocation and no formatting. What it cannot see:
//! spare capacity in a value built by the application (`set` of a `Vec`
//! grown by pushes), `Box`/`Arc` indirections (serde serializes them
//! transparently), and shared `Arc`s counted once per holder.

use std::fmt;
use std::mem::size_of_val;

use serde::ser::{self, Serialize, Serializer};

use crate::entry::Meta;

/// What one L1 entry costs beyond its key, metadata and value: moka's
/// hash-table bucket, entry info, deque and timer-wheel nodes and sketch
/// slot, our `L1Entry` and its `Arc`, with their allocator rounding and the
/// slack of a cache that keeps evicting (entries waiting for maintenance,
/// freed blocks not yet reused). Measured, not derived: the RSS growth per
/// live entry of an L1 at 10x overfill, less the key and value, was 633
/// bytes for `u64` values and 623 for `Vec<u64>` ones (moka 0.12.16, glibc,
/// x86_64; "P12: L1 memory" in `benches/README.md`).
pub(crate) const ENTRY_OVERHEAD: usize = 630;

/// The heap block glibc's malloc hands out for a request of `n` bytes:
/// 8 bytes of header, rounded up to 16, at least 32; nothing for 0.
#[inline]
pub(crate) const fn block(n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let chunk = (n.saturating_add(8 + 15)) & !15;
    if chunk < 32 {
        32
    } else {
        chunk
    }
}

/// The memory held by an `Arc<str>` key of `len` bytes.
#[inline]
pub(crate) const fn key_bytes(len: usize) -> usize {
    block(2 * size_of::<usize>() + len)
}

/// The memory held by an entry's metadata beyond the entry itself: its tag
/// stamps (each tag name its own `Arc<str>`).
#[inline]
pub(crate) fn meta_bytes(meta: &Meta) -> usize {
    let tags = &meta.tags;
    block(2 * size_of::<usize>() + size_of_val(&**tags))
        + tags
            .iter()
            .map(|(tag, _)| key_bytes(tag.len()))
            .sum::<usize>()
}

/// The memory a decoded `value` holds once in L1 as an `Arc`: its own
/// size, the `Arc`'s counts, and everything it owns on the heap. An
/// estimate; see the module docs for what it counts.
#[inline]
pub(crate) fn value_bytes<V: Serialize + ?Sized>(value: &V) -> usize {
    let mut heap = 0;
    // Our serializer fails nowhere; a value's own `Serialize` may (a
    // poisoned lock). Then what was counted so far stands.
    let _ = value.serialize(Sizer { heap: &mut heap });
    block(2 * size_of::<usize>() + size_of_val(value)).saturating_add(heap)
}

/// The heap held by a hashbrown table of `n` entries of `entry` bytes,
/// sized exactly for `n` (as serde's map visitor does): buckets a power of
/// two at most 7/8 full, one control byte each plus a group of 16.
fn hash_table(n: usize, entry: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let buckets = if n < 4 {
        4
    } else if n < 8 {
        8
    } else {
        (n.saturating_mul(8) / 7).next_power_of_two()
    };
    let slots = (buckets.saturating_mul(entry) + 15) & !15;
    block(slots + buckets + 16)
}

/// `BTreeMap`'s fan-out: up to 11 entries per node.
const BTREE_CAPACITY: usize = 11;

/// The heap held by a `BTreeMap` of `n` entries of `key + value` bytes
/// filled in key order (as decoding a serialized one does): one leaf while
/// `n` fits, then each split leaves 6 entries behind and sends one up, so
/// about one leaf per 7 entries and one internal node per 7 leaves.
fn btree(n: usize, entry: usize) -> usize {
    if n == 0 {
        return 0;
    }
    // parent pointer, parent index, length; then the keys and the values.
    let leaf = block(8 + 2 + 2 + BTREE_CAPACITY.saturating_mul(entry));
    let internal = block(8 + 2 + 2 + BTREE_CAPACITY.saturating_mul(entry) + 8 * 12);
    if n <= BTREE_CAPACITY {
        return leaf;
    }
    let leaves = n.div_ceil(7);
    let internals = leaves.div_ceil(7);
    leaves
        .saturating_mul(leaf)
        .saturating_add(internals.saturating_mul(internal))
}

/// The walk's error: only a value's own `Serialize` raises one.
#[derive(Debug)]
pub(crate) struct Unweighable;

impl fmt::Display for Unweighable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the value failed to serialize while being weighed")
    }
}

impl std::error::Error for Unweighable {}

impl ser::Error for Unweighable {
    fn custom<T: fmt::Display>(_msg: T) -> Self {
        Unweighable
    }
}

/// The inline size of a value as the walk sees it (the outermost value is
/// measured with `size_of_val` instead): serde hands sequence elements and
/// map entries over by reference, so `size_of_val` there would say 8.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Inline {
    size: usize,
    align: usize,
    /// Has a niche, so an `Option` of it costs no tag (pointers, `bool`).
    niche: bool,
}

impl Inline {
    const fn prim(size: usize) -> Self {
        Inline {
            size,
            align: size,
            niche: false,
        }
    }

    /// A `String` or `Vec`: pointer, capacity, length.
    const HEADER: Inline = Inline {
        size: 24,
        align: 8,
        niche: true,
    };

    /// A `HashMap` with the default hasher (a `BTreeMap` is 24).
    const MAP: Inline = Inline {
        size: 48,
        align: 8,
        niche: true,
    };

    const UNIT: Inline = Inline {
        size: 0,
        align: 1,
        niche: false,
    };

    /// Its size rounded up to its alignment, as an array element.
    fn padded(self) -> usize {
        let align = self.align.max(1);
        self.size.div_ceil(align).saturating_mul(align)
    }

    /// With a discriminant in front, as an enum variant's or a niche-less
    /// `Option`'s.
    fn tagged(self) -> Inline {
        let align = self.align.max(1);
        Inline {
            size: (self.size + 1).div_ceil(align).saturating_mul(align),
            align,
            niche: true,
        }
    }
}

/// Adds the heap a value owns to `heap`; returns the value's inline size.
struct Sizer<'a> {
    heap: &'a mut usize,
}

impl Sizer<'_> {
    #[inline]
    fn own(&mut self, bytes: usize) {
        *self.heap = self.heap.saturating_add(bytes);
    }
}

/// Counts the bytes a `Display` writes, for `collect_str`.
struct Count(usize);

impl fmt::Write for Count {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}

type Walk = Result<Inline, Unweighable>;

impl<'a> Serializer for Sizer<'a> {
    type Ok = Inline;
    type Error = Unweighable;
    type SerializeSeq = Seq<'a>;
    type SerializeTuple = Fields<'a>;
    type SerializeTupleStruct = Fields<'a>;
    type SerializeTupleVariant = Fields<'a>;
    type SerializeMap = Map<'a>;
    type SerializeStruct = Fields<'a>;
    type SerializeStructVariant = Fields<'a>;

    fn is_human_readable(&self) -> bool {
        // As postcard: compact forms (an address as bytes, not a string).
        false
    }

    fn serialize_bool(self, _: bool) -> Walk {
        Ok(Inline {
            niche: true,
            ..Inline::prim(1)
        })
    }
    fn serialize_i8(self, _: i8) -> Walk {
        Ok(Inline::prim(1))
    }
    fn serialize_i16(self, _: i16) -> Walk {
        Ok(Inline::prim(2))
    }
    fn serialize_i32(self, _: i32) -> Walk {
        Ok(Inline::prim(4))
    }
    fn serialize_i64(self, _: i64) -> Walk {
        Ok(Inline::prim(8))
    }
    fn serialize_i128(self, _: i128) -> Walk {
        Ok(Inline::prim(16))
    }
    fn serialize_u8(self, _: u8) -> Walk {
        Ok(Inline::prim(1))
    }
    fn serialize_u16(self, _: u16) -> Walk {
        Ok(Inline::prim(2))
    }
    fn serialize_u32(self, _: u32) -> Walk {
        Ok(Inline::prim(4))
    }
    fn serialize_u64(self, _: u64) -> Walk {
        Ok(Inline::prim(8))
    }
    fn serialize_u128(self, _: u128) -> Walk {
        Ok(Inline::prim(16))
    }
    fn serialize_f32(self, _: f32) -> Walk {
        Ok(Inline::prim(4))
    }
    fn serialize_f64(self, _: f64) -> Walk {
        Ok(Inline::prim(8))
    }
    fn serialize_char(self, _: char) -> Walk {
        Ok(Inline {
            niche: true,
            ..Inline::prim(4)
        })
    }
    fn serialize_str(mut self, v: &str) -> Walk {
        self.own(block(v.len()));
        Ok(Inline::HEADER)
    }
    fn serialize_bytes(mut self, v: &[u8]) -> Walk {
        self.own(block(v.len()));
        Ok(Inline::HEADER)
    }
    fn collect_str<T: fmt::Display + ?Sized>(mut self, value: &T) -> Walk {
        let mut count = Count(0);
        let _ = fmt::write(&mut count, format_args!("{value}"));
        self.own(block(count.0));
        Ok(Inline::HEADER)
    }
    fn serialize_none(self) -> Walk {
        // What is absent is not known; a pointer's worth.
        Ok(Inline {
            size: 8,
            align: 8,
            niche: true,
        })
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Walk {
        let inner = value.serialize(self)?;
        Ok(if inner.niche { inner } else { inner.tagged() })
    }
    fn serialize_unit(self) -> Walk {
        Ok(Inline::UNIT)
    }
    fn serialize_unit_struct(self, _: &'static str) -> Walk {
        Ok(Inline::UNIT)
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Walk {
        Ok(Inline::UNIT.tagged())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, value: &T) -> Walk {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        value: &T,
    ) -> Walk {
        Ok(value.serialize(self)?.tagged())
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Seq<'a>, Unweighable> {
        Ok(Seq {
            heap: self.heap,
            inline: 0,
        })
    }
    fn serialize_tuple(self, _: usize) -> Result<Fields<'a>, Unweighable> {
        Ok(Fields::new(self.heap, false))
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Fields<'a>, Unweighable> {
        Ok(Fields::new(self.heap, false))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Fields<'a>, Unweighable> {
        Ok(Fields::new(self.heap, true))
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Map<'a>, Unweighable> {
        Ok(Map {
            heap: self.heap,
            entries: 0,
            inline: 0,
            key: Inline::UNIT,
        })
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Fields<'a>, Unweighable> {
        Ok(Fields::new(self.heap, false))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Fields<'a>, Unweighable> {
        Ok(Fields::new(self.heap, true))
    }
}

/// Fields, tuple members and variant contents: inline in their parent,
/// laid out without padding between them (Rust reorders fields), the whole
/// rounded up to the largest alignment.
pub(crate) struct Fields<'a> {
    heap: &'a mut usize,
    size: usize,
    align: usize,
    niche: bool,
    variant: bool,
}

impl<'a> Fields<'a> {
    fn new(heap: &'a mut usize, variant: bool) -> Self {
        Fields {
            heap,
            size: 0,
            align: 1,
            niche: false,
            variant,
        }
    }

    #[inline]
    fn field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unweighable> {
        let inline = value.serialize(Sizer {
            heap: &mut *self.heap,
        })?;
        self.size = self.size.saturating_add(inline.size);
        self.align = self.align.max(inline.align);
        self.niche |= inline.niche;
        Ok(())
    }

    fn done(self) -> Walk {
        let inline = Inline {
            size: self.size,
            align: self.align,
            niche: self.niche,
        };
        let inline = Inline {
            size: inline.padded(),
            ..inline
        };
        Ok(if self.variant {
            inline.tagged()
        } else {
            inline
        })
    }
}

macro_rules! fields {
    ($($trait:ident :: $method:ident ($($name:ident: $ty:ty),*);)*) => {$(
        impl ser::$trait for Fields<'_> {
            type Ok = Inline;
            type Error = Unweighable;
            #[inline]
            fn $method<T: Serialize + ?Sized>(
                &mut self,
                $($name: $ty,)*
                value: &T,
            ) -> Result<(), Unweighable> {
                $(let _ = $name;)*
                self.field(value)
            }
            fn end(self) -> Walk {
                self.done()
            }
        }
    )*};
}

fields! {
    SerializeTuple::serialize_element();
    SerializeTupleStruct::serialize_field();
    SerializeTupleVariant::serialize_field();
    SerializeStruct::serialize_field(key: &'static str);
    SerializeStructVariant::serialize_field(key: &'static str);
}

/// A sequence: one heap block of its elements, each element's heap besides.
pub(crate) struct Seq<'a> {
    heap: &'a mut usize,
    inline: usize,
}

impl ser::SerializeSeq for Seq<'_> {
    type Ok = Inline;
    type Error = Unweighable;

    #[inline]
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unweighable> {
        let inline = value.serialize(Sizer {
            heap: &mut *self.heap,
        })?;
        self.inline = self.inline.saturating_add(inline.padded());
        Ok(())
    }

    fn end(self) -> Walk {
        *self.heap = self.heap.saturating_add(block(self.inline));
        Ok(Inline::HEADER)
    }
}

/// A map: its table or tree, each key's and value's heap besides.
pub(crate) struct Map<'a> {
    heap: &'a mut usize,
    entries: usize,
    /// The entries' inline sizes, each laid out as a `(K, V)` tuple.
    inline: usize,
    key: Inline,
}

impl ser::SerializeMap for Map<'_> {
    type Ok = Inline;
    type Error = Unweighable;

    #[inline]
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Unweighable> {
        self.entries += 1;
        self.key = key.serialize(Sizer {
            heap: &mut *self.heap,
        })?;
        Ok(())
    }

    #[inline]
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unweighable> {
        let value = value.serialize(Sizer {
            heap: &mut *self.heap,
        })?;
        let entry = Inline {
            size: self.key.size.saturating_add(value.size),
            align: self.key.align.max(value.align),
            niche: false,
        };
        self.inline = self.inline.saturating_add(entry.padded());
        Ok(())
    }

    fn end(self) -> Walk {
        let entry = self.inline.checked_div(self.entries).unwrap_or(0);
        // serde does not say which map this is. A hashbrown table costs
        // less than a tree of large entries and more than a tree of small
        // ones: weigh the larger, since the bound is a memory bound.
        let table = hash_table(self.entries, entry).max(btree(self.entries, entry));
        *self.heap = self.heap.saturating_add(table);
        Ok(Inline::MAP)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    #[test]
    fn blocks_round_as_glibc_does() {
        assert_eq!(block(0), 0);
        assert_eq!(block(1), 32);
        assert_eq!(block(24), 32);
        assert_eq!(block(25), 48);
        assert_eq!(block(800), 816);
    }

    #[test]
    fn primitives_weigh_their_arc() {
        assert_eq!(value_bytes(&7_u64), block(16 + 8));
        assert_eq!(value_bytes(&(1_u8, 2_u64)), block(16 + 16));
    }

    #[test]
    fn strings_and_vecs_own_their_blocks() {
        let s = String::from("x").repeat(100);
        assert_eq!(value_bytes(&s), block(16 + 24) + block(100));
        let v: Vec<u64> = (0..100).collect();
        assert_eq!(value_bytes(&v), block(16 + 24) + block(800));
        let nested = vec![String::from("ab"); 3];
        assert_eq!(
            value_bytes(&nested),
            block(16 + 24) + block(3 * 24) + 3 * block(2)
        );
        assert_eq!(value_bytes(&Vec::<u64>::new()), block(16 + 24));
        assert_eq!(value_bytes(""), block(16));
    }

    #[derive(serde::Serialize)]
    struct Row {
        id: u64,
        name: String,
        flag: bool,
        scores: Vec<u32>,
    }

    /// Elements are laid out as Rust lays them out: fields packed, the
    /// whole rounded up to the largest alignment.
    #[test]
    fn a_vec_of_structs_weighs_its_padded_elements() {
        let rows: Vec<Row> = (0..10)
            .map(|i| Row {
                id: i,
                name: "abc".into(),
                flag: true,
                scores: vec![1, 2, 3],
            })
            .collect();
        assert_eq!(size_of::<Row>(), 8 + 24 + 24 + 8);
        let each = block(3) + block(12);
        assert_eq!(
            value_bytes(&rows),
            block(16 + 24) + block(10 * size_of::<Row>()) + 10 * each
        );
    }

    #[test]
    fn a_hash_map_weighs_its_table() {
        // 16 entries of (String, u32), padded to 32: 32 buckets.
        let map: HashMap<String, u32> = (0..16).map(|i| (format!("field-{i:02}"), i)).collect();
        let table = block(32 * 32 + 32 + 16);
        let strings = 16 * block(8);
        let bytes = value_bytes(&map);
        assert!(bytes >= block(16 + 48) + strings + table, "{bytes}");
    }

    #[test]
    fn maps_weigh_at_least_their_entries() {
        let map: HashMap<u64, u64> = (0..100).map(|i| (i, i)).collect();
        let tree: BTreeMap<u64, u64> = (0..100).map(|i| (i, i)).collect();
        for bytes in [value_bytes(&map), value_bytes(&tree)] {
            assert!(bytes > 100 * 16 * 3 / 2, "{bytes}");
            assert!(bytes < 100 * 16 * 4, "{bytes}");
        }
    }
}

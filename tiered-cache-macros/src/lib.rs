//! The `#[cached]` attribute macro of `tiered-cache`. Use it through
//! `tiered_cache::cached` (default feature `macros`), where its docs and
//! examples live.
//!
//! Layout (after tokio-macros and tracing-attributes): this file holds the
//! entry point, `args` parses the attribute, `expand` checks the function
//! against it and generates the code. Generated code calls only
//! `::tiered_cache::__private::…` (or the path given with `crate = ..`).
//!
//! The examples in `cached.md` need the runtime crate, so they run as
//! `tiered-cache`'s doctests, not this crate's.

use proc_macro::TokenStream;

mod args;
mod expand;

#[doc = include_str!("cached.md")]
#[proc_macro_attribute]
pub fn cached(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::cached(args.into(), item.into()).into()
}

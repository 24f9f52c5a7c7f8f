//! The `#[cached]` attribute macro of `tiered-cache`. Use it through
//! `tiered_cache::cached` (default feature `macros`), where its docs and
//! examples live.
//!
//! Layout (after tokio-macros and tracing-attributes): this file holds the
//! entry point; `args` parses the attribute, `check` checks the function
//! against it and makes a plan, `expand` generates the code from the plan,
//! and `diag` gathers the errors. Generated code calls only
//! `::tiered_cache::__private::…` (or the path given with `crate = ..`).
//!
//! The examples in `cached.md` need the runtime crate, so they run as
//! `tiered-cache`'s doctests, not this crate's.

use proc_macro::TokenStream;

mod args;
mod check;
mod diag;
mod expand;

#[doc = include_str!("cached.md")]
#[proc_macro_attribute]
pub fn cached(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::cached(args.into(), item.into()).into()
}

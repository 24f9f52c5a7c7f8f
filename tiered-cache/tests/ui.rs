//! Compile-time behaviour of `#[cached]`: every diagnostic has a case in
//! `ui/fail` with its expected output (`.stderr`), and `ui/pass` covers the
//! shapes that must keep compiling.
//!
//! After changing a diagnostic, regenerate the expected output with
//! `TRYBUILD=overwrite cargo test -p tiered-cache --test ui` and review the diff.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}

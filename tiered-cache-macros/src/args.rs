//! Parsing of `#[cached(...)]`: `name = value` pairs read by one loop, which
//! looks each name up in [`ARGUMENTS`] (the table of names and how to read
//! their values), reports a duplicate at its second occurrence and an
//! unknown name with the list of valid ones (tokio-macros `entry.rs`).
//! Values are Rust expressions; string literals are templates or humantime
//! durations, checked here. Names in templates are checked in `check`.

use std::time::Duration;

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::quote;
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Expr, Ident, Lit, LitStr, Member, Path, Token};

use crate::diag::{did_you_mean, list, Diag};

/// One parsed argument: its name as written (for spans), and its value.
pub(crate) struct Arg<T> {
    pub(crate) kw: Ident,
    pub(crate) value: T,
}

/// The parsed attribute. Every field is `None` when the argument was not given.
#[derive(Default)]
pub(crate) struct Args {
    pub(crate) key: Option<Arg<Value<Template>>>,
    pub(crate) ttl: Option<Arg<Value<Duration>>>,
    pub(crate) tags: Option<Arg<Vec<Value<Template>>>>,
    pub(crate) version: Option<Arg<Expr>>,
    pub(crate) name: Option<Arg<Expr>>,
    pub(crate) cache: Option<Arg<Expr>>,
    pub(crate) skip: Option<Arg<Vec<Ident>>>,
    pub(crate) stale: Option<Arg<Value<Duration>>>,
    pub(crate) negative_ttl: Option<Arg<Value<Duration>>>,
    pub(crate) timeout: Option<Arg<Value<Duration>>>,
    /// The XFetch beta; `false` is the literal `0.0`.
    pub(crate) early_refresh: Option<Arg<Value<f64>>>,
    /// The fleet lock's lease.
    pub(crate) fleet_lock: Option<Arg<Value<Duration>>>,
    /// `None` for `key_fn = false` (no companion).
    pub(crate) key_fn: Option<Arg<Option<Ident>>>,
    pub(crate) krate: Option<Arg<Path>>,
}

type Setter = fn(&mut Args, Ident, Expr) -> syn::Result<()>;

/// Every argument `#[cached]` accepts, in the order the docs present them,
/// with how its value is read.
const ARGUMENTS: &[(&str, Setter)] = &[
    ("key", |a, kw, v| put(&mut a.key, template(v), kw)),
    ("ttl", |a, kw, v| put(&mut a.ttl, duration(&kw, v), kw)),
    ("tags", |a, kw, v| put(&mut a.tags, tags(v), kw)),
    ("version", |a, kw, v| put(&mut a.version, version(v), kw)),
    ("name", |a, kw, v| put(&mut a.name, entity(v), kw)),
    ("cache", |a, kw, v| put(&mut a.cache, Ok(v), kw)),
    ("skip", |a, kw, v| put(&mut a.skip, skip(v), kw)),
    ("stale", |a, kw, v| put(&mut a.stale, duration(&kw, v), kw)),
    ("negative_ttl", |a, kw, v| {
        put(&mut a.negative_ttl, duration(&kw, v), kw)
    }),
    ("timeout", |a, kw, v| {
        put(&mut a.timeout, duration(&kw, v), kw)
    }),
    ("early_refresh", |a, kw, v| {
        put(&mut a.early_refresh, early_refresh(v), kw)
    }),
    ("fleet_lock", |a, kw, v| {
        put(&mut a.fleet_lock, duration(&kw, v), kw)
    }),
    ("key_fn", |a, kw, v| put(&mut a.key_fn, key_fn(v), kw)),
    ("crate", |a, kw, v| put(&mut a.krate, krate(v), kw)),
];

fn put<T>(slot: &mut Option<Arg<T>>, value: syn::Result<T>, kw: Ident) -> syn::Result<()> {
    *slot = Some(Arg { kw, value: value? });
    Ok(())
}

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let (mut args, mut diag, mut seen) = (Args::default(), Diag::default(), Vec::new());
        while !input.is_empty() {
            // A syntax error ends parsing; a bad value does not.
            if let Err(e) = parse_one(input, &mut args, &mut seen, &mut diag) {
                diag.push(e);
                break;
            }
        }
        diag.finish(args)
    }
}

/// One `name = value` and the comma after it.
fn parse_one(
    input: ParseStream<'_>,
    args: &mut Args,
    seen: &mut Vec<String>,
    diag: &mut Diag,
) -> syn::Result<()> {
    let names = || ARGUMENTS.iter().map(|(name, _)| *name);
    let kw = Ident::parse_any(input)
        .map_err(|e| syn::Error::new(e.span(), format!("expected one of: {}", list(names()))))?;
    let name = kw.unraw().to_string();
    match ARGUMENTS.iter().find(|(n, _)| *n == name) {
        None => {
            let hint = did_you_mean(&name, names());
            let msg = format!(
                "unknown argument `{name}`{hint}; expected one of: {}",
                list(names())
            );
            diag.at(kw.span(), msg);
            skip_value(input);
        }
        Some((_, set)) => {
            if seen.contains(&name) {
                let msg = format!("duplicate argument `{name}`: each argument may be given once");
                diag.at(kw.span(), msg);
            }
            seen.push(name);
            input.parse::<Token![=]>()?;
            let value = input.parse()?;
            diag.ok(set(args, kw, value));
        }
    }
    if !input.is_empty() {
        input.parse::<Token![,]>()?;
    }
    Ok(())
}

/// After an unknown argument name, skips `= value` up to the next top-level
/// comma so that later arguments are still checked.
fn skip_value(input: ParseStream<'_>) {
    let _ = input.step(|cursor| {
        let mut rest = *cursor;
        while let Some((tt, next)) = rest.token_tree() {
            if matches!(&tt, TokenTree::Punct(p) if p.as_char() == ',') {
                break;
            }
            rest = next;
        }
        Ok(((), rest))
    });
}

/// A value given as a literal, checked at compile time, or as an expression.
/// `key = ..` and each tag are a template or an expression; for the key, a
/// tuple expression gives one part per element.
pub(crate) enum Value<T> {
    Literal(T),
    Expr(Box<Expr>),
}

fn lit(v: &Expr) -> Option<&Lit> {
    match v {
        Expr::Lit(e) => Some(&e.lit),
        _ => None,
    }
}

fn error(tokens: impl quote::ToTokens, msg: impl std::fmt::Display) -> syn::Error {
    syn::Error::new_spanned(tokens, msg)
}

fn template(v: Expr) -> syn::Result<Value<Template>> {
    match lit(&v) {
        Some(Lit::Str(s)) => Template::parse(s).map(Value::Literal),
        _ => Ok(Value::Expr(Box::new(v))),
    }
}

/// The elements of `[a, b]`.
fn list_of(v: Expr, example: &str) -> syn::Result<Punctuated<Expr, Token![,]>> {
    match v {
        Expr::Array(a) => Ok(a.elems),
        v => Err(error(v, format!("expected a list in brackets: {example}"))),
    }
}

fn tags(v: Expr) -> syn::Result<Vec<Value<Template>>> {
    let mut diag = Diag::default();
    let elems = list_of(v, r#"`tags = ["products", "category:{cat}"]`"#)?;
    let tags = elems
        .into_iter()
        .filter_map(|e| diag.ok(template(e)))
        .collect();
    diag.finish(tags)
}

/// A single identifier (`db`, `self`, `r#type`), as an expression.
pub(crate) fn ident(v: &Expr) -> Option<Ident> {
    match v {
        Expr::Path(p) if p.qself.is_none() && p.attrs.is_empty() => p.path.get_ident().cloned(),
        _ => None,
    }
}

fn skip(v: Expr) -> syn::Result<Vec<Ident>> {
    let mut diag = Diag::default();
    let mut names: Vec<Ident> = Vec::new();
    for e in list_of(v, "`skip = [db]`")? {
        match ident(&e) {
            Some(n) if names.contains(&n) => {
                diag.at(n.span(), format!("`{n}` is already listed in `skip`"))
            }
            Some(n) => names.push(n),
            None => diag.push(error(e, "`skip` lists parameter names: `skip = [db]`")),
        }
    }
    diag.finish(names)
}

fn version(v: Expr) -> syn::Result<Expr> {
    if let Some(Lit::Int(int)) = lit(&v) {
        let msg = |e| error(int, format!("`version` is a `u32` schema version: {e}"));
        int.base10_parse::<u32>().map_err(msg)?;
    }
    Ok(v)
}

fn entity(v: Expr) -> syn::Result<Expr> {
    match lit(&v) {
        Some(Lit::Str(s)) if s.value().is_empty() => Err(error(
            s,
            "`name` must not be empty: it names the entity in every key",
        )),
        _ => Ok(v),
    }
}

/// A humantime literal, checked here, or a `Duration` expression.
fn duration(name: &Ident, v: Expr) -> syn::Result<Value<Duration>> {
    let Some(lit) = lit(&v) else {
        return Ok(Value::Expr(Box::new(v)));
    };
    let Lit::Str(s) = lit else {
        return Err(error(
            lit,
            format!(
                "`{name}` takes a duration: a literal like \"30m\" or \"1h 30s\", \
                 or a `Duration` expression"
            ),
        ));
    };
    let text = s.value();
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d.is_zero() => Err(error(s, format!("`{name}` must be longer than zero"))),
        Ok(d) => Ok(Value::Literal(d)),
        Err(e) => Err(error(
            s,
            format!(
                "invalid duration {text:?} for `{name}`: {e}; write it like \"30m\", \"1h 30s\" \
                 or \"250ms\""
            ),
        )),
    }
}

/// `false`, a positive beta literal (checked here), or an `f64` expression.
fn early_refresh(v: Expr) -> syn::Result<Value<f64>> {
    let not_positive = "`early_refresh` beta must be positive and finite (or `false` to disable)";
    let lit = match &v {
        Expr::Lit(e) => &e.lit,
        Expr::Unary(u) if matches!(u.op, syn::UnOp::Neg(_)) && matches!(*u.expr, Expr::Lit(_)) => {
            return Err(error(v, not_positive))
        }
        _ => return Ok(Value::Expr(Box::new(v))),
    };
    let beta = match lit {
        Lit::Bool(b) if !b.value => return Ok(Value::Literal(0.0)),
        Lit::Float(f) => f.base10_parse::<f64>()?,
        Lit::Int(i) => i.base10_parse::<f64>()?,
        _ => {
            return Err(error(
                lit,
                "`early_refresh` takes the XFetch beta (an `f64`; `1.0` is the usual choice) \
                 or `false`",
            ))
        }
    };
    if !(beta.is_finite() && beta > 0.0) {
        return Err(error(lit, not_positive));
    }
    Ok(Value::Literal(beta))
}

fn key_fn(v: Expr) -> syn::Result<Option<Ident>> {
    match (lit(&v), ident(&v)) {
        (Some(Lit::Bool(b)), _) if !b.value => Ok(None),
        (_, Some(name)) => Ok(Some(name)),
        _ => Err(error(
            v,
            "`key_fn` takes a function name, or `false` for no key builder",
        )),
    }
}

fn krate(v: Expr) -> syn::Result<Path> {
    match v {
        Expr::Path(p)
            if p.qself.is_none() && p.path.segments.iter().all(|s| s.arguments.is_none()) =>
        {
            Ok(p.path)
        }
        v => Err(error(
            v,
            "`crate` takes a path to `tiered_cache`: `crate = my::reexport`",
        )),
    }
}

/// A format-like template: `"product:{id}"`, `"tenant:{self.tenant}"`.
pub(crate) struct Template {
    pub(crate) segments: Vec<Segment>,
}

pub(crate) enum Segment {
    /// Literal text, with `{{` and `}}` already unescaped.
    Text(String),
    Part(Placeholder),
}

/// `{root.member.member}` inside a template.
pub(crate) struct Placeholder {
    /// A parameter name, or `self`.
    pub(crate) root: Ident,
    pub(crate) members: Vec<Member>,
    /// The placeholder's own span inside the literal when the compiler can
    /// give one (`Literal::subspan`), else the literal's span.
    pub(crate) span: Span,
}

impl Placeholder {
    /// The expression this placeholder reads, e.g. `self.tenant`.
    pub(crate) fn expr(&self) -> TokenStream {
        let (root, members) = (&self.root, &self.members);
        quote!(#root #(. #members)*)
    }
}

impl Template {
    pub(crate) fn placeholders(&self) -> impl Iterator<Item = &Placeholder> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Part(p) => Some(p),
            Segment::Text(_) => None,
        })
    }

    /// The literal text of a template without placeholders.
    pub(crate) fn constant(&self) -> Option<String> {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Text(t) => Some(t.as_str()),
                Segment::Part(_) => None,
            })
            .collect()
    }

    /// Parses and checks the template syntax, reporting every problem.
    pub(crate) fn parse(lit: &LitStr) -> syn::Result<Template> {
        let value = lit.value();
        // Where `value[start..end]` is in the source: a sub-span of the
        // literal where the compiler supports it (nightly today) and the
        // value maps one-to-one onto the source (no escapes), else the literal.
        let (token, source) = (lit.token(), lit.token().to_string());
        let prefix = match source.strip_prefix('r') {
            Some(raw) => Some(1 + raw.chars().take_while(|&c| c == '#').count() + 1),
            None => (source.starts_with('"') && !source.contains('\\')).then_some(1),
        };
        let span = |start: usize, end: usize| {
            let sub = prefix.and_then(|p| token.subspan(p + start..p + end));
            sub.unwrap_or_else(|| lit.span())
        };
        let (mut diag, mut segments, mut text) = (Diag::default(), Vec::new(), String::new());
        let mut i = 0;
        while let Some(c) = value[i..].chars().next() {
            let doubled = value[i + c.len_utf8()..].starts_with(c);
            match c {
                '{' | '}' if doubled => {
                    text.push(c);
                    i += 2;
                }
                '{' => {
                    let Some(close) = value[i..].find('}').map(|j| i + j) else {
                        let msg = "unclosed `{` in template: write `{{` for a literal brace";
                        diag.at(span(i, value.len()), msg);
                        break;
                    };
                    let at = span(i, close + 1);
                    match placeholder(&value[i + 1..close], at) {
                        Ok(p) => {
                            if !text.is_empty() {
                                segments.push(Segment::Text(std::mem::take(&mut text)));
                            }
                            segments.push(Segment::Part(p));
                        }
                        Err(msg) => diag.at(at, msg),
                    }
                    i = close + 1;
                }
                '}' => {
                    let msg = "unmatched `}` in template: write `}}` for a literal brace";
                    diag.at(span(i, i + 1), msg);
                    i += 1;
                }
                c => {
                    text.push(c);
                    i += c.len_utf8();
                }
            }
        }
        if !text.is_empty() {
            segments.push(Segment::Text(text));
        }
        diag.finish(Template { segments })
    }
}

fn placeholder(inner: &str, span: Span) -> Result<Placeholder, String> {
    let shape = "a template part is `{name}`, `{name.field}` or `{self.field}`";
    if inner.is_empty() {
        return Err("empty `{}` in template: name a parameter, like `{id}`".into());
    }
    if let Some((name, _spec)) = inner.split_once(':') {
        return Err(format!(
            "format specs are not supported in templates: write `{{{name}}}`; \
             each part is written with its `Display` (or `Debug`) impl"
        ));
    }
    let mut segments = inner.split('.');
    let first = segments.next().unwrap_or_default();
    let root = match first {
        "self" => Ident::new("self", span),
        _ => name(first, span)
            .ok_or_else(|| format!("`{{{inner}}}` is not a parameter name: {shape}"))?,
    };
    let mut members = Vec::new();
    for seg in segments {
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            let index = seg
                .parse()
                .map_err(|_| format!("tuple index `{seg}` is too large"))?;
            members.push(Member::Unnamed(syn::Index { index, span }));
        } else {
            let field = name(seg, span);
            let field = field
                .ok_or_else(|| format!("`{{{inner}}}`: `{seg}` is not a field name: {shape}"))?;
            members.push(Member::Named(field));
        }
    }
    Ok(Placeholder {
        root,
        members,
        span,
    })
}

/// An identifier (optionally raw, `r#type`) with the given span, or `None`
/// (keywords and `_` cannot name a parameter or field).
fn name(s: &str, span: Span) -> Option<Ident> {
    let body = s.strip_prefix("r#").unwrap_or(s);
    let mut chars = body.chars();
    let word = chars.next().is_some_and(|c| c == '_' || c.is_alphabetic())
        && chars.all(|c| c == '_' || c.is_alphanumeric());
    if !word || matches!(body, "_" | "self" | "Self" | "super" | "crate") {
        return None;
    }
    // Rejects the other keywords.
    let mut ident = syn::parse_str::<Ident>(s).ok()?;
    ident.set_span(span);
    Some(ident)
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::ToTokens;

    fn parse(tokens: TokenStream) -> syn::Result<Args> {
        syn::parse2(tokens)
    }

    fn messages(e: syn::Error) -> Vec<String> {
        e.into_iter().map(|e| e.to_string()).collect()
    }

    fn err(tokens: TokenStream) -> Vec<String> {
        messages(parse(tokens).err().expect("expected an error"))
    }

    fn parse_template(s: &str) -> syn::Result<Template> {
        Template::parse(&LitStr::new(s, Span::call_site()))
    }

    fn parts(t: &Template) -> Vec<String> {
        t.placeholders().map(|p| p.expr().to_string()).collect()
    }

    fn literal<T: Copy>(v: &Option<Arg<Value<T>>>) -> Option<T> {
        match v.as_ref()?.value {
            Value::Literal(t) => Some(t),
            Value::Expr(_) => None,
        }
    }

    #[test]
    fn full_argument_list() {
        let args = parse(quote!(
            key = "product:{id}",
            ttl = "30m",
            tags = ["products", "category:{cat}", extra_tag()],
            version = 3,
            name = "product",
            cache = self.cache,
            skip = [db, self],
            stale = "1h",
            negative_ttl = "30s",
            timeout = Duration::from_millis(250),
            early_refresh = 1.0,
            fleet_lock = "5s",
            key_fn = product_key,
            crate = ::my::tiered_cache,
        ))
        .unwrap();
        let Some(Value::Literal(t)) = args.key.as_ref().map(|k| &k.value) else {
            panic!("template key")
        };
        assert_eq!(parts(t), ["id"]);
        assert_eq!(literal(&args.ttl), Some(Duration::from_secs(1800)));
        assert_eq!(literal(&args.negative_ttl), Some(Duration::from_secs(30)));
        assert_eq!(literal(&args.timeout), None);
        assert_eq!(literal(&args.early_refresh), Some(1.0));
        assert_eq!(literal(&args.fleet_lock), Some(Duration::from_secs(5)));
        let tags = &args.tags.as_ref().unwrap().value;
        assert!(matches!(&tags[0], Value::Literal(t) if t.constant().is_some()));
        assert!(matches!(&tags[1], Value::Literal(t) if t.constant().is_none()));
        assert!(matches!(&tags[2], Value::Expr(_)));
        assert_eq!(args.skip.as_ref().unwrap().value, ["db", "self"]);
        let krate = args.krate.unwrap().value.to_token_stream();
        assert_eq!(krate.to_string(), ":: my :: tiered_cache");
        assert_eq!(args.key_fn.unwrap().value.unwrap(), "product_key");
        let args = parse(quote!(
            key = (id, user.tenant),
            early_refresh = false,
            key_fn = false,
        ))
        .unwrap();
        assert!(matches!(args.key.unwrap().value, Value::Expr(e) if matches!(*e, Expr::Tuple(_))));
        assert_eq!(literal(&args.early_refresh), Some(0.0));
        assert!(args.key_fn.unwrap().value.is_none());
        assert!(parse(quote!()).unwrap().key.is_none());
    }

    #[test]
    fn duplicate_is_reported_once_at_second_occurrence() {
        let e = syn::parse_str::<Args>(r#"ttl = "1s", version = 2, ttl = "2s""#);
        let e = e.err().unwrap();
        let msg = "duplicate argument `ttl`: each argument may be given once";
        assert_eq!((e.to_string().as_str(), e.span().start().column), (msg, 25));
        let e = err(quote!(skip = [db, db]));
        assert_eq!(e, ["`db` is already listed in `skip`"]);
    }

    #[test]
    fn unknown_argument_lists_valid_ones_and_parsing_goes_on() {
        let errors = err(quote!(tll = "1s", ttl = "5 parsecs"));
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(
            errors[0],
            "unknown argument `tll` (did you mean `ttl`?); expected one of: `key`, `ttl`, `tags`, \
             `version`, `name`, `cache`, `skip`, `stale`, `negative_ttl`, `timeout`, \
             `early_refresh`, `fleet_lock`, `key_fn`, `crate`"
        );
        assert!(errors[1].starts_with("invalid duration \"5 parsecs\" for `ttl`"));
        let e = err(quote!(expiry_policy = lru));
        assert!(e[0].starts_with("unknown argument `expiry_policy`; expected one of:"));
    }

    #[test]
    fn values_are_checked() {
        for (args, msg) in [
            (quote!(ttl = "30 minutes and a bit"), "invalid duration"),
            (quote!(stale = "0s"), "`stale` must be longer than zero"),
            (quote!(ttl = 30), "takes a duration"),
            (quote!(early_refresh = true), "XFetch beta"),
            (quote!(early_refresh = "1.0"), "XFetch beta"),
            (quote!(early_refresh = 0.0), "must be positive"),
            (quote!(early_refresh = -1.0), "must be positive"),
            (quote!(version = 4294967296), "u32"),
            (quote!(name = ""), "must not be empty"),
            (quote!(key_fn = true), "function name"),
            (quote!(tags = "a"), "expected a list"),
            (quote!(skip = [db.x]), "parameter names"),
            (quote!(crate = a::b::<u8>), "takes a path"),
            (quote!(= 3), "expected one of: `key`"),
            (quote!(ttl "1s"), "expected `=`"),
        ] {
            let e = err(args.clone());
            assert!(e[0].contains(msg), "{args}: {e:?}");
        }
        let args = parse(quote!(
            ttl = "1h 30s",
            version = SCHEMA,
            early_refresh = BETA
        ))
        .unwrap();
        assert_eq!(literal(&args.ttl), Some(Duration::from_secs(3630)));
        assert_eq!(literal(&args.early_refresh), None);
    }

    #[test]
    fn templates() {
        for (text, expected) in [
            ("product:{id}:{cat}", &["id", "cat"][..]),
            (
                "{self.tenant}/{user.id}/{pair.0}",
                &["self . tenant", "user . id", "pair . 0"],
            ),
            ("{{literal}} {r#type}", &["r#type"]),
            ("ü:{id}", &["id"]),
        ] {
            assert_eq!(parts(&parse_template(text).unwrap()), expected);
        }
        for (text, constant) in [("all", "all"), ("", ""), ("a}}b", "a}b"), ("{{x}}", "{x}")] {
            let t = parse_template(text).unwrap();
            assert_eq!(t.constant().as_deref(), Some(constant));
        }
    }

    #[test]
    fn template_errors() {
        for (text, msg) in [
            ("a:{id", "unclosed `{`"),
            ("a:}", "unmatched `}`"),
            ("a:{}", "empty `{}`"),
            ("{id:?}", "format specs are not supported"),
            ("{1x}", "is not a parameter name"),
            ("{type}", "is not a parameter name"),
            ("{_}", "is not a parameter name"),
            ("{ id }", "is not a parameter name"),
            ("{a.}", "is not a field name"),
        ] {
            let e = messages(parse_template(text).err().unwrap());
            assert!(e[0].contains(msg), "{text}: {e:?}");
        }
        // every problem is reported, not just the first
        let e = parse_template("{} {id:x} }").err().unwrap();
        assert_eq!(messages(e).len(), 3);
    }

    #[test]
    fn template_errors_point_inside_the_literal() {
        // proc-macro2's fallback (used in unit tests) implements sub-spans,
        // as nightly compilers do; stable compilers fall back to the literal.
        // Escapes make offsets unreliable: then the whole literal is used.
        for (source, at) in [
            (r#""product:{id:?}""#, "{id:?}"),
            (r#""a\n{}""#, r#""a\n{}""#),
            (r###"r#"x{}"#"###, "{}"),
        ] {
            let e = Template::parse(&syn::parse_str(source).unwrap())
                .err()
                .unwrap();
            assert_eq!(e.span().source_text().as_deref(), Some(at));
        }
    }
}

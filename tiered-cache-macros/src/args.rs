//! Parsing of `#[cached(...)]` arguments: one spelling per argument, parsed by
//! hand with `syn` (`custom_keyword!` + `lookahead1`), every error pointing at
//! the offending token and gathered with `Error::combine`.

use std::time::Duration;

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{quote, ToTokens};
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{bracketed, Expr, ExprLit, Ident, Lit, LitBool, LitStr, Member, Path, Token};

mod kw {
    syn::custom_keyword!(key);
    syn::custom_keyword!(ttl);
    syn::custom_keyword!(tags);
    syn::custom_keyword!(version);
    syn::custom_keyword!(name);
    syn::custom_keyword!(cache);
    syn::custom_keyword!(skip);
    syn::custom_keyword!(stale);
    syn::custom_keyword!(negative_ttl);
    syn::custom_keyword!(timeout);
    syn::custom_keyword!(early_refresh);
    syn::custom_keyword!(key_fn);
}

/// Every argument `#[cached]` accepts, in the order the docs present them.
pub(crate) const ARGUMENTS: &[&str] = &[
    "key",
    "ttl",
    "tags",
    "version",
    "name",
    "cache",
    "skip",
    "stale",
    "negative_ttl",
    "timeout",
    "early_refresh",
    "key_fn",
    "crate",
];

/// One parsed argument: where its keyword was written, and its value.
pub(crate) struct Arg<T> {
    pub(crate) kw: Span,
    pub(crate) value: T,
}

/// The parsed attribute. Every field is `None` when the argument was not given.
#[derive(Default)]
pub(crate) struct Args {
    pub(crate) key: Option<Arg<KeySpec>>,
    pub(crate) ttl: Option<Arg<DurationArg>>,
    pub(crate) tags: Option<Arg<Vec<TagSpec>>>,
    pub(crate) version: Option<Arg<Expr>>,
    pub(crate) name: Option<Arg<Expr>>,
    pub(crate) cache: Option<Arg<Expr>>,
    pub(crate) skip: Option<Arg<Vec<Ident>>>,
    pub(crate) stale: Option<Arg<DurationArg>>,
    pub(crate) negative_ttl: Option<Arg<DurationArg>>,
    pub(crate) timeout: Option<Arg<DurationArg>>,
    pub(crate) early_refresh: Option<Arg<EarlyRefresh>>,
    pub(crate) key_fn: Option<Arg<KeyFn>>,
    pub(crate) krate: Option<Arg<Path>>,
}

/// `key = "template"` or `key = <expression>`.
pub(crate) enum KeySpec {
    Template(Template),
    /// A tuple expression gives one key part per element; any other
    /// expression is a single part.
    Expr(Box<Expr>),
}

/// One element of `tags = [..]`.
pub(crate) enum TagSpec {
    Template(Template),
    Expr(Box<Expr>),
}

/// A duration: a humantime literal checked at compile time, or an expression
/// of type `Duration`.
pub(crate) enum DurationArg {
    Literal { lit: LitStr, value: Duration },
    Expr(Box<Expr>),
}

/// `early_refresh = false` or `early_refresh = <beta: f64>`.
pub(crate) enum EarlyRefresh {
    Off,
    Beta(Box<Expr>),
}

/// `key_fn = false` (no companion) or `key_fn = some_name`.
pub(crate) enum KeyFn {
    Off,
    Named(Ident),
}

/// A format-like template: `"product:{id}"`, `"tenant:{self.tenant}"`.
pub(crate) struct Template {
    pub(crate) lit: LitStr,
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
        let root = &self.root;
        let members = &self.members;
        quote!(#root #(. #members)*)
    }

    pub(crate) fn is_self(&self) -> bool {
        self.root == "self"
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
        let mut out = String::new();
        for segment in &self.segments {
            match segment {
                Segment::Text(t) => out.push_str(t),
                Segment::Part(_) => return None,
            }
        }
        Some(out)
    }

    /// Parses and checks the template syntax (names are checked against the
    /// function's parameters later, in `expand`).
    pub(crate) fn parse(lit: LitStr) -> syn::Result<Template> {
        let value = lit.value();
        let locator = Locator::new(&lit);
        let mut errors: Option<syn::Error> = None;
        let mut push_err = |span: Span, msg: String| {
            let e = syn::Error::new(span, msg);
            match &mut errors {
                Some(all) => all.combine(e),
                None => errors = Some(e),
            }
        };
        let mut segments = Vec::new();
        let mut text = String::new();
        let bytes = value.as_bytes();
        let mut i = 0;
        while i < value.len() {
            let c = value[i..].chars().next().unwrap_or('\0');
            match c {
                '{' if bytes.get(i + 1) == Some(&b'{') => {
                    text.push('{');
                    i += 2;
                }
                '{' => {
                    let Some(close) = value[i + 1..].find('}').map(|j| i + 1 + j) else {
                        push_err(
                            locator.span(i, value.len()),
                            "unclosed `{` in template: write `{{` for a literal brace".into(),
                        );
                        break;
                    };
                    let span = locator.span(i, close + 1);
                    match parse_placeholder(&value[i + 1..close], span) {
                        Ok(p) => {
                            if !text.is_empty() {
                                segments.push(Segment::Text(std::mem::take(&mut text)));
                            }
                            segments.push(Segment::Part(p));
                        }
                        Err(msg) => push_err(span, msg),
                    }
                    i = close + 1;
                }
                '}' if bytes.get(i + 1) == Some(&b'}') => {
                    text.push('}');
                    i += 2;
                }
                '}' => {
                    push_err(
                        locator.span(i, i + 1),
                        "unmatched `}` in template: write `}}` for a literal brace".into(),
                    );
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
        match errors {
            Some(e) => Err(e),
            None => Ok(Template { lit, segments }),
        }
    }
}

/// Maps byte offsets in a string literal's value to spans in the source.
struct Locator {
    token: proc_macro2::Literal,
    fallback: Span,
    /// Bytes before the value in the source text (`"` or `r#"`); `None` when
    /// the value does not map one-to-one onto the source (escapes).
    prefix: Option<usize>,
}

impl Locator {
    fn new(lit: &LitStr) -> Self {
        let token = lit.token();
        let source = token.to_string();
        let prefix = if let Some(raw) = source.strip_prefix('r') {
            Some(1 + raw.chars().take_while(|&c| c == '#').count() + 1)
        } else if source.starts_with('"') && !source.contains('\\') {
            Some(1)
        } else {
            None
        };
        Locator {
            token,
            fallback: lit.span(),
            prefix,
        }
    }

    /// The span of `value[start..end]`: a sub-span of the literal where the
    /// compiler supports it (nightly today), else the whole literal.
    fn span(&self, start: usize, end: usize) -> Span {
        match self.prefix {
            Some(p) => self
                .token
                .subspan(p + start..p + end)
                .unwrap_or(self.fallback),
            None => self.fallback,
        }
    }
}

fn parse_placeholder(inner: &str, span: Span) -> Result<Placeholder, String> {
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
    let root = if first == "self" {
        Ident::new("self", span)
    } else {
        ident(first, span).ok_or_else(|| {
            format!(
                "`{{{inner}}}` is not a parameter name: a template part is `{{name}}`, \
                 `{{name.field}}` or `{{self.field}}`"
            )
        })?
    };
    let mut members = Vec::new();
    for seg in segments {
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            let index: u32 = seg
                .parse()
                .map_err(|_| format!("tuple index `{seg}` is too large"))?;
            members.push(Member::Unnamed(syn::Index { index, span }));
        } else if let Some(field) = ident(seg, span) {
            members.push(Member::Named(field));
        } else {
            return Err(format!(
                "`{{{inner}}}`: `{seg}` is not a field name: a template part is `{{name}}`, \
                 `{{name.field}}` or `{{self.field}}`"
            ));
        }
    }
    Ok(Placeholder {
        root,
        members,
        span,
    })
}

/// An identifier (optionally raw, `r#type`) with the given span, or `None`.
fn ident(s: &str, span: Span) -> Option<Ident> {
    let (raw, body) = match s.strip_prefix("r#") {
        Some(body) => (true, body),
        None => (false, s),
    };
    let mut chars = body.chars();
    let first = chars.next()?;
    if !(first == '_' || first.is_alphabetic()) || !chars.all(|c| c == '_' || c.is_alphanumeric()) {
        return None;
    }
    if body == "_" {
        return None;
    }
    if raw {
        if matches!(body, "self" | "Self" | "super" | "crate") {
            return None;
        }
        return Some(Ident::new_raw(body, span));
    }
    // Reject keywords: they cannot name a parameter.
    if syn::parse_str::<Ident>(body).is_err() {
        return None;
    }
    Some(Ident::new(body, span))
}

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut args = Args::default();
        let mut seen: Vec<String> = Vec::new();
        let mut errors: Option<syn::Error> = None;
        let mut record = |e: syn::Error| match &mut errors {
            Some(all) => all.combine(e),
            None => errors = Some(e),
        };

        while !input.is_empty() {
            let lookahead = input.lookahead1();
            if lookahead.peek(kw::key) {
                let kw = input.parse::<kw::key>()?.span;
                duplicate(&mut seen, "key", kw).unwrap_or_else(&mut record);
                input.parse::<Token![=]>()?;
                let value = match input.parse::<Expr>()? {
                    Expr::Lit(ExprLit {
                        lit: Lit::Str(lit),
                        attrs,
                    }) if attrs.is_empty() => Template::parse(lit).map(KeySpec::Template),
                    expr => Ok(KeySpec::Expr(Box::new(expr))),
                };
                match value {
                    Ok(v) => set(&mut args.key, kw, v, "key").unwrap_or_else(&mut record),
                    Err(e) => record(e),
                }
            } else if lookahead.peek(kw::ttl) {
                let kw = input.parse::<kw::ttl>()?.span;
                duplicate(&mut seen, "ttl", kw).unwrap_or_else(&mut record);
                parse_duration_arg(input, kw, &mut args.ttl, "ttl", &mut record)?;
            } else if lookahead.peek(kw::tags) {
                let kw = input.parse::<kw::tags>()?.span;
                duplicate(&mut seen, "tags", kw).unwrap_or_else(&mut record);
                input.parse::<Token![=]>()?;
                let content;
                bracketed!(content in input);
                let elems = Punctuated::<Expr, Token![,]>::parse_terminated(&content)?;
                let mut tags = Vec::new();
                for expr in elems {
                    match expr {
                        Expr::Lit(ExprLit {
                            lit: Lit::Str(lit),
                            attrs,
                        }) if attrs.is_empty() => match Template::parse(lit) {
                            Ok(t) => tags.push(TagSpec::Template(t)),
                            Err(e) => record(e),
                        },
                        expr => tags.push(TagSpec::Expr(Box::new(expr))),
                    }
                }
                set(&mut args.tags, kw, tags, "tags").unwrap_or_else(&mut record);
            } else if lookahead.peek(kw::version) {
                let kw = input.parse::<kw::version>()?.span;
                duplicate(&mut seen, "version", kw).unwrap_or_else(&mut record);
                input.parse::<Token![=]>()?;
                let expr: Expr = input.parse()?;
                if let Expr::Lit(ExprLit {
                    lit: Lit::Int(int), ..
                }) = &expr
                {
                    if let Err(e) = int.base10_parse::<u32>() {
                        record(syn::Error::new(
                            int.span(),
                            format!("`version` is a `u32` schema version: {e}"),
                        ));
                    }
                }
                set(&mut args.version, kw, expr, "version").unwrap_or_else(&mut record);
            } else if lookahead.peek(kw::name) {
                let kw = input.parse::<kw::name>()?.span;
                duplicate(&mut seen, "name", kw).unwrap_or_else(&mut record);
                input.parse::<Token![=]>()?;
                let expr: Expr = input.parse()?;
                if let Expr::Lit(ExprLit {
                    lit: Lit::Str(s), ..
                }) = &expr
                {
                    if s.value().is_empty() {
                        record(syn::Error::new(
                            s.span(),
                            "`name` must not be empty: it names the entity in every key",
                        ));
                    }
                }
                set(&mut args.name, kw, expr, "name").unwrap_or_else(&mut record);
            } else if lookahead.peek(kw::cache) {
                let kw = input.parse::<kw::cache>()?.span;
                duplicate(&mut seen, "cache", kw).unwrap_or_else(&mut record);
                input.parse::<Token![=]>()?;
                let expr: Expr = input.parse()?;
                set(&mut args.cache, kw, expr, "cache").unwrap_or_else(&mut record);
            } else if lookahead.peek(kw::skip) {
                let kw = input.parse::<kw::skip>()?.span;
                duplicate(&mut seen, "skip", kw).unwrap_or_else(&mut record);
                input.parse::<Token![=]>()?;
                let content;
                bracketed!(content in input);
                let names = Punctuated::<Ident, Token![,]>::parse_terminated_with(
                    &content,
                    Ident::parse_any,
                )?;
                let mut seen: Vec<Ident> = Vec::new();
                for name in names {
                    if seen.contains(&name) {
                        record(syn::Error::new(
                            name.span(),
                            format!("`{name}` is already listed in `skip`"),
                        ));
                    } else {
                        seen.push(name);
                    }
                }
                set(&mut args.skip, kw, seen, "skip").unwrap_or_else(&mut record);
            } else if lookahead.peek(kw::stale) {
                let kw = input.parse::<kw::stale>()?.span;
                duplicate(&mut seen, "stale", kw).unwrap_or_else(&mut record);
                parse_duration_arg(input, kw, &mut args.stale, "stale", &mut record)?;
            } else if lookahead.peek(kw::negative_ttl) {
                let kw = input.parse::<kw::negative_ttl>()?.span;
                duplicate(&mut seen, "negative_ttl", kw).unwrap_or_else(&mut record);
                parse_duration_arg(
                    input,
                    kw,
                    &mut args.negative_ttl,
                    "negative_ttl",
                    &mut record,
                )?;
            } else if lookahead.peek(kw::timeout) {
                let kw = input.parse::<kw::timeout>()?.span;
                duplicate(&mut seen, "timeout", kw).unwrap_or_else(&mut record);
                parse_duration_arg(input, kw, &mut args.timeout, "timeout", &mut record)?;
            } else if lookahead.peek(kw::early_refresh) {
                let kw = input.parse::<kw::early_refresh>()?.span;
                duplicate(&mut seen, "early_refresh", kw).unwrap_or_else(&mut record);
                input.parse::<Token![=]>()?;
                let value = match input.parse::<Expr>()? {
                    Expr::Lit(ExprLit {
                        lit: Lit::Bool(b), ..
                    }) if !b.value => Ok(EarlyRefresh::Off),
                    Expr::Lit(ExprLit {
                        lit: Lit::Bool(b), ..
                    }) => Err(syn::Error::new(
                        b.span,
                        "`early_refresh` takes the XFetch beta (`1.0` is the usual choice) \
                         or `false`",
                    )),
                    expr => check_beta(&expr).map(|()| EarlyRefresh::Beta(Box::new(expr))),
                };
                match value {
                    Ok(v) => set(&mut args.early_refresh, kw, v, "early_refresh")
                        .unwrap_or_else(&mut record),
                    Err(e) => record(e),
                }
            } else if lookahead.peek(kw::key_fn) {
                let kw = input.parse::<kw::key_fn>()?.span;
                duplicate(&mut seen, "key_fn", kw).unwrap_or_else(&mut record);
                input.parse::<Token![=]>()?;
                let value = if input.peek(LitBool) {
                    let b: LitBool = input.parse()?;
                    if b.value {
                        Err(syn::Error::new(
                            b.span,
                            "`key_fn` takes a function name, or `false` for no key builder",
                        ))
                    } else {
                        Ok(KeyFn::Off)
                    }
                } else {
                    Ok(KeyFn::Named(input.parse::<Ident>()?))
                };
                match value {
                    Ok(v) => set(&mut args.key_fn, kw, v, "key_fn").unwrap_or_else(&mut record),
                    Err(e) => record(e),
                }
            } else if lookahead.peek(Token![crate]) {
                let kw = input.parse::<Token![crate]>()?.span;
                duplicate(&mut seen, "crate", kw).unwrap_or_else(&mut record);
                input.parse::<Token![=]>()?;
                let path = Path::parse_mod_style(input)?;
                set(&mut args.krate, kw, path, "crate").unwrap_or_else(&mut record);
            } else if input.peek(Ident::peek_any) {
                let unknown = input.call(Ident::parse_any)?;
                record(syn::Error::new(unknown.span(), unknown_message(&unknown)));
                skip_value(input);
            } else {
                return Err(lookahead.error());
            }

            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }

        match errors {
            Some(e) => Err(e),
            None => Ok(args),
        }
    }
}

/// Reports a duplicate argument at its second occurrence (even when the
/// first one's value was invalid).
fn duplicate(seen: &mut Vec<String>, name: &str, kw: Span) -> syn::Result<()> {
    if seen.iter().any(|s| s == name) {
        return Err(syn::Error::new(
            kw,
            format!("duplicate argument `{name}`: each argument may be given once"),
        ));
    }
    seen.push(name.to_string());
    Ok(())
}

/// Stores an argument; the first occurrence wins (a duplicate was reported
/// by `duplicate`).
fn set<T>(slot: &mut Option<Arg<T>>, kw: Span, value: T, _name: &str) -> syn::Result<()> {
    if slot.is_none() {
        *slot = Some(Arg { kw, value });
    }
    Ok(())
}

fn parse_duration_arg(
    input: ParseStream<'_>,
    kw: Span,
    slot: &mut Option<Arg<DurationArg>>,
    name: &str,
    record: &mut impl FnMut(syn::Error),
) -> syn::Result<()> {
    input.parse::<Token![=]>()?;
    let expr: Expr = input.parse()?;
    let value = match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit),
            attrs,
        }) if attrs.is_empty() => parse_humantime(&lit, name).map(|value| DurationArg::Literal {
            lit: lit.clone(),
            value,
        }),
        Expr::Lit(ExprLit {
            lit: lit @ (Lit::Int(_) | Lit::Float(_)),
            ..
        }) => Err(syn::Error::new(
            lit.span(),
            format!(
                "`{name}` takes a duration: a literal like \"30m\" or \"1h 30s\", \
                 or a `Duration` expression"
            ),
        )),
        expr => Ok(DurationArg::Expr(Box::new(expr))),
    };
    match value {
        Ok(v) => set(slot, kw, v, name).unwrap_or_else(record),
        Err(e) => record(e),
    }
    Ok(())
}

/// Checks a humantime literal at compile time.
pub(crate) fn parse_humantime(lit: &LitStr, name: &str) -> syn::Result<Duration> {
    let text = lit.value();
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d.is_zero() => Err(syn::Error::new(
            lit.span(),
            format!("`{name}` must be longer than zero"),
        )),
        Ok(d) => Ok(d),
        Err(e) => Err(syn::Error::new(
            lit.span(),
            format!(
                "invalid duration {:?} for `{name}`: {e}; write it like \"30m\", \"1h 30s\" \
                 or \"250ms\"",
                text
            ),
        )),
    }
}

fn check_beta(expr: &Expr) -> syn::Result<()> {
    let lit = match expr {
        Expr::Lit(ExprLit { lit, .. }) => lit,
        Expr::Unary(u) if matches!(u.op, syn::UnOp::Neg(_)) => {
            if let Expr::Lit(_) = &*u.expr {
                return Err(syn::Error::new_spanned(
                    expr,
                    "`early_refresh` beta must be positive (or `false` to disable)",
                ));
            }
            return Ok(());
        }
        _ => return Ok(()),
    };
    let value = match lit {
        Lit::Float(f) => f.base10_parse::<f64>()?,
        Lit::Int(i) => i.base10_parse::<f64>()?,
        other => {
            return Err(syn::Error::new(
                other.span(),
                "`early_refresh` takes the XFetch beta (an `f64` like `1.0`) or `false`",
            ))
        }
    };
    if !(value.is_finite() && value > 0.0) {
        return Err(syn::Error::new(
            lit.span(),
            "`early_refresh` beta must be positive and finite (or `false` to disable)",
        ));
    }
    Ok(())
}

fn unknown_message(unknown: &Ident) -> String {
    let name = unknown.unraw().to_string();
    let valid = ARGUMENTS
        .iter()
        .map(|a| format!("`{a}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let hint = ARGUMENTS
        .iter()
        .map(|a| (edit_distance(&name, a), a))
        .filter(|(d, a)| *d <= 2 && *d < a.len())
        .min()
        .map(|(_, a)| format!(" (did you mean `{a}`?)"))
        .unwrap_or_default();
    format!("unknown argument `{name}`{hint}; expected one of: {valid}")
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// After an unknown argument name, skips `= value` up to the next top-level
/// comma so that later arguments are still checked.
fn skip_value(input: ParseStream<'_>) {
    let _ = input.step(|cursor| {
        let mut rest = *cursor;
        while let Some((tt, next)) = rest.token_tree() {
            if let TokenTree::Punct(p) = &tt {
                if p.as_char() == ',' {
                    return Ok(((), rest));
                }
            }
            rest = next;
        }
        Ok(((), rest))
    });
}

impl ToTokens for DurationArg {
    fn to_tokens(&self, tokens: &mut TokenStream) {
        match self {
            DurationArg::Literal { lit, .. } => lit.to_tokens(tokens),
            DurationArg::Expr(e) => e.to_tokens(tokens),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(tokens: TokenStream) -> syn::Result<Args> {
        syn::parse2(tokens)
    }

    fn err(tokens: TokenStream) -> Vec<String> {
        match parse(tokens) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    fn template(s: &str) -> syn::Result<Template> {
        Template::parse(LitStr::new(s, Span::call_site()))
    }

    fn parts(t: &Template) -> Vec<String> {
        t.placeholders().map(|p| p.expr().to_string()).collect()
    }

    #[test]
    fn empty_attribute_is_all_defaults() {
        let args = parse(quote!()).unwrap();
        assert!(args.key.is_none() && args.ttl.is_none() && args.krate.is_none());
    }

    #[test]
    fn full_attribute_parses() {
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
            key_fn = product_key,
            crate = ::my::tiered_cache,
        ))
        .unwrap();
        let Some(Arg {
            value: KeySpec::Template(t),
            ..
        }) = &args.key
        else {
            panic!("template key")
        };
        assert_eq!(parts(t), ["id"]);
        match &args.ttl.as_ref().unwrap().value {
            DurationArg::Literal { value, .. } => assert_eq!(*value, Duration::from_secs(1800)),
            DurationArg::Expr(_) => panic!("literal ttl"),
        }
        assert!(matches!(
            args.timeout.as_ref().unwrap().value,
            DurationArg::Expr(_)
        ));
        let tags = &args.tags.as_ref().unwrap().value;
        assert_eq!(tags.len(), 3);
        assert!(
            matches!(&tags[0], TagSpec::Template(t) if t.constant().as_deref() == Some("products"))
        );
        assert!(matches!(&tags[1], TagSpec::Template(t) if t.constant().is_none()));
        assert!(matches!(&tags[2], TagSpec::Expr(_)));
        let skip: Vec<String> = args
            .skip
            .as_ref()
            .unwrap()
            .value
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(skip, ["db", "self"]);
        assert!(matches!(
            args.key_fn.as_ref().unwrap().value,
            KeyFn::Named(_)
        ));
        assert_eq!(
            args.krate
                .as_ref()
                .unwrap()
                .value
                .to_token_stream()
                .to_string(),
            ":: my :: tiered_cache"
        );
    }

    #[test]
    fn expression_key() {
        let args = parse(quote!(key = (id, user.tenant))).unwrap();
        assert!(matches!(
            args.key.unwrap().value,
            KeySpec::Expr(e) if matches!(*e, Expr::Tuple(_))
        ));
    }

    #[test]
    fn trailing_comma_is_fine() {
        parse(quote!(ttl = "1s",)).unwrap();
    }

    #[test]
    fn duplicate_is_reported_once_at_second_occurrence() {
        assert_eq!(
            err(quote!(ttl = "1s", version = 2, ttl = "2s")),
            ["duplicate argument `ttl`: each argument may be given once"]
        );
    }

    #[test]
    fn unknown_argument_lists_valid_ones_and_parsing_goes_on() {
        let errors = err(quote!(tll = "1s", ttl = "5 parsecs"));
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("unknown argument `tll` (did you mean `ttl`?); expected one of: `key`, `ttl`, `tags`, `version`, `name`, `cache`, `skip`, `stale`, `negative_ttl`, `timeout`, `early_refresh`, `key_fn`, `crate`"), "{}", errors[0]);
        assert!(
            errors[1].starts_with("invalid duration \"5 parsecs\" for `ttl`"),
            "{}",
            errors[1]
        );
    }

    #[test]
    fn unknown_argument_without_close_match_has_no_hint() {
        let errors = err(quote!(expiry_policy = lru));
        assert!(errors[0].starts_with("unknown argument `expiry_policy`; expected one of:"));
    }

    #[test]
    fn humantime_is_checked() {
        assert!(err(quote!(ttl = "30 minutes and a bit"))[0].contains("invalid duration"));
        assert_eq!(
            err(quote!(stale = "0s")),
            ["`stale` must be longer than zero"]
        );
        assert!(err(quote!(ttl = 30))[0].contains("takes a duration"));
        let args = parse(quote!(ttl = "1h 30s", negative_ttl = "250ms")).unwrap();
        match args.ttl.unwrap().value {
            DurationArg::Literal { value, .. } => assert_eq!(value, Duration::from_secs(3630)),
            DurationArg::Expr(_) => panic!(),
        }
    }

    #[test]
    fn early_refresh_forms() {
        assert!(matches!(
            parse(quote!(early_refresh = false))
                .unwrap()
                .early_refresh
                .unwrap()
                .value,
            EarlyRefresh::Off
        ));
        assert!(matches!(
            parse(quote!(early_refresh = BETA))
                .unwrap()
                .early_refresh
                .unwrap()
                .value,
            EarlyRefresh::Beta(_)
        ));
        assert!(err(quote!(early_refresh = true))[0].contains("XFetch beta"));
        assert!(err(quote!(early_refresh = 0.0))[0].contains("must be positive"));
        assert!(err(quote!(early_refresh = -1.0))[0].contains("must be positive"));
        assert!(err(quote!(early_refresh = "1.0"))[0].contains("XFetch beta"));
    }

    #[test]
    fn version_must_fit_u32() {
        assert!(err(quote!(version = 4294967296))[0].contains("u32"));
        parse(quote!(version = SCHEMA_VERSION)).unwrap();
    }

    #[test]
    fn empty_name_rejected() {
        assert!(err(quote!(name = ""))[0].contains("must not be empty"));
    }

    #[test]
    fn skip_duplicates_and_key_fn() {
        assert_eq!(
            err(quote!(skip = [db, db])),
            ["`db` is already listed in `skip`"]
        );
        assert!(matches!(
            parse(quote!(key_fn = false)).unwrap().key_fn.unwrap().value,
            KeyFn::Off
        ));
        assert!(err(quote!(key_fn = true))[0].contains("function name"));
    }

    #[test]
    fn syntax_errors_use_lookahead() {
        let e = err(quote!(= 3));
        assert!(e[0].starts_with("expected one of"), "{e:?}");
        assert!(parse(quote!(ttl "1s")).is_err());
        assert!(parse(quote!(tags = "a")).is_err());
    }

    #[test]
    fn templates() {
        let t = template("product:{id}:{cat}").unwrap();
        assert_eq!(parts(&t), ["id", "cat"]);
        let t = template("{self.tenant}/{user.id}/{pair.0}").unwrap();
        assert_eq!(parts(&t), ["self . tenant", "user . id", "pair . 0"]);
        assert!(t.placeholders().next().unwrap().is_self());
        let t = template("{{literal}} {r#type}").unwrap();
        assert!(matches!(&t.segments[0], Segment::Text(s) if s == "{literal} "));
        assert_eq!(parts(&t), ["r#type"]);
        assert_eq!(template("all").unwrap().constant().as_deref(), Some("all"));
        assert_eq!(template("").unwrap().segments.len(), 0);
        assert_eq!(template("a}}b").unwrap().constant().as_deref(), Some("a}b"));
        assert_eq!(template("ü:{id}").unwrap().segments.len(), 2);
    }

    #[test]
    fn template_errors() {
        let msgs = |s: &str| -> Vec<String> {
            template(s)
                .err()
                .unwrap()
                .into_iter()
                .map(|e| e.to_string())
                .collect()
        };
        assert!(msgs("a:{id")[0].starts_with("unclosed `{`"));
        assert!(msgs("a:}")[0].starts_with("unmatched `}`"));
        assert!(msgs("a:{}")[0].starts_with("empty `{}`"));
        assert!(msgs("{id:?}")[0].starts_with("format specs are not supported"));
        assert!(msgs("{1x}")[0].contains("is not a parameter name"));
        assert!(msgs("{type}")[0].contains("is not a parameter name"));
        assert!(msgs("{_}")[0].contains("is not a parameter name"));
        assert!(msgs("{ id }")[0].contains("is not a parameter name"));
        assert!(msgs("{a.}")[0].contains("is not a field name"));
        // every problem is reported, not just the first
        assert_eq!(msgs("{} {id:x} }").len(), 3);
    }

    #[test]
    fn template_errors_point_inside_the_literal() {
        // proc-macro2's fallback (used in unit tests) implements sub-spans,
        // as nightly compilers do; stable compilers fall back to the literal.
        let lit: LitStr = syn::parse_str(r#""product:{id:?}""#).unwrap();
        let e = Template::parse(lit).err().unwrap();
        assert_eq!(e.span().source_text().as_deref(), Some("{id:?}"));
        // escapes make offsets unreliable: the whole literal is used
        let lit: LitStr = syn::parse_str(r#""a\n{}""#).unwrap();
        let e = Template::parse(lit).err().unwrap();
        assert_eq!(e.span().source_text().as_deref(), Some(r#""a\n{}""#));
        let lit: LitStr = syn::parse_str(r###"r#"x{}"#"###).unwrap();
        let e = Template::parse(lit).err().unwrap();
        assert_eq!(e.span().source_text().as_deref(), Some("{}"));
    }

    #[test]
    fn edit_distance_works() {
        assert_eq!(edit_distance("tll", "ttl"), 1);
        assert_eq!(edit_distance("tag", "tags"), 1);
        assert_eq!(edit_distance("", "key"), 3);
    }
}

//! Code generation for `#[cached]`: checks the function against the
//! arguments, then rewrites its body into a call to the cache's read path.
//!
//! Shape of the output (see the "Equivalent code" section of the macro docs):
//!
//! ```text
//! async fn f(params) -> R {
//!     let key = <Key<V> from the template>;        // built from &params
//!     let opts = <EntryOptions>;                    // a static when constant
//!     let cache = <Option<&TieredCache>>;
//!     let body = move || async move { <fake return edge> <original body> };
//!     match cache {
//!         Some(cache) => __private::cached_<mode>(cache, &key, opts, [share,] body).await,
//!         None => body().await,
//!     }
//! }
//! fn f_key(key params) -> Key<V> { <same key> }
//! ```

use std::collections::BTreeSet;

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{
    AttrStyle, Expr, ExprLit, FnArg, GenericArgument, GenericParam, Generics, Ident, ItemFn, Lit,
    Pat, PathArguments, ReturnType, Signature, Type, WherePredicate,
};

use crate::args::{Args, DurationArg, EarlyRefresh, KeyFn, KeySpec, Segment, TagSpec, Template};

/// Entry point: parse both halves, generate, and on any error emit the
/// original function unchanged along with the errors (IDEs keep working).
pub(crate) fn cached(args: TokenStream, item: TokenStream) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(e) => return token_stream_with_error(item, e),
    };
    let args = syn::parse2::<Args>(args);
    match expand(args, &func) {
        Ok(tokens) => tokens,
        Err(e) => token_stream_with_error(item, e),
    }
}

fn token_stream_with_error(mut tokens: TokenStream, error: syn::Error) -> TokenStream {
    tokens.extend(error.into_compile_error());
    tokens
}

/// Collects errors so that one compile reports all of them.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, e: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }

    fn at(&mut self, tokens: impl ToTokens, msg: impl std::fmt::Display) {
        self.push(syn::Error::new_spanned(tokens, msg));
    }

    fn at_span(&mut self, span: Span, msg: impl std::fmt::Display) {
        self.push(syn::Error::new(span, msg));
    }

    fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ReceiverKind {
    None,
    Ref,
    Value,
}

/// One non-receiver parameter.
struct Param<'a> {
    /// `None` for `_`.
    ident: Option<Ident>,
    ty: &'a Type,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Plain,
    Option,
    Result,
    ResultOption,
}

/// What the declared return type means for caching.
struct Output {
    mode: Mode,
    /// The cached type is written `Arc<V>`: hits clone the `Arc`, not `V`.
    arc: bool,
    /// `V` in `Key<V>`.
    value: Type,
    ret: Type,
}

/// One part of the key: an expression read by reference.
struct KeyPart {
    expr: TokenStream,
    span: Span,
}

fn expand(args: syn::Result<Args>, func: &ItemFn) -> syn::Result<TokenStream> {
    let mut errors = Errors::default();
    let args = match args {
        Ok(a) => a,
        Err(e) => {
            errors.push(e);
            Args::default()
        }
    };
    let sig = &func.sig;
    let fn_name = sig.ident.unraw().to_string();

    // --- the signature ---------------------------------------------------
    if let Some(c) = &sig.constness {
        errors.at(c, "`#[cached]` cannot be used on a `const fn`");
    }
    if sig.asyncness.is_none() {
        errors.at(
            sig.fn_token,
            "`#[cached]` needs an `async fn`: add `async` (the body becomes the loader that \
             runs on a miss)",
        );
    }
    if let Some(v) = &sig.variadic {
        errors.at(v, "`#[cached]` cannot be used on a variadic function");
    }
    let receiver = receiver_kind(sig, &mut errors);
    let params = params(sig, &mut errors);
    let output = match output(sig) {
        Ok(o) => Some(o),
        Err(e) => {
            errors.push(e);
            None
        }
    };
    if let Some(out) = &output {
        check_not_generic(&out.value, &sig.generics, &mut errors);
    }

    // --- skip ------------------------------------------------------------
    let param_names: Vec<&Ident> = params.iter().filter_map(|p| p.ident.as_ref()).collect();
    let list = |names: &[&Ident]| {
        if names.is_empty() {
            format!("`{fn_name}` has no parameters")
        } else {
            let names: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
            format!("the parameters are {}", names.join(", "))
        }
    };
    let mut skipped: Vec<&Ident> = Vec::new();
    if let Some(skip) = &args.skip {
        for name in &skip.value {
            if name == "self" {
                errors.at(
                    name,
                    "the receiver is never part of the key unless the key names one of its \
                     fields, like `{self.tenant}`: remove `self` from `skip`",
                );
            } else if let Some(p) = param_names.iter().find(|p| *p == &name) {
                skipped.push(p);
            } else {
                errors.at(
                    name,
                    format!(
                        "`{name}` is not a parameter of `{fn_name}`; {}",
                        list(&param_names)
                    ),
                );
            }
        }
    }
    // `cache = db_cache` naming a parameter: that parameter is the cache,
    // not a key part.
    if let Some(Expr::Path(path)) = args.cache.as_ref().map(|a| &a.value) {
        if let Some(ident) = path.path.get_ident() {
            if let Some(p) = param_names.iter().find(|p| **p == ident) {
                if !skipped.contains(p) {
                    skipped.push(p);
                }
            }
        }
    }
    let is_skipped = |ident: &Ident| skipped.contains(&ident);

    // --- the key ---------------------------------------------------------
    let mut parts: Vec<KeyPart> = Vec::new();
    let mut key_uses_self = false;
    // Parameters read by the key (the companion takes exactly these).
    let mut in_key: BTreeSet<String> = BTreeSet::new();
    match args.key.as_ref().map(|a| &a.value) {
        Some(KeySpec::Template(t)) => {
            for p in t.placeholders() {
                if p.is_self() {
                    if receiver == ReceiverKind::None {
                        errors.at_span(
                            p.span,
                            format!("`self` in the key, but `{fn_name}` has no `self` receiver"),
                        );
                    }
                    key_uses_self = true;
                } else if let Some(param) = param_names.iter().find(|n| **n == &p.root) {
                    if is_skipped(param) {
                        let at = skip_entry(&args, param).unwrap_or(p.span);
                        errors.at_span(
                            at,
                            format!("`{param}` is part of the key, so it cannot be skipped"),
                        );
                    }
                    in_key.insert(param.to_string());
                } else {
                    errors.at_span(
                        p.span,
                        format!(
                            "`{}` is not a parameter of `{fn_name}`{}; {}",
                            p.root,
                            did_you_mean(&p.root.to_string(), &param_names),
                            list(&param_names)
                        ),
                    );
                }
                parts.push(KeyPart {
                    expr: p.expr(),
                    span: p.span,
                });
            }
        }
        Some(KeySpec::Expr(expr)) => {
            let mentioned = idents_in(expr.to_token_stream());
            key_uses_self = mentioned.contains("self");
            for name in &param_names {
                if mentioned.contains(&name.to_string()) {
                    if is_skipped(name) {
                        let at = skip_entry(&args, name).unwrap_or_else(|| expr.span());
                        errors.at_span(
                            at,
                            format!("`{name}` is part of the key, so it cannot be skipped"),
                        );
                    }
                    in_key.insert(name.to_string());
                }
            }
            match &**expr {
                Expr::Tuple(t) => parts.extend(t.elems.iter().map(|e| KeyPart {
                    expr: e.to_token_stream(),
                    span: e.span(),
                })),
                other => parts.push(KeyPart {
                    expr: other.to_token_stream(),
                    span: other.span(),
                }),
            }
        }
        None => {
            for name in &param_names {
                if !is_skipped(name) {
                    in_key.insert(name.to_string());
                    parts.push(KeyPart {
                        expr: name.to_token_stream(),
                        span: name.span(),
                    });
                }
            }
        }
    }
    // Keys are complete or the build fails.
    for name in &param_names {
        if !in_key.contains(&name.to_string()) && !is_skipped(name) {
            let how = match args.key.as_ref().map(|a| &a.value) {
                Some(KeySpec::Expr(_)) => "use it in `key = ..`".to_string(),
                _ => format!("add `{{{name}}}`"),
            };
            errors.at(
                name,
                format!("`{name}` is not part of the key: {how} or `skip = [{name}]`"),
            );
        }
    }

    // --- tags: names must exist ------------------------------------------
    if let Some(tags) = &args.tags {
        for tag in &tags.value {
            if let TagSpec::Template(t) = tag {
                check_template_names(t, &param_names, receiver, &fn_name, &mut errors);
            }
        }
    }

    // --- arguments that depend on the return type -------------------------
    if let (Some(neg), Some(out)) = (&args.negative_ttl, &output) {
        if matches!(out.mode, Mode::Plain | Mode::Result) {
            errors.at_span(
                neg.kw,
                "`negative_ttl` caches `None`, but this function does not return an `Option` \
                 (or `Result<Option<T>, E>`)",
            );
        }
    }
    if let (Some(t), None) = (&args.timeout, &args.stale) {
        errors.at_span(
            t.kw,
            "`timeout` bounds how long a caller waits before it is served a stale value: add \
             `stale = \"..\"` (to bound the body itself, use `tokio::time::timeout` inside it)",
        );
    }

    let companion = match args.key_fn.as_ref().map(|a| &a.value) {
        Some(KeyFn::Off) => None,
        Some(KeyFn::Named(name)) => Some(name.clone()),
        None => Some(format_ident!("{}_key", fn_name, span = sig.ident.span())),
    };

    errors.finish()?;
    let Some(output) = output else {
        // unreachable: a failed output analysis recorded an error
        return Ok(func.to_token_stream());
    };

    let krate = match &args.krate {
        Some(k) => k.value.to_token_stream(),
        None => quote!(::tiered_cache),
    };
    let ctx = Ctx {
        krate,
        args: &args,
        func,
        output: &output,
        receiver,
        parts: &parts,
    };
    let function = ctx.function(&params);
    let companion = companion.map(|name| {
        ctx.companion(
            &name,
            &params
                .iter()
                .filter(|p| {
                    p.ident
                        .as_ref()
                        .is_some_and(|i| in_key.contains(&i.to_string()))
                })
                .collect::<Vec<_>>(),
            key_uses_self,
        )
    });
    Ok(quote!(#function #companion))
}

fn receiver_kind(sig: &Signature, errors: &mut Errors) -> ReceiverKind {
    let Some(r) = sig.receiver() else {
        return ReceiverKind::None;
    };
    let mutable_ref = match (&r.reference, &r.colon_token) {
        (Some(_), _) => r.mutability.is_some(),
        (None, Some(_)) => matches!(&*r.ty, Type::Reference(t) if t.mutability.is_some()),
        (None, None) => false,
    };
    if mutable_ref {
        errors.at(
            r,
            "`#[cached]` cannot be used on a method taking `&mut self`: on a hit the body does \
             not run, so its changes to `self` would silently not happen; take `&self`",
        );
        return ReceiverKind::Ref;
    }
    if r.reference.is_some() || matches!(&*r.ty, Type::Reference(_)) {
        ReceiverKind::Ref
    } else {
        ReceiverKind::Value
    }
}

fn params<'a>(sig: &'a Signature, errors: &mut Errors) -> Vec<Param<'a>> {
    let mut out = Vec::new();
    for input in &sig.inputs {
        let FnArg::Typed(pt) = input else { continue };
        let ident = match &*pt.pat {
            Pat::Ident(p) if p.subpat.is_none() => Some(p.ident.clone()),
            Pat::Wild(_) => None,
            other => {
                errors.at(
                    other,
                    "`#[cached]` needs a name for each parameter, to build the key: \
                     destructure it inside the body",
                );
                None
            }
        };
        out.push(Param { ident, ty: &pt.ty });
    }
    out
}

/// Analyses the declared return type.
fn output(sig: &Signature) -> syn::Result<Output> {
    let ReturnType::Type(_, ret) = &sig.output else {
        return Err(syn::Error::new_spanned(
            &sig.ident,
            "`#[cached]` needs a return type: the value it caches",
        ));
    };
    let ret = (**ret).clone();
    unsupported(&ret)?;
    let (mode, inner) = if let Some(ok) = generic_arg(&ret, "Result", 1..=2) {
        match generic_arg(ok, "Option", 1..=1) {
            Some(some) => (Mode::ResultOption, some),
            None => (Mode::Result, ok),
        }
    } else if let Some(some) = generic_arg(&ret, "Option", 1..=1) {
        (Mode::Option, some)
    } else {
        (Mode::Plain, &ret)
    };
    unsupported(inner)?;
    let (arc, value) = match generic_arg(inner, "Arc", 1..=1) {
        Some(v) => {
            unsupported(v)?;
            (true, v.clone())
        }
        None => (false, inner.clone()),
    };
    Ok(Output {
        mode,
        arc,
        value,
        ret,
    })
}

/// The first type argument of `Name<..>` (the last path segment is `Name`,
/// with a number of generic arguments in `count`).
fn generic_arg<'a>(
    ty: &'a Type,
    name: &str,
    count: std::ops::RangeInclusive<usize>,
) -> Option<&'a Type> {
    let Type::Path(p) = ty else { return None };
    if p.qself.is_some() {
        return None;
    }
    let last = p.path.segments.last()?;
    // `Result` also matches aliases named like `io::Result` or `AppResult`:
    // if one is not a `std` `Result`, `__private::ResultParts` says so at
    // compile time.
    let matches =
        last.ident == name || (name == "Result" && last.ident.to_string().ends_with(name));
    if !matches {
        return None;
    }
    let PathArguments::AngleBracketed(a) = &last.arguments else {
        return None;
    };
    if !count.contains(&a.args.len()) {
        return None;
    }
    match a.args.first()? {
        GenericArgument::Type(t) => Some(t),
        _ => None,
    }
}

fn unsupported(ty: &Type) -> syn::Result<()> {
    let msg = match ty {
        Type::ImplTrait(_) => {
            "`#[cached]` cannot cache an `impl Trait`: name a concrete type that implements \
             `Serialize` and `DeserializeOwned`"
        }
        Type::Reference(_) => {
            "`#[cached]` cannot cache a reference: return an owned value (or an `Arc<T>`, which \
             a hit hands out without copying)"
        }
        Type::Tuple(t) if t.elems.is_empty() => {
            "`#[cached]` has nothing to cache in `()`: return the value to cache"
        }
        Type::Never(_) => "`#[cached]` has nothing to cache in `!`",
        Type::Infer(_) => "`#[cached]` needs the cached type written out",
        Type::Ptr(_) | Type::BareFn(_) | Type::TraitObject(_) => {
            "`#[cached]` cannot cache this type: cached values are stored in Redis, so they \
             must implement `Serialize` and `DeserializeOwned`"
        }
        Type::Paren(p) => return unsupported(&p.elem),
        Type::Group(g) => return unsupported(&g.elem),
        _ => return Ok(()),
    };
    Err(syn::Error::new_spanned(ty, msg))
}

/// A cached type that depends on the function's generic type parameters
/// would share keys between instantiations: reject it.
fn check_not_generic(value: &Type, generics: &Generics, errors: &mut Errors) {
    let type_params: Vec<&Ident> = generics.type_params().map(|t| &t.ident).collect();
    if type_params.is_empty() {
        return;
    }
    let mut reported = BTreeSet::new();
    walk_idents(value.to_token_stream(), &mut |ident| {
        if type_params.contains(&ident) && reported.insert(ident.to_string()) {
            errors.at(
                ident,
                format!(
                    "the cached type depends on the generic parameter `{ident}`, so calls with \
                     different `{ident}` would share cache entries; cache a concrete type \
                     (generic parameters may still be key parts)"
                ),
            );
        }
    });
}

fn check_template_names(
    t: &Template,
    params: &[&Ident],
    receiver: ReceiverKind,
    fn_name: &str,
    errors: &mut Errors,
) {
    for p in t.placeholders() {
        if p.is_self() {
            if receiver == ReceiverKind::None {
                errors.at_span(
                    p.span,
                    format!("`self` in a tag, but `{fn_name}` has no `self` receiver"),
                );
            }
        } else if !params.contains(&&p.root) {
            let names: Vec<String> = params.iter().map(|n| format!("`{n}`")).collect();
            errors.at_span(
                p.span,
                format!(
                    "`{}` is not a parameter of `{fn_name}`{}; the parameters are {}",
                    p.root,
                    did_you_mean(&p.root.to_string(), params),
                    names.join(", ")
                ),
            );
        }
    }
}

fn did_you_mean(name: &str, params: &[&Ident]) -> String {
    params
        .iter()
        .map(|p| p.to_string())
        .filter(|p| {
            let (a, b) = (p.as_str(), name);
            a.len().abs_diff(b.len()) <= 1
                && (a.starts_with(b)
                    || b.starts_with(a)
                    || a.chars().zip(b.chars()).filter(|(x, y)| x != y).count() <= 1)
        })
        .map(|p| format!(" (did you mean `{p}`?)"))
        .next()
        .unwrap_or_default()
}

fn skip_entry(args: &Args, name: &Ident) -> Option<Span> {
    args.skip
        .as_ref()?
        .value
        .iter()
        .find(|s| *s == name)
        .map(|s| s.span())
}

/// The same tokens, all with `span` (for paths we generate, so that errors
/// about them point at the user's code).
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut tt| {
            if let TokenTree::Group(g) = &tt {
                let mut group = proc_macro2::Group::new(g.delimiter(), respan(g.stream(), span));
                group.set_span(span);
                tt = TokenTree::Group(group);
            } else {
                tt.set_span(span);
            }
            tt
        })
        .collect()
}

fn walk_idents(tokens: TokenStream, f: &mut impl FnMut(&Ident)) {
    for tt in tokens {
        match tt {
            TokenTree::Ident(i) => f(&i),
            TokenTree::Group(g) => walk_idents(g.stream(), f),
            _ => {}
        }
    }
}

fn idents_in(tokens: TokenStream) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    walk_idents(tokens, &mut |i| {
        out.insert(i.to_string());
    });
    out
}

/// Everything the generators need.
struct Ctx<'a> {
    krate: TokenStream,
    args: &'a Args,
    func: &'a ItemFn,
    output: &'a Output,
    receiver: ReceiverKind,
    parts: &'a [KeyPart],
}

impl Ctx<'_> {
    fn private(&self) -> TokenStream {
        let krate = &self.krate;
        quote!(#krate::__private)
    }

    /// `{ let mut key = new_key::<V>(entity, version); push_part(..); key }`
    fn key_block(&self) -> TokenStream {
        let p = self.private();
        let value = &self.output.value;
        let key = Ident::new("__tiered_cache_key", Span::mixed_site());
        let fn_name = self.func.sig.ident.unraw().to_string();
        let entity = match &self.args.name {
            Some(name) => {
                let name = &name.value;
                quote_spanned!(name.span()=> #name)
            }
            None => quote!(::core::concat!(::core::module_path!(), "::", #fn_name)),
        };
        let version = match &self.args.version {
            Some(v) => {
                let v = &v.value;
                quote_spanned!(v.span()=> #v)
            }
            None => quote!(1u32),
        };
        // Methods without an explicit `name`: the `Self` type is part of the
        // key, so two types' methods of the same name never share entries.
        let self_type = (self.receiver != ReceiverKind::None && self.args.name.is_none())
            .then(|| quote!(#p::push_part(&mut #key, #p::type_name::<Self>());));
        let pushes = self.parts.iter().map(|part| {
            let expr = &part.expr;
            quote_spanned!(part.span=>
                #p::push_part(&mut #key, #p::Part::new(&(#expr)).key_part());
            )
        });
        let rp = respan(p.clone(), value.span());
        let new_key = quote_spanned!(value.span()=> #rp::new_key::<#value>);
        quote!({
            let mut #key = #new_key(#entity, #version);
            #self_type
            #(#pushes)*
            #key
        })
    }

    fn duration(&self, d: &DurationArg) -> TokenStream {
        let p = self.private();
        match d {
            DurationArg::Literal { value, .. } => {
                let secs = value.as_secs();
                let nanos = value.subsec_nanos();
                quote!(#p::Duration::new(#secs, #nanos))
            }
            DurationArg::Expr(e) => quote_spanned!(e.span()=> {
                let d: #p::Duration = #e;
                d
            }),
        }
    }

    /// Whether the options are the same on every call (then they live in a
    /// `static` and a hit allocates nothing for them).
    fn options_are_constant(&self) -> bool {
        let a = self.args;
        let lit = |d: &Option<crate::args::Arg<DurationArg>>| {
            d.as_ref()
                .is_none_or(|d| matches!(d.value, DurationArg::Literal { .. }))
        };
        lit(&a.ttl)
            && lit(&a.stale)
            && lit(&a.negative_ttl)
            && lit(&a.timeout)
            && a.early_refresh.as_ref().is_none_or(|e| match &e.value {
                EarlyRefresh::Off => true,
                EarlyRefresh::Beta(b) => matches!(**b, Expr::Lit(_)),
            })
            && a.tags.as_ref().is_none_or(|t| {
                t.value
                    .iter()
                    .all(|t| matches!(t, TagSpec::Template(t) if t.constant().is_some()))
            })
    }

    /// An expression of type `EntryOptions`.
    fn options(&self) -> TokenStream {
        let p = self.private();
        let o = Ident::new("__tiered_cache_options", Span::mixed_site());
        let mut steps = Vec::new();
        let mut step = |method: &str, value: TokenStream| {
            let method = Ident::new(method, Span::call_site());
            steps.push(quote!(let #o = #p::EntryOptions::#method(#o, #value);));
        };
        let a = self.args;
        if let Some(d) = &a.ttl {
            step("ttl", self.duration(&d.value));
        }
        if let Some(d) = &a.stale {
            step("stale", self.duration(&d.value));
        }
        if let Some(d) = &a.negative_ttl {
            step("negative_ttl", self.duration(&d.value));
        }
        if let Some(d) = &a.timeout {
            step("soft_timeout", self.duration(&d.value));
        }
        if let Some(e) = &a.early_refresh {
            let beta = match &e.value {
                EarlyRefresh::Off => quote!(0.0f64),
                EarlyRefresh::Beta(b) => match &**b {
                    Expr::Lit(ExprLit { lit, .. }) => {
                        let v = match lit {
                            Lit::Float(f) => f.base10_parse::<f64>().unwrap_or(1.0),
                            Lit::Int(i) => i.base10_parse::<f64>().unwrap_or(1.0),
                            _ => 1.0,
                        };
                        let v = proc_macro2::Literal::f64_suffixed(v);
                        quote_spanned!(lit.span()=> #v)
                    }
                    b => quote_spanned!(b.span()=> {
                        let beta: f64 = #b;
                        beta
                    }),
                },
            };
            step("early_refresh", beta);
        }
        if let Some(tags) = &a.tags {
            for tag in &tags.value {
                let value = match tag {
                    TagSpec::Template(t) => match t.constant() {
                        Some(c) => quote_spanned!(t.lit.span()=> #c),
                        None => self.render(t),
                    },
                    TagSpec::Expr(e) => quote_spanned!(e.span()=> #e),
                };
                step("tag", value);
            }
        }
        quote!({
            let #o = #p::entry_options();
            #(#steps)*
            #o
        })
    }

    /// A `String` rendered from a tag template.
    fn render(&self, t: &Template) -> TokenStream {
        let p = self.private();
        let pieces = t.segments.iter().map(|s| match s {
            Segment::Text(text) => quote!(&#text),
            Segment::Part(part) => {
                let expr = part.expr();
                quote_spanned!(part.span=> &#p::Part::new(&(#expr)).key_part())
            }
        });
        quote!(#p::render(&[#(#pieces),*]))
    }

    /// The rewritten function.
    fn function(&self, params: &[Param<'_>]) -> TokenStream {
        let p = self.private();
        let func = self.func;
        let outer = func
            .attrs
            .iter()
            .filter(|a| matches!(a.style, AttrStyle::Outer));
        let inner = func
            .attrs
            .iter()
            .filter(|a| matches!(a.style, AttrStyle::Inner(_)));
        let vis = &func.vis;
        let sig = &func.sig;
        let stmts = &func.block.stmts;
        let out = self.output;
        let ret = &out.ret;
        let ret_span = ret.span();
        let fn_name = func.sig.ident.unraw().to_string();

        let key = Ident::new("__tiered_cache_key", Span::mixed_site());
        let opts = Ident::new("__tiered_cache_options", Span::mixed_site());
        let cache = Ident::new("__tiered_cache", Span::mixed_site());
        let holder = Ident::new("__tiered_cache_holder", Span::mixed_site());
        let body = Ident::new("__tiered_cache_body", Span::mixed_site());
        let found = Ident::new("__tiered_cache_found", Span::mixed_site());

        let key_block = self.key_block();
        let options = self.options();
        let options = if self.options_are_constant() {
            let statik = Ident::new("__TIERED_CACHE_OPTIONS", Span::mixed_site());
            quote! {
                static #statik: #p::OnceLock<#p::EntryOptions> = #p::OnceLock::new();
                let #opts: &#p::EntryOptions = #statik.get_or_init(|| #options);
            }
        } else {
            quote! {
                let #opts: &#p::EntryOptions = &#options;
            }
        };

        let cache_init = match &self.args.cache {
            None => quote! {
                let #cache: #p::Option<&#p::TieredCache> =
                    #p::installed(::core::concat!(::core::module_path!(), "::", #fn_name));
            },
            Some(c) => {
                let expr = &c.value;
                if self.cache_moves_with_body(expr, params) {
                    // The body takes ownership of what the cache expression
                    // borrows from: hold a handle of our own (an Arc clone).
                    quote_spanned! {expr.span()=>
                        let #holder: #p::TieredCache = #p::cache_owned(&(#expr));
                        let #cache: #p::Option<&#p::TieredCache> = #p::Option::Some(&#holder);
                    }
                } else {
                    quote_spanned! {expr.span()=>
                        let #holder = &(#expr);
                        let #cache: #p::Option<&#p::TieredCache> =
                            #p::Option::Some(#p::cache_ref(#holder));
                    }
                }
            }
        };

        // tracing's "fake return edge": pins the async block's output type to
        // the declared one, so `?` and `.into()` infer as in the original.
        let fake_return = quote_spanned! {ret_span=>
            #[allow(
                unknown_lints,
                unreachable_code,
                clippy::diverging_sub_expression,
                clippy::empty_loop,
                clippy::let_unit_value,
                clippy::let_with_type_underscore,
                clippy::needless_return,
                clippy::unreachable
            )]
            if false {
                let __tiered_cache_fake_return: #ret = loop {};
                return __tiered_cache_fake_return;
            }
        };

        let helper = match (out.mode, out.arc) {
            (Mode::Plain, false) => "cached_value",
            (Mode::Plain, true) => "cached_value_arc",
            (Mode::Option, false) => "cached_option",
            (Mode::Option, true) => "cached_option_arc",
            (Mode::Result, false) => "cached_result",
            (Mode::Result, true) => "cached_result_arc",
            (Mode::ResultOption, false) => "cached_result_option",
            (Mode::ResultOption, true) => "cached_result_option_arc",
        };
        // Bound errors (`Serialize`, `Clone`, `Send`) point at the return
        // type: every token of the call is located there, all in one
        // hygiene context (mixing contexts would make rustc fall back to
        // the attribute's span for the whole expression).
        let at = Span::mixed_site().located_at(ret_span);
        let helper = Ident::new(helper, at);
        let rp = respan(p.clone(), at);
        let share = matches!(out.mode, Mode::Result | Mode::ResultOption).then(|| {
            quote_spanned!(at=>
                #rp::ErrorShare::<<#ret as #rp::ResultParts>::Err>::new().share(),
            )
        });
        let local = |ident: &Ident| Ident::new(&ident.to_string(), at);
        let (found_r, key_r, opts_r, body_r) =
            (local(&found), local(&key), local(&opts), local(&body));
        let call = quote_spanned! {at=>
            #rp::#helper(#found_r, &#key_r, #opts_r, #share #body_r).await
        };

        let dispatch = quote! {
            match #cache {
                #p::Option::Some(#found) => #call,
                #p::Option::None => #body().await,
            }
        };
        // The generated blocks take the return type's span, so errors about
        // the generated futures point at the signature rather than at the
        // whole attribute (statements inside keep their own spans).
        let mut user_block = proc_macro2::Group::new(
            proc_macro2::Delimiter::Brace,
            quote!(#fake_return #(#stmts)*),
        );
        user_block.set_span(ret_span);
        let body_closure = {
            let header = quote_spanned!(ret_span=> let #body = move || async move);
            quote!(#header #user_block;)
        };
        let mut block = proc_macro2::Group::new(
            proc_macro2::Delimiter::Brace,
            quote! {
                #(#inner)*
                let #key = #key_block;
                #options
                #cache_init
                #body_closure
                #dispatch
            },
        );
        block.set_span(ret_span);

        quote! {
            #(#outer)*
            #vis #sig #block
        }
    }

    /// Whether the cache expression reads something the body takes by value
    /// (a by-value `self` or parameter): then the cache handle is cloned.
    fn cache_moves_with_body(&self, expr: &Expr, params: &[Param<'_>]) -> bool {
        let mentioned = idents_in(expr.to_token_stream());
        if self.receiver == ReceiverKind::Value && mentioned.contains("self") {
            return true;
        }
        params.iter().any(|p| {
            p.ident
                .as_ref()
                .is_some_and(|i| mentioned.contains(&i.to_string()))
                && !matches!(p.ty, Type::Reference(_))
        })
    }

    /// `fn <name>(key params) -> Key<V>`: the key `#[cached]` uses, for
    /// invalidation and inspection.
    fn companion(&self, name: &Ident, params: &[&Param<'_>], uses_self: bool) -> TokenStream {
        let p = self.private();
        let vis = &self.func.vis;
        let value = &self.output.value;
        let fn_name = self.func.sig.ident.unraw().to_string();
        let receiver = uses_self.then(|| quote!(&self,));
        let inputs = params.iter().map(|param| {
            let ident = &param.ident;
            let ty = param.ty;
            quote!(#ident: #ty)
        });
        let generics = self.companion_generics(params);
        let (impl_generics, _, where_clause) = generics.split_for_impl();
        let key_block = self.key_block();
        let doc = format!(
            " The cache key that `{fn_name}` reads and writes for these arguments \
             (generated by `#[cached]`): pass it to `TieredCache::invalidate` to drop the \
             entry."
        );
        quote! {
            #[doc = #doc]
            #[allow(dead_code, clippy::ptr_arg, clippy::too_many_arguments)]
            #vis fn #name #impl_generics (#receiver #(#inputs),*) -> #p::Key<#value> #where_clause {
                #key_block
            }
        }
    }

    /// The function's generics, less those that the companion's parameters
    /// and return type do not mention (they could not be inferred).
    fn companion_generics(&self, params: &[&Param<'_>]) -> Generics {
        let mut used = BTreeSet::new();
        for param in params {
            used.extend(idents_in(param.ty.to_token_stream()));
        }
        used.extend(idents_in(self.output.value.to_token_stream()));
        let mut generics = self.func.sig.generics.clone();
        let mut dropped = BTreeSet::new();
        generics.params = generics
            .params
            .into_iter()
            .filter(|g| {
                let ident = match g {
                    GenericParam::Type(t) => t.ident.to_string(),
                    GenericParam::Lifetime(l) => l.lifetime.ident.to_string(),
                    GenericParam::Const(c) => c.ident.to_string(),
                };
                let keep = used.contains(&ident);
                if !keep {
                    dropped.insert(ident);
                }
                keep
            })
            .collect();
        if let Some(w) = &mut generics.where_clause {
            w.predicates = std::mem::take(&mut w.predicates)
                .into_iter()
                .filter(|pred: &WherePredicate| {
                    idents_in(pred.to_token_stream()).is_disjoint(&dropped)
                })
                .collect();
        }
        generics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: TokenStream, item: TokenStream) -> Result<String, Vec<String>> {
        let func: ItemFn = syn::parse2(item).unwrap();
        match expand(syn::parse2(args), &func) {
            Ok(ts) => Ok(ts.to_string()),
            Err(e) => Err(e.into_iter().map(|e| e.to_string()).collect()),
        }
    }

    fn errs(args: TokenStream, item: TokenStream) -> Vec<String> {
        run(args, item).expect_err("expected errors")
    }

    #[test]
    fn expands_a_plain_function() {
        let out = run(
            quote!(
                key = "product:{id}:{cat}",
                ttl = "30m",
                tags = ["products", "category:{cat}"],
                version = 3
            ),
            quote!(
                async fn get_product(id: u64, cat: u32) -> Result<Product, DbError> {
                    db().await
                }
            ),
        )
        .unwrap();
        let file: syn::File = syn::parse_str(&out).expect("output parses");
        assert_eq!(file.items.len(), 2, "function + key builder");
        assert!(!out.contains(" use "), "no `use` in generated code");
        assert!(out.contains("fn get_product_key (id : u64 , cat : u32) -> :: tiered_cache :: __private :: Key < Product >"), "{out}");
        assert!(out.contains("cached_result"));
        assert!(out.contains("Duration :: new (1800u64 , 0u32)"));
        // tags with a placeholder are rendered per call: no static options
        assert!(!out.contains("OnceLock"));
    }

    #[test]
    fn constant_options_live_in_a_static() {
        let out = run(
            quote!(ttl = "1s", tags = ["all"], early_refresh = 1),
            quote!(
                async fn f(id: u64) -> Option<Thing> {
                    None
                }
            ),
        )
        .unwrap();
        assert!(out.contains("OnceLock"), "{out}");
        assert!(out.contains("1f64"), "{out}");
        assert!(out.contains("cached_option"));
    }

    #[test]
    fn modes_and_arc() {
        let helper = |ret: TokenStream| {
            let out = run(
                quote!(),
                quote!(async fn f(id: u64) -> #ret { unreachable!() }),
            )
            .unwrap();
            out.split("__private :: cached_")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(helper(quote!(Product)), "value");
        assert_eq!(helper(quote!(Arc<Product>)), "value_arc");
        assert_eq!(helper(quote!(std::sync::Arc<Product>)), "value_arc");
        assert_eq!(helper(quote!(Option<Product>)), "option");
        assert_eq!(helper(quote!(Option<Arc<Product>>)), "option_arc");
        assert_eq!(helper(quote!(Result<Product, E>)), "result");
        assert_eq!(helper(quote!(anyhow::Result<Product>)), "result");
        assert_eq!(helper(quote!(AppResult<Option<Product>>)), "result_option");
        assert_eq!(helper(quote!(Result<Arc<Product>, E>)), "result_arc");
        assert_eq!(helper(quote!(Result<Option<Product>, E>)), "result_option");
        assert_eq!(
            helper(quote!(Result<Option<Arc<P>>, E>)),
            "result_option_arc"
        );
        assert_eq!(helper(quote!(Vec<Product>)), "value");
    }

    #[test]
    fn parameter_missing_from_the_key_is_an_error_at_it() {
        assert_eq!(
            errs(
                quote!(key = "product:{id}"),
                quote!(
                    async fn get(id: u64, user: UserId) -> Product {
                        unreachable!()
                    }
                )
            ),
            ["`user` is not part of the key: add `{user}` or `skip = [user]`"]
        );
        assert_eq!(
            errs(
                quote!(key = (id,)),
                quote!(
                    async fn get(id: u64, user: UserId) -> Product {
                        unreachable!()
                    }
                )
            ),
            ["`user` is not part of the key: use it in `key = ..` or `skip = [user]`"]
        );
        // skipped, `_` and the receiver are fine
        run(
            quote!(key = "product:{id}", skip = [db]),
            quote!(
                async fn get(&self, db: &Db, id: u64, _: u8) -> Product {
                    unreachable!()
                }
            ),
        )
        .unwrap();
    }

    #[test]
    fn a_parameter_named_as_the_cache_is_not_a_key_part() {
        let out = run(
            quote!(cache = cache),
            quote!(
                async fn get(cache: &TieredCache, id: u64) -> Product {
                    unreachable!()
                }
            ),
        )
        .unwrap();
        assert!(out.contains("fn get_key (id : u64)"), "{out}");
        run(
            quote!(key = "{id}", cache = cache),
            quote!(
                async fn get(cache: &TieredCache, id: u64) -> Product {
                    unreachable!()
                }
            ),
        )
        .unwrap();
    }

    #[test]
    fn default_key_is_every_parameter_not_skipped() {
        let out = run(
            quote!(skip = [db]),
            quote!(
                async fn get(db: &Db, id: u64, name: &str) -> Product {
                    unreachable!()
                }
            ),
        )
        .unwrap();
        assert!(
            out.contains("fn get_key (id : u64 , name : & str)"),
            "{out}"
        );
        assert!(!out.contains("Part :: new (& (db))"));
        assert!(out.contains("Part :: new (& (id))"));
    }

    #[test]
    fn template_names_are_checked() {
        let e = errs(
            quote!(key = "product:{idd}", tags = ["c:{cat}", "{self.x}"]),
            quote!(
                async fn get(id: u64) -> Product {
                    unreachable!()
                }
            ),
        );
        assert_eq!(
            e,
            [
                "`idd` is not a parameter of `get` (did you mean `id`?); the parameters are `id`",
                "`id` is not part of the key: add `{id}` or `skip = [id]`",
                "`cat` is not a parameter of `get`; the parameters are `id`",
                "`self` in a tag, but `get` has no `self` receiver",
            ]
        );
    }

    #[test]
    fn skip_is_checked() {
        let e = errs(
            quote!(key = "{id}", skip = [id, nope, self]),
            quote!(
                async fn get(&self, id: u64) -> Product {
                    unreachable!()
                }
            ),
        );
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].starts_with("`nope` is not a parameter of `get`"));
        assert!(e[1].starts_with("the receiver is never part of the key"));
        assert_eq!(e[2], "`id` is part of the key, so it cannot be skipped");
    }

    #[test]
    fn signature_errors() {
        let e = errs(
            quote!(),
            quote!(
                fn get(id: u64) -> Product {
                    unreachable!()
                }
            ),
        );
        assert!(e[0].starts_with("`#[cached]` needs an `async fn`"));
        let e = errs(
            quote!(),
            quote!(
                const fn get(id: u64) -> Product {
                    unreachable!()
                }
            ),
        );
        assert!(e[0].contains("const fn"));
        let e = errs(
            quote!(),
            quote!(
                async fn get(&mut self, id: u64) -> Product {
                    unreachable!()
                }
            ),
        );
        assert!(e[0].contains("`&mut self`"));
        let e = errs(
            quote!(),
            quote!(
                async fn get(self: &mut Self) -> Product {
                    unreachable!()
                }
            ),
        );
        assert!(e[0].contains("`&mut self`"));
        let e = errs(
            quote!(),
            quote!(
                async fn get(id: u64) {
                    unreachable!()
                }
            ),
        );
        assert!(e[0].contains("needs a return type"));
        for ret in [
            quote!(impl Serialize),
            quote!(&'static str),
            quote!(()),
            quote!(Result<&'static str, E>),
            quote!(Option<impl Clone>),
            quote!(*const u8),
        ] {
            let e = errs(
                quote!(),
                quote!(async fn get(id: u64) -> #ret { unreachable!() }),
            );
            assert!(e[0].starts_with("`#[cached]`"), "{ret}: {e:?}");
        }
        let e = errs(
            quote!(),
            quote!(
                async fn get((a, b): (u8, u8)) -> Product {
                    unreachable!()
                }
            ),
        );
        assert!(e[0].contains("needs a name for each parameter"));
    }

    #[test]
    fn errors_are_gathered() {
        let e = errs(
            quote!(ttl = "1 fortnight", bogus = 1, ttl = "1s"),
            quote!(
                fn get(&mut self, user: u8) -> Product {
                    unreachable!()
                }
            ),
        );
        assert_eq!(e.len(), 5, "{e:?}");
    }

    #[test]
    fn return_type_dependent_arguments() {
        let e = errs(
            quote!(negative_ttl = "10s"),
            quote!(
                async fn get(id: u64) -> Result<Product, E> {
                    unreachable!()
                }
            ),
        );
        assert!(e[0].starts_with("`negative_ttl` caches `None`"));
        run(
            quote!(negative_ttl = "10s"),
            quote!(
                async fn get(id: u64) -> Result<Option<Product>, E> {
                    unreachable!()
                }
            ),
        )
        .unwrap();
        let e = errs(
            quote!(timeout = "1s"),
            quote!(
                async fn get(id: u64) -> Product {
                    unreachable!()
                }
            ),
        );
        assert!(e[0].starts_with("`timeout` bounds how long"));
    }

    #[test]
    fn generic_value_rejected_generic_key_parts_allowed() {
        let e = errs(
            quote!(),
            quote!(
                async fn get<T: DeserializeOwned>(id: u64) -> Result<Vec<T>, E> {
                    unreachable!()
                }
            ),
        );
        assert!(e[0].starts_with("the cached type depends on the generic parameter `T`"));
        let out = run(
            quote!(skip = [db]),
            quote!(
                async fn get<'a, D: Db, K: Display>(db: &'a D, id: K) -> Product
                where
                    D: Send,
                    K: Sync,
                {
                    unreachable!()
                }
            ),
        )
        .unwrap();
        // the key builder keeps only what its parameters mention
        assert!(out.contains("fn get_key < K : Display > (id : K)"), "{out}");
        assert!(out.contains("where K : Sync"), "{out}");
    }

    #[test]
    fn methods_put_self_type_in_the_key_unless_named() {
        let out = run(
            quote!(key = "{self.tenant}:{id}", cache = self.cache),
            quote!(
                async fn get(&self, id: u64) -> Product {
                    unreachable!()
                }
            ),
        )
        .unwrap();
        assert!(out.contains("type_name :: < Self >"));
        assert!(out.contains("fn get_key (& self , id : u64)"), "{out}");
        assert!(out.contains("cache_ref"));
        let out = run(
            quote!(name = "product", cache = self.cache),
            quote!(
                async fn get(self: Arc<Self>, id: u64) -> Product {
                    unreachable!()
                }
            ),
        )
        .unwrap();
        assert!(!out.contains("type_name"));
        // the body takes `self` by value: the cache handle is cloned
        assert!(out.contains("cache_owned"), "{out}");
        assert!(out.contains("fn get_key (id : u64)"), "{out}");
    }

    #[test]
    fn key_fn_controls_the_companion() {
        let out = run(
            quote!(key_fn = false),
            quote!(
                async fn get(id: u64) -> Product {
                    unreachable!()
                }
            ),
        )
        .unwrap();
        assert!(!out.contains("get_key"));
        let out = run(
            quote!(key_fn = product_key),
            quote!(
                async fn get(id: u64) -> Product {
                    unreachable!()
                }
            ),
        )
        .unwrap();
        assert!(out.contains("fn product_key (id : u64)"));
    }

    #[test]
    fn crate_path_is_used_everywhere() {
        let out = run(
            quote!(crate = ::renamed),
            quote!(
                async fn get(id: u64) -> Product {
                    unreachable!()
                }
            ),
        )
        .unwrap();
        assert!(!out.contains("tiered_cache ::"), "{out}");
        assert!(out.contains(":: renamed :: __private ::"));
    }

    #[test]
    fn original_function_is_emitted_with_errors() {
        let item = quote!(
            fn get(id: u64) -> Product {
                unreachable!()
            }
        );
        let out = cached(quote!(ttl = "x"), item).to_string();
        assert!(out.starts_with("fn get (id : u64) -> Product"), "{out}");
        assert!(out.contains("compile_error"));
    }
}

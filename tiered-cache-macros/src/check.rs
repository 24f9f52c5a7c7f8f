//! Checks the function against the arguments (its signature and return
//! type, `skip`, key completeness, the names in templates) and decides what
//! to generate: a [`Plan`], which is all `expand` reads.

use std::collections::BTreeSet;

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::ToTokens;
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{
    Expr, FnArg, GenericArgument, Generics, Ident, ItemFn, Pat, PathArguments, ReturnType,
    Signature, Type,
};

use crate::args::{ident, Args, Placeholder, Value};
use crate::diag::{did_you_mean, list, Diag};

/// What `expand` generates from.
pub(crate) struct Plan<'a> {
    pub(crate) func: &'a ItemFn,
    pub(crate) args: Args,
    pub(crate) output: Output,
    /// The function has a receiver: unless `name` is given, the `Self` type
    /// is part of the key, so two types' methods never share entries.
    pub(crate) is_method: bool,
    /// The key parts in order: expressions read by reference, with spans.
    pub(crate) parts: Vec<(TokenStream, Span)>,
    /// `cache = ..` reads something the body takes by value (a by-value
    /// `self` or parameter): the generated code clones the cache handle.
    pub(crate) cache_owned: bool,
    pub(crate) companion: Option<Companion<'a>>,
}

/// The key builder `<fn>_key` (or `key_fn = name`).
pub(crate) struct Companion<'a> {
    pub(crate) name: Ident,
    /// The parameters the key reads, in signature order.
    pub(crate) params: Vec<(&'a Ident, &'a Type)>,
    /// The key reads `self`: the builder is a method.
    pub(crate) uses_self: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Mode {
    Plain,
    Option,
    Result,
    ResultOption,
}

/// What the declared return type means for caching.
pub(crate) struct Output {
    pub(crate) mode: Mode,
    /// `V` in `Key<V>` (without the `Arc` of an `Arc<V>`: hits then clone
    /// the `Arc`, not `V`).
    pub(crate) value: Type,
    pub(crate) ret: Type,
}

/// One non-receiver parameter; `ident` is `None` for `_`.
struct Param<'a> {
    ident: Option<&'a Ident>,
    ty: &'a Type,
}

/// What name checks need to know about the function.
struct Names<'a> {
    fn_name: String,
    params: Vec<&'a Ident>,
    has_self: bool,
}

impl<'a> Names<'a> {
    fn param(&self, name: &Ident) -> Option<&'a Ident> {
        self.params.iter().copied().find(|p| *p == name)
    }

    fn unknown(&self, name: &Ident) -> String {
        let (fn_name, params) = (&self.fn_name, &self.params);
        let hint = did_you_mean(&name.to_string(), params);
        let known = match params.is_empty() {
            true => format!("`{fn_name}` has no parameters"),
            false => format!("the parameters are {}", list(params)),
        };
        format!("`{name}` is not a parameter of `{fn_name}`{hint}; {known}")
    }

    /// Checks the root of a placeholder in `place` (the key or a tag);
    /// returns the parameter it reads.
    fn placeholder(&self, p: &Placeholder, place: &str, diag: &mut Diag) -> Option<&'a Ident> {
        if p.root != "self" {
            let param = self.param(&p.root);
            if param.is_none() {
                diag.at(p.span, self.unknown(&p.root));
            }
            return param;
        }
        if !self.has_self {
            let fn_name = &self.fn_name;
            let msg = format!("`self` in {place}, but `{fn_name}` has no `self` receiver");
            diag.at(p.span, msg);
        }
        None
    }
}

/// Checks everything, reporting every problem at once.
pub(crate) fn plan(args: syn::Result<Args>, func: &ItemFn) -> syn::Result<Plan<'_>> {
    let mut diag = Diag::default();
    let args = diag.ok(args).unwrap_or_default();
    let sig = &func.sig;

    // --- the signature ---------------------------------------------------
    if let Some(c) = &sig.constness {
        diag.spanned(c, "`#[cached]` cannot be used on a `const fn`");
    }
    if sig.asyncness.is_none() {
        diag.spanned(
            sig.fn_token,
            "`#[cached]` needs an `async fn`: add `async` (the body becomes the loader that \
             runs on a miss)",
        );
    }
    if let Some(v) = &sig.variadic {
        diag.spanned(v, "`#[cached]` cannot be used on a variadic function");
    }
    let receiver = sig.receiver();
    // `ty` is `&mut Self` for `&mut self` too.
    let mutable =
        receiver.filter(|r| matches!(&*r.ty, Type::Reference(t) if t.mutability.is_some()));
    if let Some(r) = mutable {
        diag.spanned(
            r,
            "`#[cached]` cannot be used on a method taking `&mut self`: on a hit the body \
             does not run, so its changes to `self` would silently not happen; take `&self`",
        );
    }
    let params = params(sig, &mut diag);
    let output = diag.ok(output(sig));
    if let Some(out) = &output {
        check_not_generic(&out.value, &sig.generics, &mut diag);
    }
    let names = Names {
        fn_name: sig.ident.unraw().to_string(),
        params: params.iter().filter_map(|p| p.ident).collect(),
        has_self: receiver.is_some(),
    };

    // --- skip: the parameters that are not key parts ----------------------
    let skip = args.skip.iter().flat_map(|s| &s.value);
    let mut skipped: Vec<&Ident> = Vec::new();
    for name in skip.clone() {
        if name == "self" {
            diag.spanned(
                name,
                "the receiver is never part of the key unless the key names one of its \
                 fields, like `{self.tenant}`: remove `self` from `skip`",
            );
        } else if let Some(p) = names.param(name) {
            skipped.push(p);
        } else {
            diag.spanned(name, names.unknown(name));
        }
    }
    // `cache = db_cache` naming a parameter: that parameter is the cache.
    let cache_param = args
        .cache
        .as_ref()
        .and_then(|c| names.param(&ident(&c.value)?));
    if let Some(p) = cache_param.filter(|p| !skipped.contains(p)) {
        skipped.push(p);
    }

    // --- the key: its parts, and the parameters it reads -------------------
    let key = args.key.as_ref().map(|k| &k.value);
    let (mut parts, mut reads, mut uses_self) = (Vec::new(), Vec::new(), false);
    match key {
        Some(Value::Literal(t)) => {
            for p in t.placeholders() {
                uses_self |= p.root == "self";
                let param = names.placeholder(p, "the key", &mut diag);
                reads.extend(param.map(|n| (n, p.span)));
                parts.push((p.expr(), p.span));
            }
        }
        Some(Value::Expr(e)) => {
            let mentioned = mentions(e);
            uses_self = mentioned.contains("self");
            let read = |n: &&&Ident| mentioned.contains(&n.to_string());
            reads.extend(names.params.iter().filter(read).map(|n| (*n, e.span())));
            let elems: Vec<&Expr> = match &**e {
                Expr::Tuple(t) => t.elems.iter().collect(),
                e => vec![e],
            };
            parts.extend(elems.into_iter().map(|e| (e.to_token_stream(), e.span())));
        }
        None => {
            for n in names.params.iter().filter(|n| !skipped.contains(n)) {
                reads.push((n, n.span()));
                parts.push((n.to_token_stream(), n.span()));
            }
        }
    }
    for (param, at) in &reads {
        if skipped.contains(param) {
            let at = skip.clone().find(|s| s == param).map_or(*at, Ident::span);
            let msg = format!("`{param}` is part of the key, so it cannot be skipped");
            diag.at(at, msg);
        }
    }
    // Keys are complete or the build fails.
    let in_key = |name: &Ident| reads.iter().any(|(r, _)| *r == name);
    let missing = names
        .params
        .iter()
        .filter(|n| !in_key(n) && !skipped.contains(n));
    for name in missing {
        let how = match key {
            Some(Value::Expr(_)) => "use it in `key = ..`".to_string(),
            _ => format!("add `{{{name}}}`"),
        };
        let msg = format!("`{name}` is not part of the key: {how} or `skip = [{name}]`");
        diag.spanned(name, msg);
    }

    // --- tags: names must exist ------------------------------------------
    for tag in args.tags.iter().flat_map(|t| &t.value) {
        if let Value::Literal(t) = tag {
            for p in t.placeholders() {
                names.placeholder(p, "a tag", &mut diag);
            }
        }
    }

    // --- arguments that depend on the return type or on each other ---------
    let mode = output.as_ref().map(|o| o.mode);
    if let (Some(neg), Some(Mode::Plain | Mode::Result)) = (&args.negative_ttl, mode) {
        diag.spanned(
            &neg.kw,
            "`negative_ttl` caches `None`, but this function does not return an `Option` \
             (or `Result<Option<T>, E>`)",
        );
    }
    if let (Some(t), None) = (&args.timeout, &args.stale) {
        diag.spanned(
            &t.kw,
            "`timeout` bounds how long a caller waits before it is served a stale value: add \
             `stale = \"..\"` (to bound the body itself, use `tokio::time::timeout` inside it)",
        );
    }

    let companion = match &args.key_fn {
        Some(key_fn) => key_fn.value.clone(),
        None => Some(Ident::new(
            &format!("{}_key", names.fn_name),
            sig.ident.span(),
        )),
    };
    let companion = companion.map(|name| Companion {
        name,
        params: params
            .iter()
            .filter_map(|p| Some((p.ident?, p.ty)))
            .filter(|(i, _)| in_key(i))
            .collect(),
        uses_self,
    });
    let cache_owned = args.cache.as_ref().is_some_and(|c| {
        let mentioned = mentions(&c.value);
        let moved = |p: &Param<'_>| {
            p.ident.is_some_and(|i| mentioned.contains(&i.to_string()))
                && !matches!(p.ty, Type::Reference(_))
        };
        let self_moved = receiver.is_some_and(|r| !matches!(*r.ty, Type::Reference(_)));
        (self_moved && mentioned.contains("self")) || params.iter().any(moved)
    });

    let output = diag.finish(output)?;
    // `None` only after an error, which `finish` returned.
    let output = output.ok_or_else(|| syn::Error::new_spanned(&sig.output, "unsupported"))?;
    Ok(Plan {
        func,
        output,
        is_method: receiver.is_some(),
        parts,
        cache_owned,
        companion,
        args,
    })
}

fn params<'a>(sig: &'a Signature, diag: &mut Diag) -> Vec<Param<'a>> {
    let typed = sig.inputs.iter().filter_map(|input| match input {
        FnArg::Typed(pt) => Some(pt),
        FnArg::Receiver(_) => None,
    });
    let param = |pt: &'a syn::PatType| {
        let ident = match &*pt.pat {
            Pat::Ident(p) if p.subpat.is_none() => Some(&p.ident),
            Pat::Wild(_) => None,
            other => {
                diag.spanned(
                    other,
                    "`#[cached]` needs a name for each parameter, to build the key: \
                     destructure it inside the body",
                );
                None
            }
        };
        Param { ident, ty: &pt.ty }
    };
    typed.map(param).collect()
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
    let arc = generic_arg(inner, "Arc", 1..=1);
    let value = arc.unwrap_or(inner).clone();
    unsupported(&value)?;
    Ok(Output { mode, value, ret })
}

/// The first type argument of `Name<..>` (the last path segment is `Name`,
/// with a number of generic arguments in `count`).
fn generic_arg<'a>(
    ty: &'a Type,
    name: &str,
    count: std::ops::RangeInclusive<usize>,
) -> Option<&'a Type> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last().filter(|_| p.qself.is_none())?;
    // `Result` also matches aliases named like `io::Result` or `AppResult`:
    // if one is not a `std` `Result`, `__private::ResultParts` says so at
    // compile time.
    let ident = last.ident.to_string();
    if ident != name && !(name == "Result" && ident.ends_with(name)) {
        return None;
    }
    match &last.arguments {
        PathArguments::AngleBracketed(a) if count.contains(&a.args.len()) => {
            match a.args.first()? {
                GenericArgument::Type(t) => Some(t),
                _ => None,
            }
        }
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
fn check_not_generic(value: &Type, generics: &Generics, diag: &mut Diag) {
    let type_params: Vec<&Ident> = generics.type_params().map(|t| &t.ident).collect();
    let mut reported = BTreeSet::new();
    for ident in idents(value.to_token_stream()) {
        if type_params.contains(&&ident) && reported.insert(ident.to_string()) {
            let msg = format!(
                "the cached type depends on the generic parameter `{ident}`, so calls with \
                 different `{ident}` would share cache entries; cache a concrete type \
                 (generic parameters may still be key parts)"
            );
            diag.spanned(&ident, msg);
        }
    }
}

/// Every identifier in `tokens`, groups included.
pub(crate) fn idents(tokens: TokenStream) -> Vec<Ident> {
    let mut out = Vec::new();
    for tt in tokens {
        match tt {
            TokenTree::Ident(i) => out.push(i),
            TokenTree::Group(g) => out.extend(idents(g.stream())),
            _ => {}
        }
    }
    out
}

/// The names of every identifier in `tokens`.
pub(crate) fn mentions(tokens: &impl ToTokens) -> BTreeSet<String> {
    idents(tokens.to_token_stream())
        .iter()
        .map(Ident::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan for `#[cached(args)] item`, or every error message.
    fn check(args: &str, item: &str) -> Result<Plan<'static>, Vec<String>> {
        let func: &'static ItemFn = Box::leak(Box::new(syn::parse_str(item).unwrap()));
        let errors = |e: syn::Error| e.into_iter().map(|e| e.to_string()).collect();
        plan(syn::parse_str(args), func).map_err(errors)
    }

    fn errs(args: &str, item: &str) -> Vec<String> {
        check(args, item).err().expect("expected errors")
    }

    /// The key builder's parameters.
    fn companion(args: &str, item: &str) -> Vec<String> {
        let params = check(args, item).unwrap().companion.unwrap().params;
        params.iter().map(|(i, _)| i.to_string()).collect()
    }

    #[test]
    fn key_completeness() {
        let f = "async fn f(id: u64, user: U) -> P {}";
        let missing = "`user` is not part of the key:";
        let e = errs(r#"key = "{id}""#, f);
        assert_eq!(e, [format!("{missing} add `{{user}}` or `skip = [user]`")]);
        let use_it = format!("{missing} use it in `key = ..` or `skip = [user]`");
        assert_eq!(errs("key = (id,)", f), [use_it]);
        // skipped, `_`, the receiver and a parameter named as the cache are fine
        let method = "async fn f(&self, db: &Db, id: u64, _: u8) -> P {}";
        assert_eq!(companion(r#"key = "{id}", skip = [db]"#, method), ["id"]);
        let cache = "async fn f(cache: &C, id: u64) -> P {}";
        assert_eq!(companion("cache = cache", cache), ["id"]);
        assert_eq!(companion(r#"key = "{id}", cache = cache"#, cache), ["id"]);
        // without `key`, the key is every parameter not skipped
        let f = "async fn f(db: &D, id: u64, s: &str) -> P {}";
        let parts = check("skip = [db]", f).unwrap().parts;
        let parts: Vec<String> = parts.iter().map(|(e, _)| e.to_string()).collect();
        assert_eq!(parts, ["id", "s"]);
    }

    #[test]
    fn template_names_are_checked() {
        let args = r#"key = "product:{idd}", tags = ["c:{cat}", "{self.x}"]"#;
        assert_eq!(
            errs(args, "async fn get(id: u64) -> P {}"),
            [
                "`idd` is not a parameter of `get` (did you mean `id`?); the parameters are `id`",
                "`id` is not part of the key: add `{id}` or `skip = [id]`",
                "`cat` is not a parameter of `get`; the parameters are `id`",
                "`self` in a tag, but `get` has no `self` receiver",
            ]
        );
        assert_eq!(
            errs(r#"key = "{self.x}:{id}""#, "async fn get() -> P {}"),
            [
                "`self` in the key, but `get` has no `self` receiver",
                "`id` is not a parameter of `get`; `get` has no parameters",
            ]
        );
    }

    #[test]
    fn skip_is_checked() {
        let e = errs(
            r#"key = "{id}", skip = [id, nope, self]"#,
            "async fn get(&self, id: u64) -> P {}",
        );
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].starts_with("`nope` is not a parameter of `get`"));
        assert!(e[1].starts_with("the receiver is never part of the key"));
        assert_eq!(e[2], "`id` is part of the key, so it cannot be skipped");
    }

    #[test]
    fn signature_and_return_type_errors() {
        for (item, msg) in [
            ("fn f() -> P {}", "needs an `async fn`"),
            ("const fn f() -> P {}", "const fn"),
            ("async fn f(&mut self) -> P {}", "`&mut self`"),
            ("async fn f(self: &mut Self) -> P {}", "`&mut self`"),
            ("async fn f() {}", "needs a return type"),
            ("async fn f((a, b): (u8, u8)) -> P {}", "needs a name"),
            ("async fn f() -> impl Serialize {}", "`impl Trait`"),
            ("async fn f() -> Option<impl Clone> {}", "`impl Trait`"),
            ("async fn f() -> &'static str {}", "a reference"),
            ("async fn f() -> Result<&'static str, E> {}", "a reference"),
            ("async fn f() -> () {}", "nothing to cache"),
            ("async fn f() -> *const u8 {}", "cannot cache this type"),
            ("async fn f<T>() -> Result<Vec<T>, E> {}", "parameter `T`"),
        ] {
            let e = errs("", item);
            assert!(e[0].starts_with("`#[cached]`") || e[0].starts_with("the cached type"));
            assert!(e[0].contains(msg), "{item}: {e:?}");
        }
        // every problem is reported at once
        let e = errs(
            r#"ttl = "1 fortnight", bogus = 1, ttl = "1s""#,
            "fn f(&mut self) -> P {}",
        );
        assert_eq!(e.len(), 5, "{e:?}");
    }

    #[test]
    fn return_type_dependent_arguments() {
        let e = errs(r#"negative_ttl = "10s""#, "async fn f() -> Result<P, E> {}");
        assert!(e[0].starts_with("`negative_ttl` caches `None`"));
        check(
            r#"negative_ttl = "10s""#,
            "async fn f() -> Result<Option<P>, E> {}",
        )
        .unwrap();
        let e = errs(r#"timeout = "1s""#, "async fn f() -> P {}");
        assert!(e[0].starts_with("`timeout` bounds how long"));
    }

    #[test]
    fn modes_and_arc() {
        use Mode::*;
        for (ret, mode) in [
            ("P", Plain),
            ("Arc<P>", Plain),
            ("std::sync::Arc<P>", Plain),
            ("Option<P>", Option),
            ("Option<Arc<P>>", Option),
            ("Result<P, E>", Result),
            ("anyhow::Result<P>", Result),
            ("Result<Arc<P>, E>", Result),
            ("AppResult<Option<P>>", ResultOption),
            ("Result<Option<Arc<P>>, E>", ResultOption),
        ] {
            let out = check("", &format!("async fn f() -> {ret} {{}}"))
                .unwrap()
                .output;
            let value = out.value.to_token_stream().to_string();
            assert_eq!((out.mode, value.as_str()), (mode, "P"), "{ret}");
        }
        let out = check("", "async fn f() -> Vec<P> {}").unwrap().output;
        assert_eq!(out.mode, Plain);
        assert_eq!(out.value.to_token_stream().to_string(), "Vec < P >");
    }

    #[test]
    fn methods_and_the_cache_handle() {
        let args = r#"key = "{self.tenant}:{id}", cache = self.cache"#;
        let plan = check(args, "async fn f(&self, id: u64) -> P {}").unwrap();
        assert!(plan.is_method && !plan.cache_owned && plan.companion.unwrap().uses_self);
        // the body takes `self` by value: the cache handle is cloned
        let plan = check("cache = self.cache", "async fn f(self: Arc<Self>) -> P {}").unwrap();
        assert!(plan.cache_owned && !plan.companion.unwrap().uses_self);
        let plan = check("key_fn = false", "async fn f(id: u64) -> P {}").unwrap();
        assert!(plan.companion.is_none());
    }
}

//! Code generation for `#[cached]`, from the [`Plan`] that `check` made:
//! rewrites the body into a call to the cache's read path.
//!
//! Shape of the output (see the "Equivalent code" section of the macro docs):
//!
//! ```text
//! async fn f(params) -> R {
//!     let key = <KeyDraft<V> from the template>;   // built from &params, on the stack,
//!                                                  // its `{entity:vN}` copied from a static
//!     let opts = <EntryOptions>;                    // a static when constant
//!     let cache = <Option<&TieredCache>>;            // `cache = ..`, else scope, else install
//!     let body = move || async move { <fake return edge> <original body> };
//!     match cache {
//!         Some(cache) => __private::cached(cache, key, opts, share, body).await,
//!         None => body().await,
//!     }
//! }
//! fn f_key(key params) -> Key<V> { <same key> }
//! ```

use std::collections::BTreeSet;

use proc_macro2::{Delimiter, Group, Literal, Span, TokenStream, TokenTree};
use quote::{quote, quote_spanned, ToTokens};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{AttrStyle, Expr, GenericParam, Generics, Ident, ItemFn};

use crate::args::{Segment, Template, Value};
use crate::check::{mentions, plan, Companion, Mode, Plan};

/// Entry point: parse both halves, check, generate; on any error emit the
/// original function unchanged along with the errors (IDEs keep working).
pub(crate) fn cached(args: TokenStream, item: TokenStream) -> TokenStream {
    let result = syn::parse2::<ItemFn>(item.clone()).and_then(|func| {
        let plan = plan(syn::parse2(args), &func)?;
        let fn_name = func.sig.ident.unraw().to_string();
        let krate = plan.args.krate.as_ref().map(|k| k.value.to_token_stream());
        let krate = krate.unwrap_or_else(|| quote!(::tiered_cache));
        let p = quote!(#krate::__private);
        let gen = Gen {
            plan: &plan,
            p,
            fn_name,
        };
        let function = gen.function();
        let companion = plan.companion.as_ref().map(|c| gen.companion(c));
        Ok(quote!(#function #companion))
    });
    result.unwrap_or_else(|e| {
        let mut tokens = item;
        tokens.extend(e.into_compile_error());
        tokens
    })
}

/// A local of the generated code, out of reach of the user's names.
fn local(name: &str) -> Ident {
    Ident::new(name, Span::mixed_site())
}

struct Gen<'a> {
    plan: &'a Plan<'a>,
    /// The path of `__private` (`::tiered_cache::__private`, or under `crate = ..`).
    p: TokenStream,
    fn_name: String,
}

impl Gen<'_> {
    /// `{ let mut key = <new>::<V>(entity, version); push_part(..); key }`,
    /// where `new` is `new_key` (a `Key`, for the companion) or
    /// `new_draft` (a call's key, written on the stack, which also takes
    /// the site's `static` head).
    fn key_block(&self, new: &str) -> TokenStream {
        let (p, plan, fn_name) = (&self.p, self.plan, &self.fn_name);
        let value = &plan.output.value;
        let key = local("__tiered_cache_key");
        let entity = match &plan.args.name {
            Some(name) => name.value.to_token_stream(),
            None => quote!(::core::concat!(::core::module_path!(), "::", #fn_name)),
        };
        let version = plan
            .args
            .version
            .as_ref()
            .map(|v| v.value.to_token_stream());
        let version = version.unwrap_or_else(|| quote!(1u32));
        let self_type = (plan.is_method && plan.args.name.is_none())
            .then(|| quote!(#p::push_part(&mut #key, #p::type_name::<Self>());));
        let pushes = plan.parts.iter().map(|(expr, span)| {
            quote_spanned!(*span=> #p::push_part(&mut #key, #p::Part::new(&(#expr)).key_part());)
        });
        let rp = respan(p.clone(), value.span());
        let new_ident = Ident::new(new, Span::call_site());
        let new_key = quote_spanned!(value.span()=> #rp::#new_ident::<#value>);
        // A call's draft copies the site's `{entity:vN}` from a `static`.
        let (head, head_arg) = if new == "new_draft" {
            let statik = local("__TIERED_CACHE_HEAD");
            (
                quote!(static #statik: #p::KeyHead = #p::KeyHead::new();),
                quote!(&#statik,),
            )
        } else {
            (TokenStream::new(), TokenStream::new())
        };
        quote!({
            #head
            let mut #key = #new_key(#head_arg #entity, #version);
            #self_type
            #(#pushes)*
            #key
        })
    }

    /// An expression of type `EntryOptions`, and whether it is the same on
    /// every call (then it lives in a `static` and a hit allocates nothing
    /// for it).
    fn options(&self) -> (TokenStream, bool) {
        let (p, a) = (&self.p, &self.plan.args);
        // An expression argument, its type checked at its own span.
        let typed = |e: &Expr, ty: TokenStream, var: &str| {
            let var = Ident::new(var, e.span());
            quote_spanned!(e.span()=> { let #var: #ty = #e; #var })
        };
        // (method, value, whether the value is constant)
        let mut steps = Vec::new();
        let durations = [
            ("ttl", &a.ttl),
            ("stale", &a.stale),
            ("negative_ttl", &a.negative_ttl),
            ("soft_timeout", &a.timeout),
            ("fleet_lock", &a.fleet_lock),
        ];
        for (method, d) in durations {
            steps.extend(d.as_ref().map(|d| match &d.value {
                Value::Literal(d) => {
                    let (secs, nanos) = (d.as_secs(), d.subsec_nanos());
                    (method, quote!(#p::Duration::new(#secs, #nanos)), true)
                }
                Value::Expr(e) => (method, typed(e, quote!(#p::Duration), "d"), false),
            }));
        }
        steps.extend(a.early_refresh.as_ref().map(|e| match &e.value {
            Value::Literal(beta) => (
                "early_refresh",
                Literal::f64_suffixed(*beta).into_token_stream(),
                true,
            ),
            Value::Expr(b) => ("early_refresh", typed(b, quote!(f64), "beta"), false),
        }));
        for tag in a.tags.iter().flat_map(|t| &t.value) {
            steps.push(match tag {
                Value::Literal(t) => match t.constant() {
                    Some(c) => ("tag", c.into_token_stream(), true),
                    None => ("tag", self.render(t), false),
                },
                Value::Expr(e) => ("tag", e.to_token_stream(), false),
            });
        }
        let constant = steps.iter().all(|(_, _, constant)| *constant);
        let o = local("__tiered_cache_options");
        let steps = steps.into_iter().map(|(method, value, _)| {
            let method = Ident::new(method, Span::call_site());
            quote!(let #o = #p::EntryOptions::#method(#o, #value);)
        });
        let options = quote!({
            let #o = #p::entry_options();
            #(#steps)*
            #o
        });
        (options, constant)
    }

    /// A `String` rendered from a tag template.
    fn render(&self, t: &Template) -> TokenStream {
        let p = &self.p;
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
    fn function(&self) -> TokenStream {
        let (p, plan, fn_name) = (&self.p, self.plan, &self.fn_name);
        let func = plan.func;
        let (inner, outer): (Vec<_>, Vec<_>) = func
            .attrs
            .iter()
            .partition(|a| matches!(a.style, AttrStyle::Inner(_)));
        let (vis, sig, stmts) = (&func.vis, &func.sig, &func.block.stmts);
        let out = &plan.output;
        let ret = &out.ret;
        let ret_span = ret.span();

        let key = local("__tiered_cache_key");
        let opts = local("__tiered_cache_options");
        let cache = local("__tiered_cache");
        let holder = local("__tiered_cache_holder");
        let body = local("__tiered_cache_body");
        let found = local("__tiered_cache_found");

        let key_block = self.key_block("new_draft");
        let options = match self.options() {
            (options, true) => {
                let statik = local("__TIERED_CACHE_OPTIONS");
                quote! {
                    static #statik: #p::OnceLock<#p::EntryOptions> = #p::OnceLock::new();
                    let #opts: &#p::EntryOptions = #statik.get_or_init(|| #options);
                }
            }
            (options, false) => quote! {
                let #opts: &#p::EntryOptions = &#options;
            },
        };

        let cache_init = match plan.args.cache.as_ref().map(|c| &c.value) {
            // The scoped or installed cache (a `Cow`: a handle of our own
            // only for a scoped one).
            None => quote! {
                let #holder =
                    #p::default_cache_for(::core::concat!(::core::module_path!(), "::", #fn_name));
                let #cache: #p::Option<&#p::TieredCache> = #p::Option::as_deref(&#holder);
            },
            // The body takes ownership of what the cache expression borrows
            // from: hold a handle of our own (an Arc clone).
            Some(c) if plan.cache_owned => quote_spanned! {c.span()=>
                let #holder: #p::TieredCache = #p::cache_owned(&(#c));
                let #cache: #p::Option<&#p::TieredCache> = #p::Option::Some(&#holder);
            },
            Some(c) => quote_spanned! {c.span()=>
                let #holder = &(#c);
                let #cache: #p::Option<&#p::TieredCache> =
                    #p::Option::Some(#p::cache_ref(#holder));
            },
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

        // Bound errors (`Serialize`, `Clone`, `Send`) point at the return
        // type: every token of the call is located there, all in one
        // hygiene context (mixing contexts would make rustc fall back to
        // the attribute's span for the whole expression).
        let at = Span::mixed_site().located_at(ret_span);
        let rp = respan(p.clone(), at);
        // Whether waiters can share a failed load's error: a probe that
        // needs the concrete error type, so it is made here.
        let share = match out.mode {
            Mode::Result | Mode::ResultOption => quote_spanned!(at=>
                #rp::ErrorShare::<<#ret as #rp::ResultParts>::Err>::new().share()
            ),
            Mode::Plain | Mode::Option => quote_spanned!(at=> #rp::Option::None),
        };
        let [found_r, key_r, opts_r, body_r] = [&found, &key, &opts, &body].map(|i| {
            let mut i = i.clone();
            i.set_span(at);
            i
        });
        let call = quote_spanned! {at=>
            #rp::cached(#found_r, #key_r, #opts_r, #share, #body_r).await
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
        let user_block = group(quote!(#fake_return #(#stmts)*), ret_span);
        let header = quote_spanned!(ret_span=> let #body = move || async move);
        let block = group(
            quote! {
                #(#inner)*
                let #key = #key_block;
                #options
                #cache_init
                #header #user_block;
                #dispatch
            },
            ret_span,
        );
        quote! {
            #(#outer)*
            #vis #sig #block
        }
    }

    /// `fn <name>(key params) -> Key<V>`: the key `#[cached]` uses, for
    /// invalidation and inspection.
    fn companion(&self, c: &Companion<'_>) -> TokenStream {
        let (p, name, fn_name) = (&self.p, &c.name, &self.fn_name);
        let vis = &self.plan.func.vis;
        let value = &self.plan.output.value;
        let receiver = c.uses_self.then(|| quote!(&self,));
        let inputs = c.params.iter().map(|(ident, ty)| quote!(#ident: #ty));
        let generics = self.companion_generics(c);
        let (impl_generics, _, where_clause) = generics.split_for_impl();
        let key_block = self.key_block("new_key");
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
    fn companion_generics(&self, c: &Companion<'_>) -> Generics {
        let mut used = mentions(&self.plan.output.value);
        for (_, ty) in &c.params {
            used.extend(mentions(ty));
        }
        let name = |g: &GenericParam| match g {
            GenericParam::Type(t) => t.ident.to_string(),
            GenericParam::Lifetime(l) => l.lifetime.ident.to_string(),
            GenericParam::Const(c) => c.ident.to_string(),
        };
        let mut generics = self.plan.func.sig.generics.clone();
        let dropped: BTreeSet<String> = generics
            .params
            .iter()
            .map(name)
            .filter(|n| !used.contains(n))
            .collect();
        generics.params = std::mem::take(&mut generics.params)
            .into_iter()
            .filter(|g| !dropped.contains(&name(g)))
            .collect();
        if let Some(w) = &mut generics.where_clause {
            w.predicates = std::mem::take(&mut w.predicates)
                .into_iter()
                .filter(|pred| mentions(pred).is_disjoint(&dropped))
                .collect();
        }
        generics
    }
}

/// A brace-delimited group with `span`.
fn group(stream: TokenStream, span: Span) -> Group {
    let mut group = Group::new(Delimiter::Brace, stream);
    group.set_span(span);
    group
}

/// The same tokens, all with `span` (for paths we generate, so that errors
/// about them point at the user's code).
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    let respan = |mut tt: TokenTree| {
        if let TokenTree::Group(g) = &tt {
            tt = TokenTree::Group(Group::new(g.delimiter(), respan(g.stream(), span)));
        }
        tt.set_span(span);
        tt
    };
    tokens.into_iter().map(respan).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &str, item: &str) -> String {
        let out = cached(syn::parse_str(args).unwrap(), syn::parse_str(item).unwrap());
        let out = out.to_string();
        assert!(!out.contains("compile_error"), "{out}");
        out
    }

    #[test]
    fn expands_a_plain_function() {
        let out = run(
            r#"key = "product:{id}:{cat}", ttl = "30m", tags = ["products", "category:{cat}"], version = 3"#,
            "async fn get_product(id: u64, cat: u32) -> Result<Product, DbError> { db().await }",
        );
        let file: syn::File = syn::parse_str(&out).expect("output parses");
        assert_eq!(file.items.len(), 2, "function + key builder");
        assert!(!out.contains(" use "), "no `use` in generated code");
        assert!(out.contains("fn get_product_key (id : u64 , cat : u32) -> :: tiered_cache :: __private :: Key < Product >"), "{out}");
        assert!(out.contains("__private :: cached (") && out.contains("ErrorShare"));
        assert!(out.contains("Duration :: new (1800u64 , 0u32)"));
        // tags with a placeholder are rendered per call: no static options
        assert!(!out.contains("OnceLock"));
    }

    #[test]
    fn constant_options_live_in_a_static() {
        let out = run(
            r#"ttl = "1s", tags = ["all"], early_refresh = 1"#,
            "async fn f(id: u64) -> Option<Arc<T>> { None }",
        );
        assert!(out.contains("OnceLock") && out.contains("1f64"), "{out}");
        assert!(out.contains("__private :: cached (") && !out.contains("ErrorShare"));
    }

    #[test]
    fn key_parts_and_self_type() {
        let out = run(
            "skip = [db]",
            "async fn get(db: &Db, id: u64) -> Product { load(id).await }",
        );
        assert!(!out.contains("Part :: new (& (db))") && out.contains("Part :: new (& (id))"));
        let out = run(
            r#"key = "{self.tenant}:{id}", cache = self.cache"#,
            "async fn get(&self, id: u64) -> P { load(id).await }",
        );
        assert!(out.contains("type_name :: < Self >") && out.contains("cache_ref"));
        assert!(out.contains("fn get_key (& self , id : u64)"), "{out}");
        let out = run(
            r#"name = "product", cache = self.cache"#,
            "async fn get(self: Arc<Self>, id: u64) -> P { load(id).await }",
        );
        assert!(
            !out.contains("type_name") && out.contains("cache_owned"),
            "{out}"
        );
    }

    #[test]
    fn companion_keeps_only_generics_it_mentions() {
        let item = "async fn get<'a, D: Db, K: Display>(db: &'a D, id: K) -> P where D: Send, K: Sync { load(id).await }";
        let out = run("skip = [db]", item);
        assert!(out.contains("fn get_key < K : Display > (id : K) -> :: tiered_cache :: __private :: Key < P > where K : Sync"), "{out}");
        assert!(!run("key_fn = false", "async fn get(id: u64) -> P {}").contains("get_key"));
        assert!(run("key_fn = product_key", "async fn get(id: u64) -> P {}")
            .contains("fn product_key (id : u64)"));
    }

    #[test]
    fn crate_path_is_used_everywhere() {
        let out = run("crate = ::renamed", "async fn get(id: u64) -> P {}");
        assert!(
            !out.contains("tiered_cache ::") && out.contains(":: renamed :: __private ::"),
            "{out}"
        );
    }

    #[test]
    fn original_function_is_emitted_with_errors() {
        let out = cached(
            quote!(ttl = "x"),
            quote!(
                fn get(id: u64) -> P {
                    load(id)
                }
            ),
        )
        .to_string();
        assert!(out.starts_with("fn get (id : u64) -> P"), "{out}");
        assert!(out.contains("compile_error"));
    }
}

//! A product web service: an axum server over a SQLite database (1,000
//! products seeded on first run), through a write-through `Product` entity.
//!
//! - `GET /products/{id}`: through the cache (the store is the loader);
//! - `PUT /products/{id}` (JSON body): the store, then the cache;
//! - `GET /stats`: the cache's counters as JSON;
//! - `GET /metrics`: the same in Prometheus's text format (the `metrics`
//!   feature with `metrics-exporter-prometheus`), labelled by namespace;
//! - `GET /ready`: 503 until the start-up warm-up has loaded every product,
//!   then 200 (gate a load balancer on it).
//!
//! Listens on `127.0.0.1:$PORT` (default: a free port) and prints
//! `listening on http://ADDR`. SIGTERM or Ctrl-C stops it cleanly. Uses
//! `REDIS_URL` when set, otherwise a throwaway `redis-server`; the database
//! is the first argument (default: `web-service.db` in the temp directory).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use tiered_cache::write::{Entity, EntityCache, WritePolicy};
use tiered_cache::{EntryOptions, TieredCache};
use tiered_cache_examples::sqlite::{Db, Table};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    name: String,
    price_cents: u64,
}

impl Entity for Product {
    const NAME: &'static str = "product";
    const VERSION: u32 = 1;
    type Id = u64;
    fn options() -> EntryOptions {
        EntryOptions::new(Duration::from_secs(30 * 60)).stale(Duration::from_secs(600))
    }
    fn policy() -> WritePolicy {
        WritePolicy::WriteThrough
    }
}

const PRODUCTS: u64 = 1_000;

#[derive(Clone)]
struct App {
    prometheus: PrometheusHandle,
    cache: TieredCache,
    products: EntityCache<Product, Table<Product>>,
    warmed: Arc<AtomicU64>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("web-service.db"));
    // The recorder first: a cache exports to the recorder present when it is built.
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    let upkeep = prometheus.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let (url, _server) = tiered_cache_examples::redis_url();
    let mut builder = TieredCache::builder().namespace("web-service");
    if let Some(url) = url {
        builder = builder.redis(url);
    }
    let cache = builder.build().await?;
    let table = Db::open(&path)?.table::<Product>()?;
    seed(&table).await?;
    let products = cache.entity(table)?;

    let app = App {
        prometheus,
        cache,
        products: products.clone(),
        warmed: Arc::default(),
    };
    tokio::spawn(warm(app.clone()));

    let router = Router::new()
        .route("/products/{id}", get(get_product).put(put_product))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/ready", get(ready))
        .with_state(app);
    let port = std::env::var("PORT").unwrap_or_else(|_| "0".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router)
        .with_graceful_shutdown(stopped())
        .await?;
    products.shutdown().await;
    println!("stopped");
    Ok(())
}

/// Writes the catalogue on first run.
async fn seed(table: &Table<Product>) -> Result<(), Box<dyn std::error::Error>> {
    use tiered_cache::write::Store;
    if !table.all().await?.is_empty() {
        return Ok(());
    }
    let rows: Vec<(u64, Arc<Product>, u64)> = (0..PRODUCTS)
        .map(|id| {
            let name = format!("product {id}");
            (
                id,
                Arc::new(Product {
                    name,
                    price_cents: 100 + id,
                }),
                1,
            )
        })
        .collect();
    table.save_many(&rows).await?;
    Ok(())
}

/// Loads the whole catalogue into the cache, 16 queries at a time.
async fn warm(app: App) {
    let warmed = Arc::clone(&app.warmed);
    let report = app
        .products
        .warm(0..PRODUCTS)
        .concurrency(16)
        .on_progress(move |p| warmed.store(p.done, Relaxed))
        .run()
        .await;
    println!(
        "warm-up: {} loaded, {} already cached, {} failed",
        report.loaded, report.already_cached, report.failed
    );
}

async fn stopped() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn get_product(State(app): State<App>, Path(id): Path<u64>) -> Response {
    match app.products.get(&id).await {
        Ok(Some(product)) => Json(&*product).into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn put_product(
    State(app): State<App>,
    Path(id): Path<u64>,
    Json(product): Json<Product>,
) -> Response {
    match app.products.put(&id, product).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn ready(State(app): State<App>) -> Response {
    let done = app.warmed.load(Relaxed);
    let body = Json(serde_json::json!({ "warmed": done, "total": PRODUCTS }));
    if done >= PRODUCTS {
        (StatusCode::OK, body).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(State(app): State<App>) -> String {
    app.prometheus.render()
}

async fn stats(State(app): State<App>) -> Json<serde_json::Value> {
    let s = app.cache.stats();
    Json(serde_json::json!({
        "l1_hits": s.l1_hits,
        "l2_hits": s.l2_hits,
        "misses": s.misses,
        "loads": s.loads,
        "load_errors": s.load_errors,
        "coalesced_waits": s.coalesced_waits,
        "stale_served": s.stale_served,
        "l2_errors": s.l2_errors,
        "store_writes": s.store_writes,
        "write_fallbacks": s.write_fallbacks,
        "invalidations_received": s.invalidations_received,
        "backplane_gaps": s.backplane_gaps,
    }))
}

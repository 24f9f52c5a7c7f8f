//! `?` with error conversion, early `return`, an error alias with one
//! argument, and an error type that is not `Clone`.
use serde::{Deserialize, Serialize};
use tiered_cache::cached;

#[derive(Clone, Serialize, Deserialize)]
struct Product {
    id: u64,
}

#[derive(Debug)]
enum AppError {
    Parse(std::num::ParseIntError),
    NotFound,
}

impl From<std::num::ParseIntError> for AppError {
    fn from(e: std::num::ParseIntError) -> Self {
        AppError::Parse(e)
    }
}

type AppResult<T> = Result<T, AppError>;

#[cached(key = "{raw}")]
async fn parse(raw: String) -> Result<Product, AppError> {
    let id: u64 = raw.parse()?;
    if id == 0 {
        return Err(AppError::NotFound);
    }
    Ok(Product { id })
}

#[cached(key = "{raw}", negative_ttl = "10s")]
async fn find(raw: String) -> AppResult<Option<Product>> {
    let id: u64 = raw.trim().parse()?;
    if id > 100 {
        return Ok(None);
    }
    Ok(Some(Product { id }))
}

#[cached(key = "{n}")]
async fn early(n: u32) -> u32 {
    if n == 0 {
        return 1;
    }
    n * 2
}

fn main() {
    let _ = (
        parse_key(String::new()),
        find_key(String::new()),
        early_key(1),
    );
}

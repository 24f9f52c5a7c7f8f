use tiered_cache::cached;

#[cached(negative_ttl = "10s")]
async fn not_optional(id: u64) -> Result<u64, String> {
    Ok(id)
}

#[cached(timeout = "100ms")]
async fn no_stale(id: u64) -> u64 {
    id
}

#[cached]
async fn generic_value<T: Default + serde::Serialize + serde::de::DeserializeOwned>(
    id: u64,
) -> Vec<T> {
    let _ = id;
    Vec::new()
}

fn main() {}

use tiered_cache::cached;

#[derive(Clone, serde::Deserialize)]
struct Product {
    id: u64,
}

#[cached(ttl = "30m")]
async fn get_product(id: u64) -> Product {
    Product { id }
}

fn main() {}

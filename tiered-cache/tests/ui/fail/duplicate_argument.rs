use tiered_cache::cached;

#[cached(ttl = "30m", version = 2, ttl = "1h")]
async fn get_product(id: u64) -> String {
    id.to_string()
}

fn main() {}

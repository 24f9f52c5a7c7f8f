use tiered_cache::cached;

#[cached(ttl = "30 mins please")]
async fn get_product(id: u64) -> String {
    id.to_string()
}

fn main() {}

use tiered_cache::cached;

#[cached(tll = "30m")]
async fn get_product(id: u64) -> String {
    id.to_string()
}

fn main() {}

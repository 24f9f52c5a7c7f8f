use tiered_cache::cached;

#[cached(key = "product:{idd}")]
async fn get_product(id: u64) -> String {
    id.to_string()
}

fn main() {}

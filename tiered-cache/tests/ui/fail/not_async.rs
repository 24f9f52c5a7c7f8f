use tiered_cache::cached;

#[cached(ttl = "30m")]
fn get_product(id: u64) -> String {
    id.to_string()
}

#[cached(ttl = "30m")]
const fn constant(id: u64) -> u64 {
    id
}

fn main() {}

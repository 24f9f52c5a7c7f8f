use tiered_cache::cached;

#[cached(key = "orders:{tenant}")]
async fn orders(tenant: u32, user: u64) -> Vec<u64> {
    vec![u64::from(tenant), user]
}

fn main() {}

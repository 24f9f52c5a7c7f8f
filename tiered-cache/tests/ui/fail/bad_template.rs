use tiered_cache::cached;

#[cached(key = "product:{id:?}", tags = ["{}", "{self.tenant}"])]
async fn get_product(id: u64) -> u64 {
    id
}

fn main() {}

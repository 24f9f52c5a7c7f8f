use tiered_cache::cached;

struct Db;

#[cached(key = "{db}:{id}")]
async fn get(db: &Db, id: u64) -> u64 {
    let _ = db;
    id
}

fn main() {}

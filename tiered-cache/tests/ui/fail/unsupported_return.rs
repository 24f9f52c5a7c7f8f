use tiered_cache::cached;

#[cached]
async fn names(id: u64) -> impl Iterator<Item = u64> {
    std::iter::once(id)
}

#[cached]
async fn nothing(id: u64) {
    let _ = id;
}

#[cached]
async fn borrowed(id: u64) -> &'static str {
    if id == 0 {
        "zero"
    } else {
        "other"
    }
}

fn main() {}

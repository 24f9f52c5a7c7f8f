use tiered_cache::{cached, TieredCache};

struct Counter {
    cache: TieredCache,
    calls: u64,
}

impl Counter {
    #[cached(cache = self.cache)]
    async fn next(&mut self, id: u64) -> u64 {
        self.calls += 1;
        id + self.calls
    }
}

fn main() {}

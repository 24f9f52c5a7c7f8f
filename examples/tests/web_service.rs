//! The web service example as a user meets it: started as a process on a
//! free port against a test Redis, asked over real HTTP (ready after its
//! warm-up; GET twice, the second a hit; PUT; GET returns the new value),
//! then stopped with SIGTERM, which it obeys cleanly.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tiered_cache::testkit::RedisServer;

/// One HTTP/1.1 request; the status and the body.
fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the service");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("a reply");
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn the_web_service_serves_reads_and_writes_through_the_cache() {
    let redis = RedisServer::start().expect("redis");
    let db = std::env::temp_dir().join(format!("tiered-cache-web-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&db);
    let mut child = Command::new(env!("CARGO_BIN_EXE_web_service"))
        .arg(&db)
        .env("REDIS_URL", redis.url())
        .env_remove("PORT")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start web_service");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the service printed its address")
            .unwrap();
        if let Some(addr) = line.strip_prefix("listening on http://") {
            break addr.to_owned();
        }
    };

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = http(&addr, "GET", "/ready", None);
        if status == 200 {
            assert_eq!(json(&body)["warmed"], 1_000);
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "not ready after 30 s: {body}");
        std::thread::sleep(Duration::from_millis(20));
    }

    let hits = |body: &str| json(body)["l1_hits"].as_u64().unwrap();
    let (_, before) = http(&addr, "GET", "/stats", None);
    let (status, first) = http(&addr, "GET", "/products/7", None);
    assert_eq!(status, 200);
    assert_eq!(json(&first)["name"], "product 7");
    let (_, middle) = http(&addr, "GET", "/products/7", None);
    assert_eq!(middle, first);
    let (_, after) = http(&addr, "GET", "/stats", None);
    assert_eq!(
        hits(&after),
        hits(&before) + 2,
        "warmed: both GETs are L1 hits"
    );

    let (status, _) = http(
        &addr,
        "PUT",
        "/products/7",
        Some(r#"{"name":"lamp","price_cents":999}"#),
    );
    assert_eq!(status, 204);
    let (status, body) = http(&addr, "GET", "/products/7", None);
    assert_eq!(
        (status, json(&body)["price_cents"].as_u64()),
        (200, Some(999))
    );
    let (_, stats) = http(&addr, "GET", "/stats", None);
    assert_eq!(json(&stats)["store_writes"], 1);
    assert_eq!(http(&addr, "GET", "/products/5000", None).0, 404);

    // The same counters in Prometheus's format, labelled by namespace.
    let (status, text) = http(&addr, "GET", "/metrics", None);
    assert_eq!(status, 200);
    let metric = |name: &str| -> u64 {
        let prefix = format!("{name}{{namespace=\"web-service\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    };
    let (_, stats) = http(&addr, "GET", "/stats", None);
    assert_eq!(metric("tiered_cache_l1_hits_total"), hits(&stats));
    assert_eq!(
        metric("tiered_cache_loads_total"),
        json(&stats)["loads"].as_u64().unwrap()
    );
    assert!(
        metric("tiered_cache_loads_total") >= 1_000,
        "the warm-up's loads"
    );
    assert_eq!(metric("tiered_cache_store_writes_total"), 1);

    let pid = child.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(sent.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "exited with {status}");
    assert!(rest.iter().any(|l| l == "stopped"), "{rest:?}");
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
}

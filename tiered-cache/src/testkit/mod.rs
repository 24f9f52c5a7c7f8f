//! Throwaway `redis-server` processes for tests (feature `testkit`).
//!
//! Each [`RedisServer`] runs on a free loopback port, keeps nothing on disk,
//! and is killed when dropped. Tests can kill, restart (same port), pause and
//! resume it to exercise failures against a real server.
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use tiered_cache::{testkit::RedisServer, TieredCache};
//! let server = RedisServer::start().expect("redis-server");
//! let cache = TieredCache::builder().redis(server.url()).build().await.unwrap();
//! # let _ = cache;
//! # }
//! ```

use std::io;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

mod cluster;

pub use cluster::RedisCluster;

/// A `redis-server` child process on a free loopback port.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    tls: bool,
    /// A Redis Cluster node: its cluster config lives in `dir`, so a
    /// restarted node rejoins its cluster.
    cluster: bool,
}

impl RedisServer {
    /// Starts a server with no persistence on a free port.
    ///
    /// # Errors
    /// When `redis-server` is not installed (the message says how to install
    /// it) or does not answer within 10 seconds.
    pub fn start() -> io::Result<Self> {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments
    /// (for example `["--maxmemory", "1mb"]`).
    ///
    /// # Errors
    /// As for [`start`](Self::start).
    pub fn start_with(args: &[&str]) -> io::Result<Self> {
        Self::launch(args, false)
    }

    /// Starts a server that accepts only TLS, with a fresh self-signed
    /// certificate (made with the `openssl` command). Its
    /// [`url`](Self::url) is `rediss://…/#insecure`: the client skips
    /// certificate checks, which only a test should do.
    ///
    /// # Errors
    /// As for [`start`](Self::start), or when `openssl` is missing.
    pub fn start_tls() -> io::Result<Self> {
        Self::launch(&[], true)
    }

    /// Starts a Redis Cluster node (not yet part of a cluster) on a free
    /// port whose cluster bus port (port + 10000) is free too.
    fn start_cluster_node() -> io::Result<Self> {
        let mut last_error = None;
        for _ in 0..5 {
            match Self::launch_node(&[], false, true) {
                Ok(server) => return Ok(server),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("redis-server did not start")))
    }

    fn launch(args: &[&str], tls: bool) -> io::Result<Self> {
        Self::launch_node(args, tls, false)
    }

    fn launch_node(args: &[&str], tls: bool, cluster: bool) -> io::Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tiered-cache-redis-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        if tls {
            self_signed_certificate(&dir)?;
        }
        let mut last_error = None;
        for _ in 0..5 {
            let port = if cluster {
                free_cluster_port()?
            } else {
                free_port()?
            };
            let mut server = RedisServer {
                child: None,
                port,
                dir: dir.clone(),
                args: args.iter().map(|a| (*a).to_owned()).collect(),
                tls,
                cluster,
            };
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
                Err(e) => last_error = Some(e), // port taken in the meantime: retry
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("redis-server did not start")))
    }

    fn spawn(&mut self) -> io::Result<()> {
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        let port = self.port.to_string();
        let ports: [&str; 4] = if self.tls {
            ["--port", "0", "--tls-port", &port]
        } else {
            ["--port", &port, "--tls-port", "0"]
        };
        let mut command = Command::new(&binary);
        command.args(ports).args(["--bind", "127.0.0.1"]);
        if self.cluster {
            command
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(self.dir.join("nodes.conf"))
                .args(["--cluster-node-timeout", "2000", "--pidfile"])
                .arg(self.dir.join("redis.pid"));
        }
        if self.tls {
            let file = |name: &str| self.dir.join(name).display().to_string();
            command
                .args([
                    "--tls-cert-file",
                    &file("cert.pem"),
                    "--tls-key-file",
                    &file("key.pem"),
                ])
                .args([
                    "--tls-ca-cert-file",
                    &file("cert.pem"),
                    "--tls-auth-clients",
                    "no",
                ]);
        }
        let child = command
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            // Its own words when it refuses to start (see `wait_until_ready`).
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "`{binary}` was not found: install Redis (Debian/Ubuntu: `apt-get install redis-server`, \
                             macOS: `brew install redis`) or point REDIS_SERVER at the binary"
                        ),
                    )
                } else {
                    e
                }
            })?;
        self.child = Some(child);
        self.wait_until_ready()
    }

    /// The last line redis-server logged (why it stopped, when it did).
    fn last_log_line(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log"))
            .ok()
            .and_then(|log| log.lines().last().map(str::to_owned))
            .unwrap_or_else(|| "(it logged nothing)".to_owned())
    }

    fn wait_until_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    return Err(io::Error::other(format!(
                        "redis-server exited at start: {status}: {}",
                        self.last_log_line()
                    )));
                }
            }
            if self.tls && listening(self.port) || ping(self.port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "redis-server did not answer PING within 10 s",
        ))
    }

    /// `redis://127.0.0.1:{port}`, or `rediss://127.0.0.1:{port}/#insecure`
    /// for a server from [`start_tls`](Self::start_tls).
    pub fn url(&self) -> String {
        if self.tls {
            format!("rediss://127.0.0.1:{}/#insecure", self.port)
        } else {
            format!("redis://127.0.0.1:{}", self.port)
        }
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A blocking connection for test setup and assertions.
    ///
    /// # Errors
    /// When the server is not reachable.
    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(5))
    }

    /// Kills the server at once (SIGKILL), like a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            // A stale pid file would point a cluster's watchdog at whatever
            // process gets the pid next.
            let _ = std::fs::remove_file(self.dir.join("redis.pid"));
        }
    }

    /// Starts the server again on the same port, empty.
    ///
    /// # Errors
    /// When it does not come back.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The server's process id, while it runs (to signal it from code that
    /// cannot hold the `RedisServer`, such as a loader).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    ///
    /// # Errors
    /// When the signal could not be sent.
    pub fn pause(&self) -> io::Result<()> {
        self.signal("-STOP")
    }

    /// Thaws a paused server (SIGCONT).
    ///
    /// # Errors
    /// When the signal could not be sent.
    pub fn resume(&self) -> io::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> io::Result<()> {
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| io::Error::other("the server is not running"))?;
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!("kill {signal} {pid} failed")))
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.resume();
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A free port P whose cluster bus port P + 10000 is free too (so P is at
/// most 55535).
fn free_cluster_port() -> io::Result<u16> {
    for _ in 0..1000 {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let Some(bus) = port.checked_add(10000) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return Ok(port);
        }
    }
    // Ephemeral ports are high on this system: try the low range.
    for port in (20000..55000u16).step_by(7) {
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok()
        {
            return Ok(port);
        }
    }
    Err(io::Error::other(
        "no free port pair (P, P + 10000) for a cluster node",
    ))
}

fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

fn self_signed_certificate(dir: &std::path::Path) -> io::Result<()> {
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=127.0.0.1"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("`openssl` is needed for a TLS test server: {e}"),
            )
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(
            "openssl could not make a test certificate",
        ))
    }
}

fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

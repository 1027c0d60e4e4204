//! The server: a thread per connection over one store and one log.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Once};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use crate::native::NativeCache;
use crate::resp::{self, Parsed};
use crate::wal::{self, Wal, OP_DEL, OP_SET};

/// The reply to a write refused under memory pressure: Redis's own, so
/// clients that handle maxmemory handle this.
pub const OOM_REPLY: &str = "OOM command not allowed when used memory > 'maxmemory'.";

/// How long a connection waits on a read before it looks at the stop flag.
const POLL: Duration = Duration::from_millis(50);

/// Replies are sent once this much is pending, so a pipeline of large GETs
/// holds at most this much (plus one reply) per connection.
const OUT_FLUSH: usize = 1 << 20;

/// How long a reply may wait for a client that does not read before the
/// connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The reply to a client whose unfinished command passed `resp::MAX_QUERY`.
const QUERY_TOO_BIG: &str = "ERR Protocol error: query buffer too big";

/// The shared state of one server.
pub struct Server {
    store: RwLock<HashMap<Vec<u8>, Vec<u8>>>,
    wal: Arc<Wal>,
    stopping: AtomicBool,
    in_flight: AtomicUsize,
    connections: AtomicUsize,
    shutdown: Once,
    /// Writes acknowledged.
    pub writes: AtomicU64,
    /// Writes refused while memwatch reported pressure.
    pub shed_writes: AtomicU64,
    started: Instant,
    /// The copy of every value outside the heap, for `demo-native`.
    native: Option<NativeCache>,
}

impl Server {
    /// Replays the log at `path`, reports what it found, and opens it.
    pub fn open(path: &std::path::Path) -> io::Result<(Arc<Server>, wal::Replay)> {
        let replay = wal::replay(path)?;
        let mut store = HashMap::new();
        for op in &replay.ops {
            match op.kind {
                OP_SET => {
                    store.insert(op.key.clone(), op.value.clone());
                }
                _ => {
                    store.remove(&op.key);
                }
            }
        }
        let server = Arc::new(Server {
            store: RwLock::new(store),
            wal: Wal::open(path)?,
            stopping: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            shutdown: Once::new(),
            writes: AtomicU64::new(0),
            shed_writes: AtomicU64::new(0),
            started: Instant::now(),
            native: NativeCache::from_env(),
        });
        Ok((server, replay))
    }

    /// Accepts connections until shutdown begins.
    pub fn serve(self: &Arc<Self>, listener: TcpListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        while !self.stopping.load(SeqCst) {
            match listener.accept() {
                Ok((stream, _)) => {
                    let server = self.clone();
                    server.connections.fetch_add(1, SeqCst);
                    thread::Builder::new().name("conn".into()).spawn(move || {
                        let _ = server.connection(stream);
                        server.connections.fetch_sub(1, SeqCst);
                    })?;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(5))
                }
                Err(e) => log::warn!("accept: {e}"),
            }
        }
        // The listener closes here: no new connections.
        Ok(())
    }

    /// The orderly shutdown: stop intake, let in-flight commands finish,
    /// fsync and close the log. Runs once; a second caller waits for it.
    pub fn shutdown(&self) {
        self.shutdown.call_once(|| {
            let began = Instant::now();
            self.stopping.store(true, SeqCst);
            log::info!("shutdown: intake stopped");
            let deadline = began + Duration::from_secs(5);
            while self.in_flight.load(SeqCst) > 0 && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(1));
            }
            log::info!(
                "shutdown: {} commands still in flight, {} connections open",
                self.in_flight.load(SeqCst),
                self.connections.load(SeqCst)
            );
            self.wal.close();
            log::info!("shutdown: log fsynced and closed in {:?}", began.elapsed());
        });
    }

    fn connection(&self, mut stream: TcpStream) -> io::Result<()> {
        stream.set_read_timeout(Some(POLL))?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let mut buf: Vec<u8> = Vec::with_capacity(16 << 10);
        let mut out = Vec::with_capacity(16 << 10);
        let mut chunk = [0u8; 16 << 10];
        loop {
            // Run every whole command in the buffer.
            let mut used = 0;
            let mut close = false;
            self.in_flight.fetch_add(1, SeqCst);
            let mut sent = Ok(());
            while !self.stopping.load(SeqCst) {
                match resp::parse(&buf[used..]) {
                    Parsed::Incomplete => break,
                    Parsed::Command(args, n) => {
                        used += n;
                        if !args.is_empty() {
                            self.execute(&args, &mut out);
                        }
                    }
                    Parsed::Error(e) => {
                        resp::error(&mut out, e);
                        close = true;
                        break;
                    }
                }
                if out.len() >= OUT_FLUSH {
                    sent = stream.write_all(&out);
                    out.clear();
                    if sent.is_err() {
                        break;
                    }
                }
            }
            self.in_flight.fetch_sub(1, SeqCst);
            sent?;
            buf.drain(..used);
            if buf.len() > resp::MAX_QUERY {
                resp::error(&mut out, QUERY_TOO_BIG);
                close = true;
            }
            if !out.is_empty() {
                stream.write_all(&out)?;
                out.clear();
            }
            if close || self.stopping.load(SeqCst) {
                return Ok(());
            }
            match stream.read(&mut chunk) {
                Ok(0) => return Ok(()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn execute(&self, args: &[Vec<u8>], out: &mut Vec<u8>) {
        let name = args[0].to_ascii_uppercase();
        match (name.as_slice(), args.len()) {
            (b"PING", 1) => resp::simple(out, "PONG"),
            (b"PING", 2) => resp::bulk(out, Some(&args[1])),
            (b"SET", 3) if memwatch::pressure() => {
                // Above the soft level: refuse writes as Redis does over
                // maxmemory. Reads and deletes (which free memory) go on.
                self.shed_writes.fetch_add(1, SeqCst);
                resp::error(out, OOM_REPLY);
            }
            (b"SET", 3) => {
                let queued = {
                    let mut store = self.store.write();
                    let seq = self.wal.queue(OP_SET, &args[1], &args[2]);
                    if seq.is_ok() {
                        store.insert(args[1].clone(), args[2].clone());
                        if let Some(native) = &self.native {
                            native.keep(&args[2]);
                        }
                    }
                    seq
                };
                match queued.and_then(|seq| self.wal.wait(seq)) {
                    Ok(()) => {
                        self.writes.fetch_add(1, SeqCst);
                        resp::simple(out, "OK")
                    }
                    Err(e) => resp::error(out, &format!("ERR write not durable: {e}")),
                }
            }
            (b"GET", 2) => resp::bulk(out, self.store.read().get(&args[1]).map(Vec::as_slice)),
            (b"DEL", n) if n >= 2 => {
                let mut removed = 0;
                let mut last = Ok(0);
                {
                    let mut store = self.store.write();
                    for key in &args[1..] {
                        if store.contains_key(key) {
                            last = self.wal.queue(OP_DEL, key, b"");
                            if last.is_err() {
                                break;
                            }
                            store.remove(key);
                            removed += 1;
                        }
                    }
                }
                match last.and_then(|seq| if seq > 0 { self.wal.wait(seq) } else { Ok(()) }) {
                    Ok(()) => resp::integer(out, removed),
                    Err(e) => resp::error(out, &format!("ERR delete not durable: {e}")),
                }
            }
            (b"DBSIZE", 1) => resp::integer(out, self.store.read().len() as i64),
            (b"INFO", _) => resp::bulk(out, Some(self.info().as_bytes())),
            // redis-benchmark and redis-cli ask for these at start.
            (b"CONFIG", 3) if args[1].eq_ignore_ascii_case(b"GET") => resp::array(out, &[]),
            (b"COMMAND", _) => resp::array(out, &[]),
            (b"SELECT", 2) if args[1] == b"0" => resp::simple(out, "OK"),
            (b"PING" | b"SET" | b"GET" | b"DEL" | b"DBSIZE" | b"SELECT", _) => resp::error(
                out,
                &format!(
                    "ERR wrong number of arguments for '{}' command",
                    String::from_utf8_lossy(&args[0]).to_lowercase()
                ),
            ),
            _ => resp::error(
                out,
                &format!(
                    "ERR unknown command '{}'",
                    String::from_utf8_lossy(&args[0])
                        .chars()
                        .take(64)
                        .collect::<String>()
                ),
            ),
        }
    }

    fn info(&self) -> String {
        let snap = memwatch::snapshot();
        let je = memwatch::jemalloc_stats().filter(|_| memwatch::wraps_jemalloc());
        let mut s = String::new();
        s.push_str("# Server\r\n");
        s.push_str(&format!(
            "redis_version:7.0.0-kvserver\r\nprocess_id:{}\r\n",
            std::process::id()
        ));
        s.push_str(&format!(
            "uptime_in_seconds:{}\r\n",
            self.started.elapsed().as_secs()
        ));
        s.push_str("\r\n# Memory\r\n");
        s.push_str(&format!("used_memory:{}\r\n", snap.live_bytes));
        s.push_str(&format!("used_memory_peak:{}\r\n", snap.peak_bytes));
        s.push_str(&format!(
            "memwatch_threshold_bytes:{}\r\n",
            snap.threshold_bytes.unwrap_or(0)
        ));
        s.push_str(&format!(
            "memwatch_tripped:{}\r\n",
            u8::from(snap.tripped_at_bytes.is_some())
        ));
        s.push_str(&format!(
            "memwatch_shed_bytes:{}\r\nmemwatch_shedding:{}\r\n",
            snap.shed_bytes.unwrap_or(0),
            u8::from(snap.shedding)
        ));
        if let Some(je) = je {
            s.push_str(&format!(
                "jemalloc_allocated:{}\r\njemalloc_active:{}\r\njemalloc_resident:{}\r\njemalloc_mapped:{}\r\njemalloc_retained:{}\r\n",
                je.allocated, je.active, je.resident, je.mapped, je.retained
            ));
        }
        s.push_str("\r\n# Stats\r\n");
        s.push_str(&format!(
            "acknowledged_writes:{}\r\n",
            self.writes.load(SeqCst)
        ));
        s.push_str(&format!(
            "shed_writes:{}\r\n",
            self.shed_writes.load(SeqCst)
        ));
        s.push_str(&format!(
            "connected_clients:{}\r\n",
            self.connections.load(SeqCst)
        ));
        s.push_str("\r\n# Keyspace\r\n");
        s.push_str(&format!("db0:keys={}\r\n", self.store.read().len()));
        s
    }
}

//! The demo: start the server with a threshold, write until memwatch shuts it
//! down, restart it on the same log, read back every acknowledged write, and
//! print a summary.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use crate::monotonic_ns;

const CONNECTIONS: usize = 8;
const PIPELINE: usize = 32;
/// Bounds on the load, so the demo ends even if nothing trips.
const MAX_WRITES_PER_CONNECTION: u64 = 2_000_000;
const MAX_LOAD_TIME: Duration = Duration::from_secs(120);

/// The key and value of write `seq` on connection `conn`.
pub fn key(conn: usize, seq: u64) -> String {
    format!("c{conn}:{seq:08}")
}

/// Values from 512 B to 4 KiB, contents derived from the key.
pub fn value(conn: usize, seq: u64) -> Vec<u8> {
    let len = 512 + (seq as usize * 7919 + conn * 31) % 3584;
    vec![b'a' + ((seq as usize + conn) % 26) as u8; len]
}

fn set_command(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    out.extend_from_slice(
        format!(
            "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n",
            key.len(),
            value.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Reads one reply line; `None` when the connection is gone.
fn read_line(r: &mut BufReader<TcpStream>) -> Option<String> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line),
    }
}

/// Writes on one connection until it fails; returns how many SETs were
/// acknowledged (replies come in order, so they are a prefix).
fn load(addr: &str, conn: usize, stop: &AtomicBool) -> u64 {
    let Ok(stream) = TcpStream::connect(addr) else {
        return 0;
    };
    let _ = stream.set_nodelay(true);
    let mut writer = stream.try_clone().expect("clone stream");
    let mut reader = BufReader::new(stream);
    let mut acked = 0u64;
    let mut buf = Vec::new();
    while acked < MAX_WRITES_PER_CONNECTION && !stop.load(SeqCst) {
        buf.clear();
        for i in 0..PIPELINE as u64 {
            set_command(&mut buf, &key(conn, acked + i), &value(conn, acked + i));
        }
        if writer.write_all(&buf).is_err() {
            break;
        }
        for _ in 0..PIPELINE {
            match read_line(&mut reader) {
                Some(l) if l == "+OK\r\n" => acked += 1,
                _ => return acked,
            }
        }
    }
    acked
}

/// Writes on `CONNECTIONS` connections until the server goes away or
/// `limit` passes; returns the acknowledged count of each connection.
pub fn load_all(addr: &str, limit: Duration) -> Vec<u64> {
    let stop = Arc::new(AtomicBool::new(false));
    let loaders: Vec<_> = (0..CONNECTIONS)
        .map(|conn| {
            let addr = addr.to_owned();
            let stop = stop.clone();
            thread::spawn(move || load(&addr, conn, &stop))
        })
        .collect();
    let until = Instant::now() + limit;
    while Instant::now() < until && !loaders.iter().all(|h| h.is_finished()) {
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, SeqCst);
    loaders.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Reads back every acknowledged key; returns how many came back intact.
pub fn verify(addr: &str, acked: &[u64]) -> u64 {
    let stream = TcpStream::connect(addr).expect("connect for verification");
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut recovered = 0;
    for (conn, &n) in acked.iter().enumerate() {
        let mut seq = 0;
        while seq < n {
            let batch = (n - seq).min(256);
            let mut buf = Vec::new();
            for s in seq..seq + batch {
                let k = key(conn, s);
                buf.extend_from_slice(
                    format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len()).as_bytes(),
                );
            }
            writer.write_all(&buf).unwrap();
            for s in seq..seq + batch {
                let header = read_line(&mut reader).expect("GET reply");
                if let Some(len) = header
                    .trim_end()
                    .strip_prefix('$')
                    .and_then(|l| l.parse::<usize>().ok())
                {
                    let mut body = vec![0; len + 2];
                    reader.read_exact(&mut body).unwrap();
                    if body[..len] == value(conn, s)[..] {
                        recovered += 1;
                    }
                }
            }
            seq += batch;
        }
    }
    recovered
}

/// A server child and the lines it prints.
struct ServerProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl ServerProcess {
    fn start(wal: &std::path::Path, threshold: Option<&str>) -> ServerProcess {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["serve", "127.0.0.1:0", wal.to_str().unwrap()])
            .env_remove("ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_MB")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(t) = threshold {
            cmd.env("ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_MB", t);
        }
        let mut child = cmd.spawn().expect("start the server");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        ServerProcess { child, lines }
    }

    /// Waits for a line starting with `prefix` and returns the rest.
    fn expect(&self, prefix: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("the server never printed {prefix:?}"));
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.trim().to_owned();
            }
        }
    }
}

/// Runs the demo with `threshold_mb`; exit code 0 if no acknowledged write
/// was lost and the server exited 2.
pub fn run(threshold_mb: &str) -> ExitCode {
    let threshold = std::env::var("ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_MB")
        .unwrap_or_else(|_| threshold_mb.to_owned());
    let dir = std::env::temp_dir().join(format!("kvserver-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("demo directory");
    let wal = dir.join("kvserver.wal");
    println!("== memwatch demo: a WAL-backed key-value server with a {threshold} MiB threshold ==");
    println!("log: {}", wal.display());

    // 1. Serve, and write until memwatch shuts the server down.
    let mut server = ServerProcess::start(&wal, Some(&threshold));
    server.expect("replayed");
    let addr = server.expect("listening");
    println!("server on {addr}; {CONNECTIONS} connections writing, {PIPELINE} pipelined SETs each");
    let started = Instant::now();
    let load = {
        let addr = addr.clone();
        thread::spawn(move || load_all(&addr, MAX_LOAD_TIME))
    };
    let status = server.child.wait().expect("wait for the server");
    let exited_at = monotonic_ns();
    let acked = load.join().unwrap();
    let load_time = started.elapsed();
    let mut trip = None;
    while let Ok(line) = server.lines.try_recv() {
        if let Some(rest) = line.strip_prefix("tripped ") {
            let (t, peak) = rest.split_once(" peak=").unwrap();
            trip = Some((t.parse::<u64>().unwrap(), peak.parse::<u64>().unwrap()));
        }
    }

    // 2. Restart on the same log and read everything back.
    let restarted = ServerProcess::start(&wal, None);
    let replayed = restarted.expect("replayed");
    let addr = restarted.expect("listening");
    let total_acked: u64 = acked.iter().sum();
    let recovered = verify(&addr, &acked);
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(restarted.child.id() as i32, libc::SIGTERM) };
    let mut restarted = restarted;
    let restart_status = restarted
        .child
        .wait()
        .expect("wait for the restarted server");
    let torn: u64 = replayed
        .rsplit_once("torn tail ")
        .and_then(|(_, b)| b.trim_end_matches(" bytes").parse().ok())
        .unwrap_or(0);
    let _ = std::fs::remove_dir_all(&dir);

    let lost = total_acked - recovered;
    println!();
    println!("== memwatch demo summary ==");
    println!("threshold                   {threshold} MiB");
    println!(
        "load                        {:.1} s, {} writes acknowledged ({:.0}/s)",
        load_time.as_secs_f64(),
        total_acked,
        total_acked as f64 / load_time.as_secs_f64()
    );
    println!(
        "server exit code            {}",
        status
            .code()
            .map_or_else(|| format!("{status}"), |c| c.to_string())
    );
    match trip {
        Some((t, peak)) => {
            println!("peak live bytes             {peak} ({} MiB)", peak >> 20);
            println!("trip to exit                {:.1} ms (hooks: stop intake, finish in-flight, fsync, close)", (exited_at.saturating_sub(t)) as f64 / 1e6);
        }
        None => println!("peak live bytes             (no trip)"),
    }
    println!("restart replayed            {replayed}");
    println!(
        "torn tail                   {}",
        if torn > 0 { "yes" } else { "no" }
    );
    println!("writes acknowledged         {total_acked}");
    println!("writes recovered            {recovered}");
    println!("acknowledged writes lost    {lost}");
    println!(
        "restart stopped by SIGTERM  exit code {}",
        restart_status.code().map_or(-1, |c| c)
    );
    let ok = lost == 0
        && status.code() == Some(2)
        && restart_status.code() == Some(0)
        && total_acked > 0;
    println!(
        "result                      {}",
        if ok { "PASS" } else { "FAIL" }
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

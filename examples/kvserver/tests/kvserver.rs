//! The demo server as a user runs it: real processes on loopback.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kvserver");

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvserver-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Server {
    child: Child,
    addr: String,
    replayed: String,
}

impl Server {
    fn start(wal: &Path, threshold: Option<&str>) -> Server {
        let mut cmd = Command::new(BIN);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ELASTICKV_MEMORY_") {
                cmd.env_remove(name);
            }
        }
        cmd.args(["serve", "127.0.0.1:0", wal.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(t) = threshold {
            cmd.env("ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_MB", t);
        }
        let mut child = cmd.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let next = |prefix: &str| loop {
            let l = lines
                .recv_timeout(Duration::from_secs(30))
                .expect("server output");
            if let Some(rest) = l.strip_prefix(prefix) {
                break rest.trim().to_owned();
            }
        };
        let replayed = next("replayed ");
        let addr = next("listening ");
        // The reader thread keeps draining stdout after `lines` is gone.
        Server {
            child,
            addr,
            replayed,
        }
    }

    /// Sends SIGTERM and returns the exit code. A server that has not
    /// stopped 30 s later fails the test (and is killed by `Drop`).
    fn stop(mut self) -> Option<i32> {
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // child's, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "the server did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    /// A test that fails leaves no server running behind it.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn kvserver(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn acked(load_output: &str) -> Vec<u64> {
    load_output
        .lines()
        .filter_map(|l| l.strip_prefix("acked ")?.parse().ok())
        .collect()
}

fn verify(addr: &str, acked: &[u64]) -> u64 {
    let mut args = vec!["verify".to_owned(), addr.to_owned()];
    args.extend(acked.iter().map(u64::to_string));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = kvserver(&args);
    out.trim()
        .strip_prefix("recovered ")
        .unwrap()
        .parse()
        .unwrap()
}

/// Runs a demo mode, which must report PASS with exit 0; returns its stdout.
fn demo(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_demo_exits_2_and_loses_no_acknowledged_write() {
    let stdout = demo(&["demo", "64"]);
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} missing:\n{stdout}"))
            .trim()
            .to_owned()
    };
    assert_eq!(field("server exit code"), "2", "{stdout}");
    assert_eq!(field("torn tail"), "no", "{stdout}");
    assert_eq!(field("acknowledged writes lost"), "0", "{stdout}");
    let acked: u64 = field("writes acknowledged").parse().unwrap();
    let recovered: u64 = field("writes recovered").parse().unwrap();
    assert!(acked > 1000, "{stdout}");
    assert_eq!(acked, recovered);
    assert_eq!(field("restart stopped by SIGTERM"), "exit code 0");
    assert_eq!(field("result"), "PASS");
}

#[test]
fn after_sigkill_replay_truncates_the_torn_tail_and_keeps_every_ack() {
    let dir = scratch("sigkill");
    let wal = dir.join("wal");
    let mut server = Server::start(&wal, None);
    let addr = server.addr.clone();
    let loader = std::thread::spawn(move || kvserver(&["load", &addr, "30"]));
    std::thread::sleep(Duration::from_millis(1500));
    server.child.kill().unwrap(); // SIGKILL, under load
    server.child.wait().unwrap();
    let acked = acked(&loader.join().unwrap());
    assert_eq!(acked.len(), 8);
    assert!(acked.iter().sum::<u64>() > 100, "{acked:?}");
    // A SIGKILL can land between write and fsync or in the middle of a
    // write; make the torn tail certain by appending half a record, as a
    // write cut short leaves it.
    let len = std::fs::metadata(&wal).unwrap().len();
    let mut f = std::fs::OpenOptions::new().append(true).open(&wal).unwrap();
    f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, b'x', b'y'])
        .unwrap();
    drop(f);

    let restarted = Server::start(&wal, None);
    let torn: u64 = restarted
        .replayed
        .rsplit_once("torn tail ")
        .and_then(|(_, b)| b.trim_end_matches(" bytes").parse().ok())
        .unwrap();
    assert!(
        torn >= 10,
        "the torn tail was reported: {}",
        restarted.replayed
    );
    assert!(
        std::fs::metadata(&wal).unwrap().len() <= len,
        "and truncated"
    );
    assert_eq!(verify(&restarted.addr, &acked), acked.iter().sum::<u64>());
    assert_eq!(restarted.stop(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corruption_in_the_middle_of_the_log_refuses_to_start() {
    let dir = scratch("corrupt");
    let wal = dir.join("wal");
    let server = Server::start(&wal, None);
    let addr = server.addr.clone();
    kvserver(&["load", &addr, "1"]);
    assert_eq!(server.stop(), Some(0));
    let mut data = std::fs::read(&wal).unwrap();
    assert!(data.len() > 10_000);
    data[100] ^= 0xFF;
    std::fs::write(&wal, &data).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "127.0.0.1:0", wal.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("corrupt log record"));
    let _ = std::fs::remove_dir_all(&dir);
}

fn roundtrip(stream: &mut TcpStream, request: &[u8]) -> Vec<u8> {
    stream.write_all(request).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0; 4096];
    let n = stream.read(&mut buf).unwrap_or(0);
    buf.truncate(n);
    buf
}

#[test]
fn bad_input_gets_an_error_or_a_close_never_a_crash() {
    let dir = scratch("badinput");
    let server = Server::start(&dir.join("wal"), None);
    let addr = server.addr.clone();
    let cases: [&[u8]; 6] = [
        b"*2\r\n$3\r\nGET\r\n$99999999999\r\n", // oversized bulk length
        b"*99999999\r\n",                       // oversized array
        b"*1\r\n$-7\r\n",                       // negative bulk length
        b"*1\r\n$4\r\nPINGxx",                  // unterminated bulk
        b"\x00\xff\xfe garbage \x01\r\n",       // garbage inline
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n",      // half-sent command, then close
    ];
    for case in cases {
        let mut s = TcpStream::connect(&addr).unwrap();
        let reply = roundtrip(&mut s, case);
        assert!(
            reply.is_empty() || reply.starts_with(b"-ERR") || reply.starts_with(b"-"),
            "{case:?} -> {:?}",
            String::from_utf8_lossy(&reply)
        );
    }
    // A slow client that promises a 16 MiB value and sends a little of it
    // costs no more than what it sent.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$16777216\r\nabc")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut probe = TcpStream::connect(&addr).unwrap();
    let info = roundtrip(&mut probe, b"*1\r\n$4\r\nINFO\r\n");
    let info = String::from_utf8_lossy(&info);
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        used < 4 << 20,
        "a promised 16 MiB was not allocated up front: {used}"
    );
    // Still serving.
    assert_eq!(roundtrip(&mut probe, b"PING\r\n"), b"+PONG\r\n");
    assert_eq!(
        roundtrip(&mut probe, b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\nb\r\n"),
        b"+OK\r\n"
    );
    assert_eq!(
        roundtrip(&mut probe, b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n"),
        b"$1\r\nb\r\n"
    );
    assert_eq!(roundtrip(&mut probe, b"*1\r\n$6\r\nDBSIZE\r\n"), b":1\r\n");
    assert_eq!(
        roundtrip(&mut probe, b"*2\r\n$3\r\nDEL\r\n$1\r\na\r\n"),
        b":1\r\n"
    );
    drop(s);
    assert_eq!(server.stop(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `used_memory` from INFO: memwatch's live heap of the server.
fn used_memory(addr: &str) -> u64 {
    let mut probe = TcpStream::connect(addr).unwrap();
    let info = roundtrip(&mut probe, b"*1\r\n$4\r\nINFO\r\n");
    String::from_utf8_lossy(&info)
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_command_past_the_query_limit_is_refused_and_its_buffer_freed() {
    let dir = scratch("querylimit");
    let server = Server::start(&dir.join("wal"), None);
    let addr = server.addr.clone();
    // Every argument is within the 16 MiB bulk limit; five of them are 80
    // MiB, past the 64 MiB a connection may buffer for one command.
    let mut request = b"*6\r\n$3\r\nSET\r\n".to_vec();
    for _ in 0..5 {
        request.extend_from_slice(format!("${}\r\n", 16 << 20).as_bytes());
        request.resize(request.len() + (16 << 20), b'v');
        request.extend_from_slice(b"\r\n");
    }
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let sent = s.write_all(&request);
    assert!(
        sent.is_err(),
        "the server closed the connection before taking all 80 MiB"
    );
    drop(s);
    std::thread::sleep(Duration::from_millis(200));
    let used = used_memory(&addr);
    assert!(used < 8 << 20, "the buffer was freed: {used} bytes live");
    let mut probe = TcpStream::connect(&addr).unwrap();
    assert_eq!(roundtrip(&mut probe, b"PING\r\n"), b"+PONG\r\n");
    assert_eq!(server.stop(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_pipeline_of_large_replies_to_a_client_that_does_not_read_stays_bounded() {
    let dir = scratch("outlimit");
    let server = Server::start(&dir.join("wal"), None);
    let addr = server.addr.clone();
    let mut s = TcpStream::connect(&addr).unwrap();
    let value = vec![b'v'; 1 << 20];
    let mut set = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${}\r\n", value.len()).into_bytes();
    set.extend_from_slice(&value);
    set.extend_from_slice(b"\r\n");
    assert_eq!(roundtrip(&mut s, &set), b"+OK\r\n");
    // 1000 GETs of the 1 MiB value, sent and never read: 1 GiB of replies
    // if the server queued them all.
    let get = b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n".repeat(1000);
    s.write_all(&get).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let used = used_memory(&addr);
    assert!(
        used < 16 << 20,
        "the replies are sent as they come, not queued: {used} bytes live"
    );
    drop(s);
    assert_eq!(server.stop(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn redis_benchmark_completes_against_the_server() {
    let have = Command::new("redis-benchmark")
        .arg("--version")
        .output()
        .is_ok();
    if !have {
        if std::env::var("MEMWATCH_REQUIRE_REDIS").as_deref() == Ok("1") {
            panic!("redis-benchmark is required here (MEMWATCH_REQUIRE_REDIS=1)");
        }
        eprintln!("SKIPPED: redis-benchmark not installed (apt-get install redis-tools)");
        return;
    }
    let dir = scratch("redis-benchmark");
    let server = Server::start(&dir.join("wal"), None);
    let (host, port) = server.addr.rsplit_once(':').unwrap();
    let out = Command::new("redis-benchmark")
        .args([
            "-h", host, "-p", port, "-t", "set,get", "-n", "20000", "-c", "16", "-q",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("redis-benchmark: {stdout}");
    assert!(out.status.success(), "{out:?}");
    for test in ["SET:", "GET:"] {
        let line = stdout
            .split(['\r', '\n'])
            .rfind(|l| l.trim_start().starts_with(test) && l.contains("requests per second"))
            .unwrap_or_else(|| panic!("no {test} result: {stdout}"));
        let rps: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(rps > 100.0, "{line}");
    }
    assert_eq!(server.stop(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_pressure_demo_sheds_then_survives_or_exits_2() {
    let stdout = demo(&["demo-shed", "160", "96"]);
    let fields = |name: &str| -> Vec<String> {
        stdout
            .lines()
            .filter_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .collect()
    };
    // Run 1: busy replies, then the load backs off and the server lives on.
    assert_eq!(fields("shedding at the peak"), ["yes"], "{stdout}");
    assert!(
        fields("writes refused (busy)")[0].parse::<u64>().unwrap() > 0,
        "{stdout}"
    );
    assert_eq!(fields("pressure left"), ["yes"], "{stdout}");
    assert_eq!(
        fields("PING / SET after backing off"),
        ["+PONG / +OK"],
        "{stdout}"
    );
    assert_eq!(fields("server exit code (SIGTERM)"), ["0"], "{stdout}");
    // Run 2: the load does not back off, and the hard stop still holds.
    assert_eq!(fields("server exit code  "), ["2"], "{stdout}");
    assert_eq!(fields("acknowledged writes lost"), ["0"], "{stdout}");
    assert_eq!(fields("result"), ["PASS"]);
}

//! The tokio server as a process, driven over HTTP by a real client
//! (`ureq`): it sheds writes with 503 above the soft level, trips at the
//! threshold, answers every request it accepted and exits 2; `/metrics`
//! serves memwatch's figures; SIGTERM drains and exits 0; in a real memory
//! cgroup it exits 2 where the kernel's OOM-killer ends it without memwatch.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use allocator_tests::cgroup::cgroup_or_skip;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// A server process, its address, and the lines of its standard output
/// after the first.
struct Server {
    child: Child,
    url: String,
    stdout: Receiver<String>,
    stderr: thread::JoinHandle<String>,
}

fn start(env: &[(&str, &str)]) -> Server {
    start_with(Command::new(SERVER), env)
}

const SERVER: &str = env!("CARGO_BIN_EXE_tokio-server");

/// Starts `cmd` (the server, or a shell that execs it) with `env`.
fn start_with(mut cmd: Command, env: &[(&str, &str)]) -> Server {
    for var in [
        "ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_MB",
        "ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_RATIO",
        "ELASTICKV_MEMORY_SHED_THRESHOLD_MB",
        "ELASTICKV_MEMORY_SHED_THRESHOLD_RATIO",
        "ELASTICKV_MEMORY_SHUTDOWN_GRACE",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("TOKIO_SERVER_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn tokio-server");
    let (tx, stdout) = mpsc::channel();
    let out = BufReader::new(child.stdout.take().unwrap());
    thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let err = BufReader::new(child.stderr.take().unwrap());
    let stderr = thread::spawn(move || {
        let mut all = String::new();
        for line in err.lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let first = stdout
        .recv_timeout(Duration::from_secs(30))
        .expect("the server prints its address");
    let url = first
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {first}"))
        .to_string();
    Server {
        child,
        url,
        stdout,
        stderr,
    }
}

impl Server {
    /// Waits for the exit (at most `limit`), then returns the exit code,
    /// the remaining standard output and the whole standard error.
    fn finish(mut self, limit: Duration) -> (Option<i32>, Vec<String>, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the server did not exit within {limit:?}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let stderr = self.stderr.join().unwrap();
        let rest = self.stdout.try_iter().collect();
        (status.code(), rest, stderr)
    }
}

fn agent() -> ureq::Agent {
    // A connection per request: a request is then either answered or was
    // never accepted (the listener had closed), with no keep-alive race.
    ureq::AgentBuilder::new()
        .max_idle_connections(0)
        .timeout(Duration::from_secs(20))
        .build()
}

/// `drained: S requests started, A answered, W writes stored, X shed`.
fn drained(lines: &[String]) -> [u64; 4] {
    let line = lines
        .iter()
        .find(|l| l.starts_with("drained: "))
        .unwrap_or_else(|| panic!("no drained line in {lines:?}"));
    let n: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    [n[0], n[1], n[2], n[3]]
}

/// Four clients write 64 KiB values: ordinary writes until the server sheds
/// one, then writes it never sheds (`x-priority: high`), which take the heap
/// on, until the server stops accepting. Returns the writes stored, shed
/// with 503, and refused once the server was draining.
fn drive(url: &str) -> [u64; 3] {
    let url = Arc::new(url.to_string());
    let shed_seen = Arc::new(AtomicBool::new(false));
    let (ok, shed, refused) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let body = vec![b'x'; 64 << 10];
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (url, shed_seen, ok, shed, refused, body) = (
                url.clone(),
                shed_seen.clone(),
                ok.clone(),
                shed.clone(),
                refused.clone(),
                body.clone(),
            );
            thread::spawn(move || {
                let agent = agent();
                for i in 0.. {
                    // Ordinary writes until the server sheds; then writes it
                    // never sheds, which take the heap on to the threshold.
                    let high = shed_seen.load(SeqCst);
                    let mut req = agent.put(&format!("{url}/kv/c{c}-{i}"));
                    if high {
                        req = req.set("x-priority", "high");
                    }
                    match req.send_bytes(&body) {
                        Ok(r) => {
                            assert_eq!(r.status(), 204);
                            ok.fetch_add(1, SeqCst);
                        }
                        Err(ureq::Error::Status(503, r)) => {
                            assert_eq!(r.header("retry-after"), Some("1"));
                            assert!(!high, "a high-priority write was shed");
                            shed.fetch_add(1, SeqCst);
                            shed_seen.store(true, SeqCst);
                        }
                        Err(ureq::Error::Status(code, _)) => panic!("status {code}"),
                        // The listener is closed: the server is draining.
                        Err(ureq::Error::Transport(_)) => {
                            refused.fetch_add(1, SeqCst);
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    [ok.load(SeqCst), shed.load(SeqCst), refused.load(SeqCst)]
}

#[test]
fn sheds_with_503_then_trips_answers_every_accepted_request_and_exits_2() {
    let server = start(&[
        ("ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_MB", "160"),
        ("ELASTICKV_MEMORY_SHED_THRESHOLD_MB", "96"),
        ("ELASTICKV_MEMORY_SHUTDOWN_GRACE", "10s"),
    ]);
    let [ok, shed, refused] = drive(&server.url);
    let (code, lines, stderr) = server.finish(Duration::from_secs(30));
    let [started, answered, stored, shed_by_server] = drained(&lines);
    println!(
        "client: {ok} stored, {shed} shed with 503, {refused} refused once draining; \
         server: {started} started, {answered} answered, {stored} stored, {shed_by_server} shed; \
         exit {code:?}"
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("memory threshold crossed"),
        "the trip line: {stderr}"
    );
    assert!(shed > 0, "no write was shed");
    assert!(ok > 100, "only {ok} writes stored");
    // Every request the server began, it answered, and the client got each
    // answer: the tallies agree on both sides.
    assert_eq!(started, answered, "a request in flight went unanswered");
    assert_eq!(stored, ok, "a stored write's answer was lost");
    assert_eq!(shed_by_server, shed, "a 503 was lost");
}

#[test]
fn metrics_serve_memwatch_figures_and_sigterm_drains_with_exit_0() {
    let server = start(&[
        ("ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_MB", "512"),
        ("ELASTICKV_MEMORY_SHED_THRESHOLD_MB", "384"),
    ]);
    let agent = agent();
    agent
        .put(&format!("{}/kv/a", server.url))
        .send_bytes(&[b'y'; 1 << 20])
        .unwrap();
    let read = agent
        .get(&format!("{}/kv/a", server.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert_eq!(read.len(), 1 << 20);
    let response = agent
        .get(&format!("{}/metrics", server.url))
        .call()
        .unwrap();
    assert!(response.content_type().contains("openmetrics"));
    let text = response.into_string().unwrap();
    println!("{text}");
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(value("memwatch_threshold_bytes"), (512u64 << 20) as f64);
    assert_eq!(value("memwatch_shed_level_bytes"), (384u64 << 20) as f64);
    assert_eq!(value("memwatch_tripped"), 0.0);
    assert_eq!(value("memwatch_shedding"), 0.0);
    // The stored megabyte is in the reading, and jemalloc holds at least
    // what memwatch counts.
    let live = value("memwatch_live_bytes");
    assert!(live > (1u64 << 20) as f64, "{live}");
    assert!(value("memwatch_jemalloc_allocated_bytes") >= live * 0.9);
    assert!(value("memwatch_peak_bytes") >= live);
    assert!(value("kv_writes_stored_total") >= 1.0);
    assert!(text.trim_end().ends_with("# EOF"));

    // SIGTERM: the same drain, exit 0.
    // SAFETY: `kill` on the pid of a child this test started and has not
    // reaped.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let (code, lines, stderr) = server.finish(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{stderr}");
    let [started, answered, stored, _] = drained(&lines);
    assert_eq!(started, answered);
    assert_eq!(stored, 1);
}

/// In a real 256 MiB memory cgroup: without memwatch's levels the kernel's
/// OOM-killer ends the server; with levels at 0.6 and 0.4 of the cgroup's
/// limit, the server sheds, trips, answers every request it accepted and
/// exits 2, and the kernel never acts.
#[test]
fn in_a_memory_cgroup_exits_2_where_the_kernel_oom_kills() {
    for ratio in [None, Some("0.6")] {
        let name = format!("tokio-{}-{}", ratio.unwrap_or("off"), std::process::id());
        let Some(cg) = cgroup_or_skip(&name, 256 << 20) else {
            return;
        };
        let mut env = vec![("ELASTICKV_MEMORY_SHUTDOWN_GRACE", "10s")];
        if let Some(r) = ratio {
            env.push(("ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_RATIO", r));
            env.push(("ELASTICKV_MEMORY_SHED_THRESHOLD_RATIO", "0.4"));
        }
        let server = start_with(cg.command(Path::new(SERVER), &[]), &env);
        let [ok, shed, refused] = drive(&server.url);
        let (code, lines, stderr) = server.finish(Duration::from_secs(60));
        let kills = cg.oom_kills();
        println!(
            "{name}: exit {code:?}, oom_kill {kills:?}; client: {ok} stored, {shed} shed, \
             {refused} refused; {lines:?}"
        );
        match ratio {
            None => {
                assert_eq!(code, None, "the kernel kills it: {stderr}");
                assert!(kills >= Some(1), "oom_kill {kills:?}: {stderr}");
            }
            Some(_) => {
                assert_eq!(code, Some(2), "{stderr}");
                assert_eq!(kills, Some(0), "the kernel acted: {stderr}");
                assert!(stderr.contains("memory limit 268435456 bytes"), "{stderr}");
                let [started, answered, stored, shed_by_server] = drained(&lines);
                assert!(shed > 0, "no write was shed");
                assert_eq!(started, answered);
                assert_eq!(stored, ok);
                assert_eq!(shed_by_server, shed);
            }
        }
    }
}

//! A tokio HTTP server (axum) with memwatch as its global allocator: what a
//! tokio user wires up, in one file.
//!
//! - `PUT /kv/{key}` stores the body, `GET /kv/{key}` reads it back. Above
//!   memwatch's soft level (`ELASTICKV_MEMORY_SHED_THRESHOLD_MB` or `_RATIO`)
//!   writes get `503 Service Unavailable` with `Retry-After: 1`, unless they
//!   carry `x-priority: high` (traffic a server never sheds, such as
//!   replication).
//! - `GET /metrics` serves memwatch's figures and jemalloc's in Prometheus'
//!   text format (OpenMetrics, through `prometheus-client`).
//! - At the trip, memwatch runs the shutdown hook on its own thread: the hook
//!   cancels the server's `CancellationToken`, axum stops accepting and lets
//!   every request in flight finish, and the hook returns; memwatch then
//!   exits with code 2. SIGTERM and Ctrl-C drain the same way and exit 0.
//!
//! ```sh
//! ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_MB=512 ELASTICKV_MEMORY_SHED_THRESHOLD_MB=384 \
//!   cargo run --release -p tokio-server
//! curl -s localhost:8080/metrics
//! ```
//!
//! `TOKIO_SERVER_ADDR` sets the address (default `127.0.0.1:8080`; port 0
//! picks a free one). The first line on standard output is
//! `listening on http://ADDR`, the last `drained: ...` with the request
//! tallies.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

mod metrics;

#[cfg(not(feature = "bare-jemalloc"))]
#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

// The benchmark's baseline (`--features bare-jemalloc`): the same server
// over jemalloc alone. memwatch's readings are then all zero.
#[cfg(feature = "bare-jemalloc")]
#[global_allocator]
static GLOBAL: memwatch::Jemalloc = memwatch::Jemalloc;

/// The server's state, shared by every handler.
#[derive(Clone, Default)]
struct App {
    store: Arc<Mutex<HashMap<String, Bytes>>>,
    tally: Arc<Tally>,
}

/// Request tallies: what `/metrics` reports and the last line prints.
#[derive(Default)]
struct Tally {
    /// Requests whose handling began.
    started: AtomicU64,
    /// Requests whose response was produced.
    answered: AtomicU64,
    /// Writes stored.
    stored: AtomicU64,
    /// Writes refused with 503 under memory pressure.
    shed: AtomicU64,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let addr = std::env::var("TOKIO_SERVER_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let app = App::default();
    let stop = CancellationToken::new();

    // The hook runs on memwatch's watchdog thread, outside the runtime: it
    // asks the server to stop and waits until the last request in flight
    // is answered. memwatch bounds the wait by the grace period.
    let (drained_tx, drained_rx) = mpsc::channel::<()>();
    let hook_stop = stop.clone();
    let watchdog = memwatch::Watchdog::from_env()
        .on_pressure(|e| {
            if e.shedding {
                log::warn!("shedding writes: {} live bytes", e.live_bytes);
            } else {
                log::info!("no longer shedding: {} live bytes", e.live_bytes);
            }
        })
        .on_shutdown("drain http", move || {
            hook_stop.cancel();
            let _ = drained_rx.recv();
        })
        .start();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            log::error!("cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(serve(&addr, app.clone(), stop));
    let t = &app.tally;
    println!(
        "drained: {} requests started, {} answered, {} writes stored, {} shed",
        t.started.load(Relaxed),
        t.answered.load(Relaxed),
        t.stored.load(Relaxed),
        t.shed.load(Relaxed),
    );
    // Lets the hook return; after a trip, memwatch exits 2 from here on.
    let _ = drained_tx.send(());
    runtime.shutdown_timeout(Duration::from_secs(1));
    watchdog.exit_if_tripped();
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("serving {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Serves until `stop` is cancelled (by the memwatch hook or a signal),
/// then returns once every connection has finished its request.
async fn serve(addr: &str, app: App, stop: CancellationToken) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    let on_signal = stop.clone();
    tokio::spawn(async move {
        stop_signal().await;
        log::info!("stop requested by a signal");
        on_signal.cancel();
    });
    let router = Router::new()
        .route("/kv/{key}", get(read).put(write))
        .route("/metrics", get(metrics::handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(middleware::from_fn_with_state(app.clone(), count))
        .with_state(app);
    axum::serve(listener, router)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

/// SIGTERM or Ctrl-C.
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Counts every request as it starts and as its response is produced.
async fn count(State(app): State<App>, request: Request, next: Next) -> Response {
    app.tally.started.fetch_add(1, Relaxed);
    let response = next.run(request).await;
    app.tally.answered.fetch_add(1, Relaxed);
    response
}

async fn read(State(app): State<App>, Path(key): Path<String>) -> Response {
    let value = app
        .store
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .cloned();
    match value {
        Some(value) => value.into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn write(
    State(app): State<App>,
    Path(key): Path<String>,
    headers: HeaderMap,
    value: Bytes,
) -> Response {
    let high = headers.get("x-priority").is_some_and(|p| p == "high");
    // One atomic load: refuse what can wait while the heap is above the
    // soft level, so that the server keeps answering.
    if memwatch::pressure() && !high {
        app.tally.shed.fetch_add(1, Relaxed);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "memory pressure: retry later\n",
        )
            .into_response();
    }
    app.store
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, value);
    app.tally.stored.fetch_add(1, Relaxed);
    StatusCode::NO_CONTENT.into_response()
}

//! `GET /metrics`: memwatch's figures, jemalloc's and the request tallies in
//! Prometheus' text format, read fresh at every scrape.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::{App, Tally};

/// The content type of `prometheus-client`'s text encoding.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(crate) async fn handler(State(app): State<App>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS)], render(&app.tally))
}

/// The scrape's text.
pub(crate) fn render(tally: &Tally) -> String {
    let s = memwatch::snapshot();
    let mut r = Registry::default();
    let bytes = |r: &mut Registry, name: &str, help: &str, value: usize| {
        let g = Gauge::<i64>::default();
        g.set(value as i64);
        r.register_with_unit(name, help, Unit::Bytes, g);
    };
    let flag = |r: &mut Registry, name: &str, help: &str, on: bool| {
        let g = Gauge::<i64>::default();
        g.set(i64::from(on));
        r.register(name, help, g);
    };
    bytes(
        &mut r,
        "memwatch_live",
        "Live heap bytes memwatch counts",
        s.live_bytes,
    );
    bytes(
        &mut r,
        "memwatch_peak",
        "The highest reading memwatch has seen",
        s.peak_bytes,
    );
    if let Some(t) = s.threshold_bytes {
        bytes(&mut r, "memwatch_threshold", "The shutdown threshold", t);
    }
    if let Some(b) = s.shed_bytes {
        bytes(
            &mut r,
            "memwatch_shed_level",
            "The soft level above which writes are shed",
            b,
        );
    }
    bytes(
        &mut r,
        "memwatch_error_budget",
        "How late the trip may come, at most (plus 64 KiB per thread)",
        s.error_budget_bytes,
    );
    flag(
        &mut r,
        "memwatch_tripped",
        "1 once the heap crossed the threshold",
        s.tripped_at_bytes.is_some(),
    );
    flag(
        &mut r,
        "memwatch_shedding",
        "1 while the heap is above the soft level",
        s.shedding,
    );
    let threads = Gauge::<i64>::default();
    threads.set(s.threads as i64);
    r.register("memwatch_threads", "Threads memwatch counts now", threads);
    if let Some(j) = memwatch::jemalloc_stats() {
        bytes(
            &mut r,
            "memwatch_jemalloc_allocated",
            "jemalloc's stats.allocated",
            j.allocated,
        );
        bytes(
            &mut r,
            "memwatch_jemalloc_active",
            "jemalloc's stats.active",
            j.active,
        );
        bytes(
            &mut r,
            "memwatch_jemalloc_resident",
            "jemalloc's stats.resident",
            j.resident,
        );
        bytes(
            &mut r,
            "memwatch_jemalloc_mapped",
            "jemalloc's stats.mapped",
            j.mapped,
        );
        bytes(
            &mut r,
            "memwatch_jemalloc_retained",
            "jemalloc's stats.retained",
            j.retained,
        );
    }
    let count = |r: &mut Registry, name: &str, help: &str, n: &AtomicU64| {
        let c = Counter::<u64>::default();
        c.inc_by(n.load(Relaxed));
        r.register(name, help, c);
    };
    count(
        &mut r,
        "http_requests_started",
        "Requests whose handling began",
        &tally.started,
    );
    count(
        &mut r,
        "http_requests_answered",
        "Requests whose response was produced",
        &tally.answered,
    );
    count(&mut r, "kv_writes_stored", "Writes stored", &tally.stored);
    count(
        &mut r,
        "kv_writes_shed",
        "Writes refused with 503 under memory pressure",
        &tally.shed,
    );
    let mut out = String::new();
    // Writing into a `String` cannot fail.
    let _ = encode(&mut out, &r);
    out
}

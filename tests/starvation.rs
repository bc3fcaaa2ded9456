//! The proof that buffering is what keeps a fast client fast: without it, slow
//! clients starve a synchronous app (the example backend's `--sync-workers` mode, and
//! the real gunicorn). A test binary of their own (cargo runs test binaries one at a
//! time), so that the rest of the suite's load does not blur what they time: whether a
//! fast request waits a second or more.

mod slow_clients;
mod support;

use slow_clients::*;

/// The proof that buffering is what keeps the fast client fast: the same load without
/// it occupies both workers, and a fast request waits for seconds or gets no answer.
#[test]
fn without_buffering_slow_clients_starve_a_synchronous_app() {
    slow_clients_starve_workers_without_buffering(&sync_backend());
}

/// And without buffering, the same gunicorn starves its fast client.
#[test]
fn without_buffering_slow_clients_starve_gunicorn() {
    let Some(gunicorn) = gunicorn() else { return };
    let app_dir = tempfile::tempdir().expect("app dir");
    slow_clients_starve_workers_without_buffering(&gunicorn_cmd(&gunicorn, app_dir.path()));
}

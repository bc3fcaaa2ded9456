//! Request and response buffering in front of synchronous app servers (the example
//! backend's `--sync-workers` mode, and the real gunicorn): slow uploaders and slow
//! downloaders must not hold the workers, so a fast client stays fast; without
//! buffering the same load starves it; a roll under that load loses nothing and stops
//! the old set while its answers are still being downloaded.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::slow_clients::*;
use crate::support::*;

#[test]
fn slow_clients_hold_no_worker_of_a_synchronous_app() {
    slow_clients_do_not_hold_workers(&sync_backend());
}

/// A roll in the middle of the slow load: nothing is lost, and the old set is stopped
/// while slow clients are still downloading the answers its process wrote, two of them
/// 32 MiB answers that their clients have not started to read.
#[test]
fn a_roll_stops_the_old_set_while_slow_clients_still_download_its_answers() {
    let (rolld, fixture, _) = start(&sync_backend(), "  access_log: false\n");
    let old = rolld.pids_of(1);
    assert_eq!(old.len(), 1, "one process in the first set");
    let large_heads = Arc::new(AtomicUsize::new(0));
    let go = Arc::new(AtomicBool::new(false));
    let large: Vec<_> = (0..2)
        .map(|_| {
            let (heads, go, port) = (large_heads.clone(), go.clone(), fixture.listen);
            std::thread::spawn(move || large_download(port, &heads, &go))
        })
        .collect();
    let slow = SlowClients::start(fixture.listen);
    let fast = FastClient::start(fixture.listen, Duration::from_secs(10));
    // Every download has its head, so every answer came from the old set.
    wait_until("every download under way", SOON, || {
        slow.heads.load(Ordering::SeqCst) == SLOW && large_heads.load(Ordering::SeqCst) == 2
    });
    let rolled = Instant::now();
    let (code, out, err) = rolld.control("reload", &[]);
    assert_eq!(code, Some(0), "reload failed: {out}{err}");
    let took = rolled.elapsed();
    let done_at_roll = slow.done.load(Ordering::SeqCst);
    assert!(!alive(old[0]), "the old process still runs after the roll");
    // The old set was stopped while its answers were still being downloaded.
    assert_eq!(
        done_at_roll, 0,
        "{done_at_roll} transfer(s) ended before the old set was stopped ({took:?})"
    );
    go.store(true, Ordering::SeqCst);
    for download in large {
        let result = download.join().expect("large download thread");
        assert_eq!(result, Ok(()), "a 32 MiB answer of the old set");
    }
    let outcome = slow.finish();
    let fast = fast.finish();
    assert!(
        outcome.errors.is_empty(),
        "slow transfers failed: {:?}",
        outcome.errors
    );
    assert_eq!(outcome.good.len(), 2 * SLOW);
    let failed: Vec<_> = fast.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "fast requests failed: {failed:?}");
    eprintln!(
        "roll took {took:?}; {} fast requests, slowest {:?}",
        fast.len(),
        fast.iter().filter_map(|r| r.as_ref().ok()).max()
    );
    assert_eq!(rolld.pids_of(2).len(), 1, "the new set serves");
}

/// The same load against the real gunicorn with two sync workers (its default worker
/// class), the server whose documentation asks for a buffering proxy in front.
#[test]
fn gunicorn_sync_workers_behind_rolld_stay_free_for_a_fast_client() {
    let Some(gunicorn) = gunicorn() else { return };
    let app_dir = tempfile::tempdir().expect("app dir");
    slow_clients_do_not_hold_workers(&gunicorn_cmd(&gunicorn, app_dir.path()));
}

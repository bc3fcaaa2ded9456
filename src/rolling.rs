//! A roll, as named steps: plan the next ports, start the next generation, wait until
//! it is healthy, smoke-test it, swap the proxy's upstreams, drain the old generation
//! and stop it. Every failure before the swap stops the new generation and leaves the
//! old one serving, untouched. This is the only caller of [`Upstreams::swap`].
//!
//! With `app-servers.rollout`, the switch is guarded (see [`rollout`](crate::rollout)):
//! an optional canary takes a share of requests first, and after the full switch the
//! old set stays up through the bake, so that going back is a swap, not an app start.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use rand::Rng;
use rolld_proxy::{UpstreamSet, Upstreams};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::actions;
use crate::config::{Config, PortPlan, SmokeTest};
use crate::connections;
use crate::generation::{self, Context, Generation, StopHow};
use crate::health;
use crate::rollout::{Operator, Phase, Reason, Verdict, Watch};
use crate::signals::{RollEvent, Watcher};
use crate::tree;

/// Everything a roll needs, moved into its task and back.
pub struct Roll {
    pub ctx: Arc<Context>,
    pub config: Config,
    pub upstreams: Option<Arc<Upstreams>>,
    /// The generation serving now (none at start-up).
    pub current: Option<Generation>,
    /// Id of the generation to start.
    pub id: u64,
    /// Which workset to use (ignored when ports are picked).
    pub workset: usize,
    /// Who hears this roll's progress (`rolld reload`).
    pub watchers: Vec<Watcher>,
    /// Turns true when rolld shuts down: a roll that has not swapped yet stops its new
    /// set and leaves the old one serving.
    pub cancel: watch::Receiver<bool>,
    /// `rolld promote` and `rolld rollback`, heard during a canary or bake.
    pub operator: mpsc::UnboundedReceiver<Operator>,
}

/// What a roll leaves behind.
pub struct Rolled {
    /// The generation serving afterwards: the new one, or the old one after a rollback.
    pub current: Option<Generation>,
    /// What happened, in a sentence.
    pub outcome: Result<String, String>,
    /// Still waiting for the outcome.
    pub watchers: Vec<Watcher>,
    /// Whether the new set serves (also after a failure past the swap).
    pub swapped: bool,
}

impl Roll {
    pub async fn run(mut self) -> Rolled {
        let started = Instant::now();
        let id = self.id;
        let board = self.ctx.board.clone();
        board.rolls_started.fetch_add(1, Ordering::Relaxed);
        // A panic in a step must not take the serving set with it: the steps borrow
        // `self`, so whichever set serves is still in `self.current` after it.
        let stepped = CatchPanic {
            inner: Box::pin(self.step_through()),
        }
        .await;
        let outcome = match stepped {
            Ok(outcome) => outcome,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown".into());
                error!(generation = id, "roll panicked: {what}");
                Err(format!(
                    "generation {id}: internal error ({what}); generation {} keeps serving",
                    self.current
                        .as_ref()
                        .map_or_else(|| "none".to_string(), |g| g.id.to_string())
                ))
            }
        };
        let took = started.elapsed();
        let outcome = match outcome {
            Ok(()) => {
                info!(generation = id, elapsed = ?took, "roll finished");
                board.rolls_succeeded.fetch_add(1, Ordering::Relaxed);
                let message = format!(
                    "generation {id} serving; finished in {} ms",
                    took.as_millis()
                );
                board.roll_ended(id, "succeeded", message.clone(), took);
                Ok(message)
            }
            Err(why) => {
                error!(generation = id, "roll failed, rolled back: {why}");
                board.rolls_rolled_back.fetch_add(1, Ordering::Relaxed);
                let message = if self.current.is_some() && !why.starts_with("rolled back") {
                    format!("rolled back: {why}")
                } else {
                    why
                };
                board.roll_ended(id, "rolled back", message.clone(), took);
                Err(message)
            }
        };
        Rolled {
            swapped: self.current.as_ref().is_some_and(|g| g.id == id),
            current: self.current,
            outcome,
            watchers: self.watchers,
        }
    }

    /// The end of a rollback message: whether an old set goes on serving.
    fn keeps_serving(&self) -> &'static str {
        if self.current.is_some() {
            ", the old set keeps serving"
        } else {
            ""
        }
    }

    /// A step of the roll, for the log's reader and the watchers.
    fn report(&self, phase: &str, message: String) {
        info!(generation = self.id, "{message}");
        self.tell(phase, message);
    }

    /// A step whose message names the old set's generation: the log line carries the
    /// roll's own as `roll`, so that it has one `generation=`, not two.
    fn report_old(&self, phase: &str, message: String) {
        info!(roll = self.id, "{message}");
        self.tell(phase, message);
    }

    /// The phase for `rolld status` and the message for every `rolld reload` waiting.
    fn tell(&self, phase: &str, message: String) {
        self.ctx.board.phase(self.id, phase);
        for watcher in &self.watchers {
            let _ = watcher.send(RollEvent::Progress(message.clone()));
        }
    }

    /// Frees `port`, which something listens on: a process left over from an earlier
    /// set (a daemon that escaped its stop, in rolld's tree) is stopped; a stranger's
    /// port refuses the roll, naming the holder.
    async fn free_port(&self, port: u16) -> Result<(), String> {
        let holders = connections::holders(port);
        let Some(&first) = holders.first() else {
            return Err(format!("port {port} is in use by another process"));
        };
        let serving: Vec<i32> = self
            .current
            .as_ref()
            .map(Generation::pids)
            .unwrap_or_default();
        let mut leftovers = Vec::new();
        for &holder in &holders {
            let name = tree::name_of(holder.as_raw());
            match tree::rolld_descendant(holder) {
                Some(top) if !serving.contains(&top.as_raw()) => {
                    leftovers.push((holder, name, top))
                }
                _ => return Err(format!("port {port} is held by pid {holder} ({name})")),
            }
        }
        let mut stopping = Vec::new();
        for (holder, name, top) in &leftovers {
            let subtree = tree::subtree(*top);
            warn!(
                generation = self.id,
                port,
                pid = holder.as_raw(),
                stopping = ?subtree,
                "port {port} is held by pid {holder} ({name}), left over from an earlier set; stopping it"
            );
            stopping.extend(subtree);
        }
        // Two holders of one subtree list it twice; a second stop signal is "now" to some.
        stopping.sort_unstable();
        stopping.dedup();
        let how = StopHow::from_config(&self.config);
        tree::signal_all(&stopping, how.signal);
        let free = |deadline| async move {
            let deadline = crate::process::deadline_in(deadline);
            while connections::in_use(port) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            !connections::in_use(port)
        };
        if free(how.timeout).await {
            return Ok(());
        }
        warn!(
            generation = self.id,
            port, "still held after {}; sending SIGKILL", how.signal
        );
        tree::signal_all(&stopping, nix::sys::signal::Signal::SIGKILL);
        if free(std::time::Duration::from_secs(5)).await {
            return Ok(());
        }
        let holder = connections::holders(port).first().copied().unwrap_or(first);
        Err(format!(
            "port {port} is still held by pid {holder} ({}) after SIGKILL",
            tree::name_of(holder.as_raw())
        ))
    }

    async fn step_through(&mut self) -> Result<(), String> {
        let app = &self.config.app;
        let current_ports: Vec<u16> = self
            .current
            .as_ref()
            .map(|g| g.ports.clone())
            .unwrap_or_default();
        let ports = next_ports(&app.ports, self.workset, &current_ports)?;
        self.report(
            "starting",
            format!("starting {} process(es) ports={ports:?}", ports.len()),
        );

        // Someone else on a port would fail the app's bind, or worse, pass its checks.
        for &port in &ports {
            if connections::in_use(port) {
                self.free_port(port).await.map_err(|why| {
                    format!(
                        "generation {}: {why}; roll refused{}",
                        self.id,
                        self.keeps_serving()
                    )
                })?;
            }
        }

        // 1. start, 2. wait until healthy, 3. smoke-test.
        let set = self.upstreams.as_ref().map(|_| {
            Arc::new(UpstreamSet::new(
                self.id,
                &generation::addrs(&ports),
                app.balance,
            ))
        });
        let next = Generation::spawn(&self.ctx, self.id, &ports, &self.config, set.as_deref());
        let checked = async {
            next.wait_ready(&app.health)
                .await
                .map_err(|e| e.to_string())?;
            // The checks passed against whoever listens: make sure it is our process.
            next.check_owners()?;
            self.report("checking", format!("{n}/{n} healthy", n = ports.len()));
            for test in &app.smoke_tests {
                match test {
                    SmokeTest::CheckAllHttpPorts(check) => {
                        health::check_all_http_ports(&ports, check, app.health.timeout).await?
                    }
                }
            }
            Ok::<(), String>(())
        };
        let mut cancel = self.cancel.clone();
        let cancelled = async move {
            if cancel.wait_for(|stop| *stop).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let checked = tokio::select! {
            checked = checked => checked,
            () = cancelled => Err("rolld is shutting down".to_string()),
        };
        if let Err(why) = checked {
            next.terminate(StopHow::from_config(&self.config)).await;
            return Err(format!(
                "generation {}: {why}; new processes stopped{}",
                self.id,
                self.keeps_serving()
            ));
        }

        // 4. after_start (another balancer), then swap: from here on new requests go to
        // the new set. A failed action has already been undone.
        let nginx_reload = crate::nginx_reload::Reload::before(&app.after_start);
        if !app.after_start.is_empty() {
            // As in the original, commands run in the folder rolld was started in.
            let folder = &self.config.workdir;
            if let Err(why) =
                actions::run_after_start(&self.ctx, &app.after_start, folder, &ports, self.id).await
            {
                // The balancer may have sent requests to the new set before it was
                // pointed back: let them finish first.
                let deadline = crate::process::deadline_in(app.drain_timeout);
                let timeout = humantime::format_duration(app.drain_timeout).to_string();
                drain_connections(self.id, &ports, deadline, &timeout).await;
                next.terminate(StopHow::from_config(&self.config)).await;
                return Err(format!(
                    "generation {}: {why}; new processes stopped{}",
                    self.id,
                    self.keeps_serving()
                ));
            }
        }
        // From now on a process that dies is restarted; one that died before this
        // moment was not, so the set is refused rather than served with a hole.
        next.set_serving(true);
        if let Some(why) = next.exited() {
            next.terminate(StopHow::from_config(&self.config)).await;
            return Err(format!(
                "generation {}: {why} before the swap; new processes stopped{}",
                self.id,
                self.keeps_serving()
            ));
        }
        // The guard applies to a roll that replaces a serving set.
        let rollout = app.rollout.clone().filter(|_| self.current.is_some());
        let new_outcomes = set.as_ref().map(|s| s.outcomes().clone());
        let old_outcomes = self
            .upstreams
            .as_ref()
            .map(|u| u.current().outcomes().clone());

        // 4b. canary: a share of new requests goes to the new set first.
        let mut promoted = None;
        let mut skip_bake = false;
        if let (Some(rollout), Some(upstreams), Some(new_set)) = (&rollout, &self.upstreams, &set) {
            if let Some((share, length)) = rollout.canary {
                upstreams.start_canary(new_set.clone(), share);
                self.report(
                    "canary",
                    format!(
                        "canary: {}% of new requests go to the new set for {}",
                        f64::from(share) / 10_000.0,
                        humantime::format_duration(length)
                    ),
                );
                let old_id = self.current.as_ref().map_or(0, |g| g.id);
                let verdict = Watch {
                    phase: Phase::Canary,
                    rollout,
                    length,
                    new: new_outcomes.clone(),
                    old: old_outcomes.clone(),
                    baseline: old_outcomes.as_ref().map(|o| o.counts()),
                    generation: &next,
                    old_generation: old_id,
                    operator: &mut self.operator,
                    cancel: self.cancel.clone(),
                    board: &self.ctx.board,
                }
                .run()
                .await;
                match verdict {
                    Verdict::Promote(why) => {
                        self.report("promoted", format!("canary promoted: {why}"));
                        promoted = upstreams.promote_canary();
                    }
                    Verdict::Promoted => {
                        self.report(
                            "promoted",
                            "canary promoted by the operator; no bake".to_string(),
                        );
                        promoted = upstreams.promote_canary();
                        skip_bake = true;
                    }
                    Verdict::RollBack { reason, message } => {
                        self.ctx.board.rolled_back_after_switch(reason);
                        let served = new_outcomes.as_ref().map_or(0, |o| o.counts().requests);
                        return Err(self
                            .end_canary(
                                next,
                                set,
                                old_id,
                                served,
                                format!("rolled back during canary: {message}"),
                            )
                            .await);
                    }
                    Verdict::Shutdown => {
                        return Err(self
                            .end_canary(next, set, old_id, 0, "rolld is shutting down".to_string())
                            .await);
                    }
                }
            }
        }
        let drain = match (&self.upstreams, set) {
            (_, _) if promoted.is_some() => promoted,
            (Some(upstreams), Some(set)) => Some(upstreams.swap(set)),
            _ => None,
        };
        self.ctx.board.serving(self.id);
        self.report(
            "swapped",
            format!("swapped: new set serving pids={:?}", next.pids()),
        );
        let Some(old) = self.current.replace(next) else {
            return Ok(());
        };

        // 5. drain the old set, 6. stop it (after the bake, if any).
        let baking = rollout.as_ref().filter(|r| !r.bake.is_zero() && !skip_bake);
        // Through a bake the old processes stay supervised: one that dies is restarted,
        // so that the set to go back to is whole.
        old.set_serving(baking.is_some());
        if failpoint("roll-panic-after-swap", self.id) {
            panic!("failpoint roll-panic-after-swap");
        }
        let deadline = crate::process::deadline_in(app.drain_timeout);
        let timeout = humantime::format_duration(app.drain_timeout).to_string();
        let draining = Instant::now();
        if let Some(mut drain) = drain {
            let in_flight = drain.in_flight();
            self.report_old(
                "draining",
                format!(
                    "draining {in_flight} request(s) in flight generation={}",
                    old.id
                ),
            );
            match drain.wait_timeout(app.drain_timeout).await {
                Ok(()) => info!(generation = old.id, "old set drained"),
                Err(cut) => warn!(
                    generation = old.id,
                    "drain_timeout ({timeout}) passed with {} request(s) in flight; they will be cut",
                    cut.in_flight
                ),
            }
        }
        // Another balancer in front: its connections to the old set are the only sign
        // of requests rolld can see.
        if self.upstreams.is_none() || !app.after_start.is_empty() {
            if let Some(reload) = &nginx_reload {
                reload.wait(old.id, deadline).await;
            }
            drain_connections(old.id, &old.ports, deadline, &timeout).await;
        }
        self.ctx
            .board
            .drain_seconds
            .observe(draining.elapsed().as_secs_f64());
        let old_id = old.id;
        if let Some(rollout) = baking {
            let baseline = old_outcomes.as_ref().map(|o| o.counts());
            self.report_old(
                "bake",
                format!(
                    "baking for {}: the old set generation={old_id} stays up, idle",
                    humantime::format_duration(rollout.bake)
                ),
            );
            // The old processes get a set of their own, for no request unless every
            // process of the new set is down at once, and to switch back to.
            let standby = self.upstreams.as_ref().map(|upstreams| {
                let set = Arc::new(UpstreamSet::new(
                    old_id,
                    &generation::addrs(&old.ports),
                    app.balance,
                ));
                old.attach(&set);
                let outcomes = set.outcomes().clone();
                upstreams.set_standby(Some(set));
                outcomes
            });
            let current = self.current.take().expect("the new set was just installed");
            let verdict = Watch {
                phase: Phase::Bake,
                rollout,
                length: rollout.bake,
                new: new_outcomes.clone(),
                old: standby,
                baseline,
                generation: &current,
                old_generation: old_id,
                operator: &mut self.operator,
                cancel: self.cancel.clone(),
                board: &self.ctx.board,
            }
            .run()
            .await;
            self.current = Some(current);
            match verdict {
                Verdict::Promote(why) => self.report("promoted", format!("promoted: {why}")),
                Verdict::Promoted => self.report(
                    "promoted",
                    "promoted by the operator: the bake ended early".to_string(),
                ),
                Verdict::Shutdown => {}
                Verdict::RollBack { reason, message } => {
                    return self.switch_back(old, reason, message).await;
                }
            }
            // Requests the old set took as the standby finish before it stops.
            if let Some(mut drain) = self.upstreams.as_ref().and_then(|u| u.set_standby(None)) {
                if let Err(cut) = drain.wait_timeout(app.drain_timeout).await {
                    warn!(
                        old_generation = old_id,
                        "drain_timeout ({timeout}) passed with {} request(s) in flight on the standby set; they will be cut",
                        cut.in_flight
                    );
                }
            }
        }
        old.set_serving(false);
        self.report_old(
            "stopping",
            format!("stopping the old set generation={old_id}"),
        );
        old.terminate(StopHow::from_config(&self.config)).await;
        self.report_old("stopped", format!("old set stopped generation={old_id}"));
        Ok(())
    }

    /// Ends a canary that is not promoted: new requests go to the old set alone, the
    /// new set drains exactly and stops. Returns the roll's error.
    async fn end_canary(
        &mut self,
        next: Generation,
        set: Option<Arc<UpstreamSet>>,
        old_id: u64,
        served: u64,
        why: String,
    ) -> String {
        // Never hold the set being drained: its drain ends when it is dropped.
        drop(set);
        if let Some(old) = &self.current {
            self.ctx.board.serving(old.id);
        }
        let drain = self.upstreams.as_ref().and_then(|u| u.end_canary());
        next.set_serving(false);
        self.report(
            "rolling back",
            format!("{why}; new requests go to generation {old_id} alone; draining the canary"),
        );
        if let Some(mut drain) = drain {
            if let Err(cut) = drain.wait_timeout(self.config.app.drain_timeout).await {
                warn!(
                    generation = self.id,
                    "drain_timeout passed with {} canary request(s) in flight; they will be cut",
                    cut.in_flight
                );
            }
        }
        next.terminate(StopHow::from_config(&self.config)).await;
        format!(
            "{why}; the canary served {served} request(s); new processes stopped, generation {old_id} keeps serving"
        )
    }

    /// Switches back to `old` after a bake found the new set failing: a quick readiness
    /// check of the old processes, the swap (or the other balancer pointed back), then
    /// the new set drains exactly and stops. No process starts.
    async fn switch_back(
        &mut self,
        old: Generation,
        reason: Reason,
        message: String,
    ) -> Result<(), String> {
        let app = self.config.app.clone();
        let back = std::time::Instant::now();
        // The old processes were supervised through the bake; make sure they answer.
        for &port in &old.ports {
            let ready = health::probe(port, app.health.http.as_ref(), app.health.timeout).await;
            if let Err(why) = ready {
                error!(
                    generation = self.id,
                    old_generation = old.id,
                    "cannot roll back: the old process on port {port} is not ready ({why}); the new set keeps serving"
                );
                old.set_serving(false);
                if let Some(mut drain) = self.upstreams.as_ref().and_then(|u| u.set_standby(None)) {
                    let _ = drain.wait_timeout(app.drain_timeout).await;
                }
                old.terminate(StopHow::from_config(&self.config)).await;
                return Err(format!(
                    "generation {}: {message}, but the old set was not ready (port {port}: {why}); the new set keeps serving",
                    self.id
                ));
            }
        }
        let new = self
            .current
            .take()
            .expect("the new set serves during the bake");
        // The standby set of the old processes serves again (their keepers already
        // mark availability on it).
        let drain = self.upstreams.as_ref().and_then(|u| u.restore_standby());
        if !app.after_start.is_empty() {
            let folder = &self.config.workdir;
            if let Err(why) =
                actions::run_after_start(&self.ctx, &app.after_start, folder, &old.ports, old.id)
                    .await
            {
                error!(
                    generation = self.id,
                    "pointing the balancer back at generation {} failed: {why}", old.id
                );
            }
        }
        self.ctx.board.serving(old.id);
        self.ctx.board.rolled_back_after_switch(reason);
        let old_id = old.id;
        self.current = Some(old);
        new.set_serving(false);
        self.report(
            "rolling back",
            format!(
                "rolled back after switch: {message}; generation {old_id} serves again after {} ms; draining the new set",
                back.elapsed().as_millis()
            ),
        );
        let deadline = crate::process::deadline_in(app.drain_timeout);
        let timeout = humantime::format_duration(app.drain_timeout).to_string();
        if let Some(mut drain) = drain {
            if let Err(cut) = drain.wait_timeout(app.drain_timeout).await {
                warn!(
                    generation = self.id,
                    "drain_timeout ({timeout}) passed with {} request(s) in flight; they will be cut",
                    cut.in_flight
                );
            }
        }
        if self.upstreams.is_none() || !app.after_start.is_empty() {
            drain_connections(new.id, &new.ports, deadline, &timeout).await;
        }
        new.terminate(StopHow::from_config(&self.config)).await;
        Err(format!(
            "rolled back after switch: {message}; new processes stopped, generation {old_id} serves"
        ))
    }
}

/// Runs a future, turning a panic in it into an error (std has no `catch_unwind` for
/// futures; futures-util's needs its `std` feature).
struct CatchPanic<F> {
    inner: F,
}

impl<F: std::future::Future + Unpin> std::future::Future for CatchPanic<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = &mut self.inner;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            std::pin::Pin::new(inner).poll(cx)
        })) {
            Ok(poll) => poll.map(Ok),
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
    }
}

/// Test hook, in debug builds only: `ROLLD_FAILPOINT=NAME:GENERATION` makes the roll to
/// that generation fail at `NAME`.
#[cfg(debug_assertions)]
fn failpoint(name: &str, generation: u64) -> bool {
    std::env::var("ROLLD_FAILPOINT").is_ok_and(|v| v == format!("{name}:{generation}"))
}

#[cfg(not(debug_assertions))]
fn failpoint(_name: &str, _generation: u64) -> bool {
    false
}

/// Waits until no TCP connection to `ports` has been open for [`QUIET`], or `deadline`.
///
/// A balancer's reload command may return before the reload is complete (nginx's does):
/// until then its old workers can still open connections to these ports, so a single
/// look at zero connections is not enough.
async fn drain_connections(
    generation: u64,
    ports: &[u16],
    deadline: tokio::time::Instant,
    timeout: &str,
) {
    let mut logged = false;
    let mut quiet_since: Option<tokio::time::Instant> = None;
    loop {
        let open = match connections::open_to(ports) {
            Ok(open) => open,
            Err(e) => {
                warn!(
                    generation,
                    "cannot read the kernel's TCP tables ({e}); not waiting for connections"
                );
                return;
            }
        };
        let now = tokio::time::Instant::now();
        if open == 0 {
            let since = *quiet_since.get_or_insert(now);
            if now.duration_since(since) >= QUIET || now >= deadline {
                info!(generation, "no connection to the old set is open");
                return;
            }
            tokio::time::sleep(CONNECTION_POLL).await;
            continue;
        }
        quiet_since = None;
        if !logged {
            info!(
                generation,
                "waiting for {open} connection(s) to the old set to close"
            );
            logged = true;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(generation, "drain_timeout ({timeout}) passed with {open} connection(s) to the old set open; they will be cut");
            return;
        }
        tokio::time::sleep(CONNECTION_POLL).await;
    }
}

/// How often the kernel's TCP tables are read while draining without a proxy.
const CONNECTION_POLL: std::time::Duration = std::time::Duration::from_millis(50);
/// How long no connection must be open before a set counts as drained by connections.
const QUIET: std::time::Duration = std::time::Duration::from_millis(500);

/// The ports of the next generation.
fn next_ports(plan: &PortPlan, workset: usize, current: &[u16]) -> Result<Vec<u16>, String> {
    match plan {
        PortPlan::Worksets(sets) => {
            let ports = sets[workset % sets.len()].clone();
            if let Some(p) = ports.iter().find(|p| current.contains(p)) {
                return Err(format!(
                    "port {p} of the next workset is still used by the serving set"
                ));
            }
            Ok(ports)
        }
        PortPlan::Pick { count, range } => pick_free_ports(*count, range.clone(), current),
    }
}

/// `count` ports from `range` that nothing listens on, avoiding `current`. The scan
/// starts at a random port so that several rollds on one machine rarely collide, and
/// takes ports outside the kernel's ephemeral range first: the source port of any
/// outgoing connection (a health check, the proxy's) can take an ephemeral port between
/// this check and the app's own bind.
fn pick_free_ports(
    count: usize,
    range: std::ops::RangeInclusive<u16>,
    current: &[u16],
) -> Result<Vec<u16>, String> {
    let (lo, hi) = (*range.start() as u32, *range.end() as u32);
    let size = hi - lo + 1;
    let offset = rand::thread_rng().gen_range(0..size);
    let avoid: HashSet<u16> = current.iter().copied().collect();
    let ephemeral = ephemeral_ports();
    let is_ephemeral = |p: &u16| ephemeral.as_ref().is_some_and(|e| e.contains(p));
    let candidates = || {
        (0..size)
            .map(|i| (lo + (offset + i) % size) as u16)
            .filter(|p| !avoid.contains(p))
    };
    let ports: Vec<u16> = candidates()
        .filter(|p| !is_ephemeral(p))
        .chain(candidates().filter(is_ephemeral))
        .filter(|&p| std::net::TcpListener::bind(("0.0.0.0", p)).is_ok())
        .take(count)
        .collect();
    if ports.len() < count {
        return Err(format!(
            "only {} free port(s) in {lo}-{hi}, {count} needed",
            ports.len()
        ));
    }
    Ok(ports)
}

/// The kernel's range of source ports for outgoing connections, if it can be read.
fn ephemeral_ports() -> Option<std::ops::RangeInclusive<u16>> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
    let (lo, hi) = (parts.next()??, parts.next()??);
    Some(lo..=hi)
}

/// A warning for a `port_range` that lies inside the ephemeral range, where picked
/// ports can be taken by outgoing connections before the app binds them.
pub fn port_range_warning(plan: &PortPlan) -> Option<String> {
    let PortPlan::Pick { count, range } = plan else {
        return None;
    };
    let ephemeral = ephemeral_ports()?;
    let outside = range
        .clone()
        .filter(|p| !ephemeral.contains(p))
        .take(2 * count)
        .count();
    (outside < 2 * count).then(|| {
        format!(
            "port_range {}-{} lies mostly inside the kernel's ephemeral port range {}-{} \
             (net.ipv4.ip_local_port_range): an outgoing connection can take a picked port \
             before the app binds it, and that roll fails; a range such as 20000-29999 avoids it",
            range.start(),
            range.end(),
            ephemeral.start(),
            ephemeral.end()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worksets_alternate_and_never_overlap_the_serving_set() {
        let plan = PortPlan::Worksets(vec![vec![1, 2], vec![3, 4]]);
        assert_eq!(next_ports(&plan, 0, &[]), Ok(vec![1, 2]));
        assert_eq!(next_ports(&plan, 1, &[1, 2]), Ok(vec![3, 4]));
        assert_eq!(next_ports(&plan, 2, &[3, 4]), Ok(vec![1, 2]));
        assert!(next_ports(&plan, 0, &[1, 2]).is_err());
    }

    #[test]
    fn picked_ports_are_free_and_avoid_the_serving_set() {
        let ports = pick_free_ports(3, 40000..=40100, &[40000, 40001]).expect("free ports");
        assert_eq!(ports.len(), 3);
        assert!(ports.iter().all(|p| (40002..=40100).contains(p)));
        assert!(pick_free_ports(5, 40000..=40001, &[]).is_err());
    }

    /// `n` consecutive ports that nothing listens on now, at or above `from` (which the
    /// tests keep below the kernel's ephemeral range and the integration tests' ports,
    /// so no outgoing connection takes one meanwhile).
    fn free_run(n: u16, from: u16) -> u16 {
        (from..from + 1000)
            .find(|&start| {
                (start..start + n).all(|p| std::net::TcpListener::bind(("0.0.0.0", p)).is_ok())
            })
            .expect("a run of free ports")
    }

    /// Every port of the range is a candidate, its last one too, and none twice: asked
    /// for all of a small range's ports, the pick returns each of them once, whatever
    /// port the scan starts at.
    #[test]
    fn a_pick_can_take_every_port_of_its_range_once() {
        let start = free_run(4, 9000);
        let range = start..=start + 3;
        for _ in 0..20 {
            let mut ports = pick_free_ports(4, range.clone(), &[]).expect("four free ports");
            ports.sort_unstable();
            assert_eq!(ports, range.clone().collect::<Vec<_>>());
        }
        let last = pick_free_ports(1, range.clone(), &[start, start + 1, start + 2]);
        assert_eq!(last, Ok(vec![start + 3]));
    }

    /// The warning comes only when too few ports of the range lie outside the ephemeral
    /// range: twice the ports a roll picks.
    #[test]
    fn port_range_warning_counts_the_ports_outside_the_ephemeral_range() {
        let ephemeral = ephemeral_ports().expect("/proc/sys/net/ipv4/ip_local_port_range");
        let first = *ephemeral.start();
        assert!(first > 1100, "ephemeral ports start at {first}");
        let pick = |count, range| PortPlan::Pick { count, range };
        // 8 ports outside for 4 picked: enough.
        assert_eq!(port_range_warning(&pick(4, first - 8..=first + 100)), None);
        // 7 outside: too few.
        let warning = port_range_warning(&pick(4, first - 7..=first + 100));
        assert!(
            warning
                .as_deref()
                .is_some_and(|w| w.contains("ephemeral port range")),
            "{warning:?}"
        );
        assert_eq!(
            port_range_warning(&PortPlan::Worksets(vec![vec![first]])),
            None
        );
    }

    #[test]
    fn picked_ports_avoid_the_ephemeral_range_while_others_are_free() {
        let ephemeral = ephemeral_ports().expect("/proc/sys/net/ipv4/ip_local_port_range");
        let first = *ephemeral.start();
        assert!(first > 1100, "ephemeral ports start at {first}");
        let range = first - 60..=first + 60;
        let ports = pick_free_ports(4, range, &[]).expect("free ports");
        assert!(ports.iter().all(|p| *p < first), "{ports:?} vs {first}");
    }
}

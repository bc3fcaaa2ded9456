//! The supervisor: the one owner of rolld's mutable state (the config, the serving
//! generation, the proxy's upstreams). One loop takes operator commands and roll
//! results; a roll runs as a task that owns the serving generation until it ends.

use std::sync::Arc;
use std::time::Duration;

use rolld_proxy::tls::Tls;
use rolld_proxy::{Front, Proxy, Upstreams};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::cgroup::Hierarchy;
use crate::config::{Config, PortPlan};
use crate::generation::{Context, Generation, StopHow};
use crate::guard::Guard;
use crate::notify;
use crate::output;
use crate::process::{Reaper, Spawner};
use crate::rolling::{Roll, Rolled};
use crate::rollout::{Decision, Operator, Phase};
use crate::signals::{Command, RollEvent, StopFrom, Watcher};
use crate::status::Board;

/// Why rolld stopped other than by a clean shutdown.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the first set did not start: {0}")]
    FirstSetFailed(String),
    #[error("stopped at once by a second signal")]
    Forced,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub struct Supervisor {
    config: Config,
    ctx: Arc<Context>,
    /// The built-in proxy, when `listen` or `tls` is set.
    proxy: Option<Arc<Proxy>>,
    /// The TLS listener's settings and certificates, when `tls` is set.
    tls: Option<Arc<Tls>>,
    upstreams: Option<Arc<Upstreams>>,
    current: Option<Generation>,
    next_id: u64,
    /// The workset of the next roll.
    workset: usize,
    shutdown: watch::Sender<Option<StopHow>>,
    /// Tells a roll in progress that rolld is shutting down.
    cancel_roll: watch::Sender<bool>,
    /// Operator decisions for the roll in progress (its canary or bake).
    operator: mpsc::UnboundedSender<Operator>,
    alive: mpsc::Receiver<()>,
}

impl Supervisor {
    pub fn new(
        config: Config,
        guard: Arc<Guard>,
        board: Arc<Board>,
        cgroups: Option<Arc<Hierarchy>>,
    ) -> std::io::Result<Supervisor> {
        let (shutdown, shutdown_rx) = watch::channel(None);
        let (alive_tx, alive) = mpsc::channel(1);
        let reaper = Reaper::start()?;
        tokio::spawn(watch_guard(guard.clone(), reaper.clone()));
        board.set_cgroups(cgroups.clone());
        let ctx = Arc::new(Context {
            spawner: Spawner::start()?,
            reaper,
            guard,
            board,
            cgroups,
            shutdown: shutdown_rx,
            alive: alive_tx,
        });
        let upstreams = config.proxied().then(|| Arc::new(Upstreams::new()));
        let proxy = upstreams
            .as_ref()
            .map(|u| Arc::new(Proxy::new(u.clone(), config.proxy.clone())));
        let tls = match &config.tls {
            Some(settings) => {
                let certificates: Vec<_> = settings
                    .loaded
                    .iter()
                    .map(|l| l.certificate.clone())
                    .collect();
                let tls = Tls::new(&certificates, settings.handshake_timeout, settings.hsts)
                    .map_err(|e| std::io::Error::other(format!("TLS: {e}")))?;
                ctx.board
                    .set_certificates(settings.loaded.iter().map(|l| l.info.clone()).collect());
                Some(Arc::new(tls))
            }
            None => None,
        };
        Ok(Supervisor {
            proxy,
            tls,
            upstreams,
            config,
            ctx,
            current: None,
            next_id: 1,
            workset: 0,
            shutdown,
            cancel_roll: watch::channel(false).0,
            operator: mpsc::unbounded_channel().0,
            alive,
        })
    }

    /// The built-in proxy, if there is one.
    pub fn proxy(&self) -> Option<&Arc<Proxy>> {
        self.proxy.as_ref()
    }

    /// The TLS listener's state, if `tls` is set.
    pub fn tls(&self) -> Option<&Arc<Tls>> {
        self.tls.as_ref()
    }

    /// Runs until shutdown. `listener` is the bound front listener, if `listen` is set;
    /// `tls_listener` the TLS one, if `tls` is.
    pub async fn run(
        mut self,
        listener: Option<rolld_proxy::Listener>,
        tls_listener: Option<rolld_proxy::Listener>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) -> Result<(), RunError> {
        let mut fronts = Vec::new();
        if let Some(listener) = listener {
            let front = match &self.config.tls {
                Some(tls) if tls.redirect_http => Front::RedirectToHttps {
                    https_port: tls.listen.port(),
                },
                _ => Front::Plain,
            };
            fronts.push((listener, front));
        }
        if let (Some(listener), Some(tls)) = (tls_listener, &self.tls) {
            fronts.push((listener, Front::Tls(tls.clone())));
        }
        let (stop_accepting, server) = match &self.proxy {
            Some(proxy) if !fronts.is_empty() => {
                let proxy = proxy.clone();
                let (tx, rx) = oneshot::channel::<Duration>();
                let shutdown = async move { rx.await.unwrap_or(Duration::ZERO) };
                let server = tokio::spawn(rolld_proxy::serve_fronts(fronts, proxy, shutdown));
                (Some(tx), Some(server))
            }
            _ => (None, None),
        };
        let expiry = self.tls.is_some().then(|| {
            let board = self.ctx.board.clone();
            tokio::spawn(async move {
                // At start, then twice a day.
                let mut tick = tokio::time::interval(Duration::from_secs(12 * 3600));
                loop {
                    tick.tick().await;
                    crate::tls::warn_expiring(&board.certificates(), std::time::SystemTime::now());
                }
            })
        });

        let mut roll = Some(self.start_roll(self.config.clone(), Vec::new()));
        let mut first = true;
        // Asked for while a roll runs: one more roll after it, and who waits for it.
        let mut queued: Option<Vec<Watcher>> = None;
        let mut first_failed = None;
        let mut stopped_by = None;
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Roll { watcher }) if roll.is_some() => {
                        if self.ctx.board.rollout_phase() == Some(Phase::Bake) {
                            // The release under bake is the base of the next one.
                            info!("a roll is asked for during the bake: promoting the new set first");
                            let _ = self.operator.send(Operator { decision: Decision::Promote, reply: None });
                        }
                        info!("a roll is in progress; one more is queued after it");
                        let waiting = queued.get_or_insert_with(Vec::new);
                        waiting.extend(watcher);
                    }
                    Some(Command::Rollout { decision, reply }) => {
                        match self.ctx.board.rollout_phase() {
                            Some(_) if roll.is_some() => {
                                if let Err(refused) = self.operator.send(Operator { decision, reply: Some(reply) }) {
                                    if let Some(reply) = refused.0.reply {
                                        let _ = reply.send(Err("the rollout has ended".into()));
                                    }
                                }
                            }
                            _ => {
                                let _ = reply.send(Err("no canary or bake in progress".into()));
                            }
                        }
                    }
                    Some(Command::Roll { watcher }) => roll = self.reload(watcher.into_iter().collect()),
                    Some(Command::ReopenLogs) => {
                        output::REOPEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        info!("reopening process log files");
                    }
                    Some(Command::Shutdown(from)) => {
                        stopped_by = Some(from);
                        break;
                    }
                    None => break,
                },
                rolled = async { roll.as_mut().expect("guarded by `if roll.is_some()`").await }, if roll.is_some() => {
                    roll = None;
                    let rolled = rolled.unwrap_or_else(|join| Rolled {
                        current: None,
                        outcome: Err(format!("roll task failed: {join}")),
                        watchers: Vec::new(),
                        swapped: false,
                    });
                    if rolled.swapped {
                        self.workset += 1;
                    }
                    self.current = rolled.current;
                    let (ok, message) = match &rolled.outcome {
                        Ok(message) => (true, message.clone()),
                        Err(why) => (false, why.clone()),
                    };
                    for watcher in rolled.watchers {
                        let _ = watcher.send(RollEvent::Done { ok, message: message.clone() });
                    }
                    match rolled.outcome {
                        Ok(_) => notify::notify("READY=1"),
                        Err(why) if first => {
                            first_failed = Some(why);
                            break;
                        }
                        Err(_) => notify::notify("READY=1"),
                    }
                    first = false;
                    if let Some(watchers) = queued.take() {
                        roll = self.reload(watchers);
                    }
                }
            }
        }

        info!("shutting down");
        notify::notify("STOPPING=1");
        if let Some(watchers) = queued {
            for watcher in watchers {
                let _ = watcher.send(RollEvent::Done {
                    ok: false,
                    message: "rolld is shutting down".into(),
                });
            }
        }
        if let Some(expiry) = expiry {
            expiry.abort();
        }
        self.shutdown(stop_accepting, server, roll, stopped_by, &mut commands)
            .await?;
        match first_failed {
            Some(why) => Err(RunError::FirstSetFailed(why)),
            None => Ok(()),
        }
    }

    /// Re-reads the config file and starts a roll; an invalid file refuses the roll and
    /// tells the watchers why.
    fn reload(&mut self, watchers: Vec<Watcher>) -> Option<JoinHandle<Rolled>> {
        match self.reread() {
            Ok(config) => {
                notify::reloading();
                Some(self.start_roll(config, watchers))
            }
            Err(why) => {
                let generation = self.next_id;
                self.ctx
                    .board
                    .roll_ended(generation, "refused", why.clone(), Duration::ZERO);
                for watcher in watchers {
                    let _ = watcher.send(RollEvent::Done {
                        ok: false,
                        message: why.clone(),
                    });
                }
                None
            }
        }
    }

    fn reread(&mut self) -> Result<Config, String> {
        match Config::load(&self.config.path) {
            Ok(mut config) => {
                // These are set up once, at start; a roll keeps what runs.
                let tls_listener = |c: &Config| c.tls.as_ref().map(|t| t.listener_settings());
                let fixed = [
                    ("listen", config.listen != self.config.listen),
                    (
                        "tls (listen, redirect_http, hsts, handshake_timeout)",
                        tls_listener(&config) != tls_listener(&self.config),
                    ),
                    ("proxy", config.proxy != self.config.proxy),
                    ("user/group", config.run_as != self.config.run_as),
                    (
                        "control_socket",
                        config.control_socket != self.config.control_socket,
                    ),
                    ("admin", config.admin != self.config.admin),
                ];
                for (key, changed) in fixed {
                    if changed {
                        warn!("`{key}` changed in the config file; that takes a restart of rolld, the running one keeps its setting");
                    }
                }
                config.listen = self.config.listen;
                self.rotate_certificates(&mut config);
                config.proxy = self.config.proxy.clone();
                config.run_as = self.config.run_as.clone();
                config.control_socket = self.config.control_socket.clone();
                config.admin = self.config.admin;
                if config.app.ports != self.config.app.ports {
                    // A new list of worksets goes on after the serving set if it lists
                    // it, else starts from its first set.
                    self.workset = match &config.app.ports {
                        PortPlan::Worksets(sets) => self
                            .current
                            .as_ref()
                            .and_then(|g| sets.iter().position(|s| *s == g.ports))
                            .map_or(0, |i| i + 1),
                        PortPlan::Pick { .. } => 0,
                    };
                }
                self.config = config.clone();
                Ok(config)
            }
            Err(err) => {
                let why =
                    format!("roll refused: {err}; nothing changed, the current set keeps serving");
                error!("{why}");
                Err(why)
            }
        }
    }

    /// Serves the certificates `config` read to new handshakes (the files are read
    /// anew at each reload, so a renewed certificate under the same path is picked up),
    /// and keeps the listener's other settings as they were at start. A `tls:` section
    /// added or removed takes a restart.
    fn rotate_certificates(&mut self, config: &mut Config) {
        let (Some(tls), Some(new)) = (&self.tls, config.tls.as_mut()) else {
            config.tls = self.config.tls.clone();
            return;
        };
        let certificates: Vec<_> = new.loaded.iter().map(|l| l.certificate.clone()).collect();
        match tls.rotate(&certificates) {
            Ok(()) => {
                let infos: Vec<_> = new.loaded.iter().map(|l| l.info.clone()).collect();
                for info in &infos {
                    info!(cert = %info.cert.display(), names = ?info.names, expires = %info.expires(), "TLS certificate loaded for new connections");
                }
                crate::tls::warn_expiring(&infos, std::time::SystemTime::now());
                self.ctx.board.set_certificates(infos);
            }
            Err(err) => {
                warn!("TLS certificates not rotated ({err}); the current ones keep serving");
                return;
            }
        }
        if let Some(old) = &self.config.tls {
            new.listen = old.listen;
            new.redirect_http = old.redirect_http;
            new.hsts = old.hsts;
            new.handshake_timeout = old.handshake_timeout;
        }
    }

    fn start_roll(&mut self, config: Config, watchers: Vec<Watcher>) -> JoinHandle<Rolled> {
        let id = self.next_id;
        self.next_id += 1;
        let (operator, decisions) = mpsc::unbounded_channel();
        self.operator = operator;
        let roll = Roll {
            operator: decisions,
            ctx: self.ctx.clone(),
            config,
            upstreams: self.upstreams.clone(),
            current: self.current.take(),
            id,
            workset: self.workset,
            watchers,
            cancel: self.cancel_roll.subscribe(),
        };
        tokio::spawn(roll.run())
    }

    /// Graceful shutdown: stop accepting and stop a roll in progress, let in-flight
    /// requests finish (up to `drain_timeout`), then stop every process and wait until
    /// all are reaped. A second SIGTERM/SIGINT ends it at once; `rolld stop` never does.
    async fn shutdown(
        self,
        stop_accepting: Option<oneshot::Sender<Duration>>,
        server: Option<JoinHandle<std::io::Result<()>>>,
        roll: Option<JoinHandle<Rolled>>,
        stopped_by: Option<StopFrom>,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Result<(), RunError> {
        let Supervisor {
            config,
            ctx,
            upstreams,
            mut current,
            shutdown,
            cancel_roll,
            mut alive,
            proxy,
            ..
        } = self;
        drop(proxy);
        // Requests held by a pause go to the set still serving, within the drain.
        if let Some(upstreams) = &upstreams {
            if upstreams.resume(None) {
                info!("shutting down: the pause ends, held requests are released");
            }
        }
        let drain_timeout = config.app.drain_timeout;
        let how = StopHow::from_config(&config);
        let graceful = async move {
            let deadline = crate::process::deadline_in(drain_timeout);
            // New clients are refused from now on.
            if let Some(stop) = stop_accepting {
                let _ = stop.send(drain_timeout);
            }
            // A roll that has not swapped stops its new set and hands back the old one;
            // one past its swap finishes draining and stopping its old set.
            cancel_roll.send_replace(true);
            if let Some(roll) = roll {
                match roll.await {
                    Ok(rolled) => {
                        current = rolled.current;
                        let (ok, message) = match rolled.outcome {
                            Ok(message) => (true, message),
                            Err(why) => (false, why),
                        };
                        for watcher in rolled.watchers {
                            let _ = watcher.send(RollEvent::Done {
                                ok,
                                message: message.clone(),
                            });
                        }
                    }
                    Err(join) => warn!("roll task: {join}"),
                }
            }
            if let Some(server) = server {
                match server.await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => warn!("front listener: {err}"),
                    Err(err) => warn!("front listener task: {err}"),
                }
            }
            // Upgraded connections outlive their HTTP connection; wait for them too.
            if let Some(upstreams) = upstreams {
                let mut drain = upstreams.swap(Arc::new(rolld_proxy::UpstreamSet::empty()));
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if let Err(cut) = drain.wait_timeout(left).await {
                    warn!(
                        "drain_timeout passed with {} request(s) in flight; cutting them",
                        cut.in_flight
                    );
                }
            }
            let _ = shutdown.send(Some(how));
            if let Some(current) = current {
                current.terminate(how).await;
            }
            // Every keeper holds the context; its `alive` sender goes with the last one.
            drop(ctx);
            while alive.recv().await.is_some() {}
            drop(shutdown);
        };
        tokio::select! {
            () = graceful => {
                info!("all processes stopped");
                Ok(())
            }
            () = second_signal(commands, stopped_by == Some(StopFrom::Signal)) => Err(RunError::Forced),
        }
    }
}

/// Resolves on the second SIGTERM/SIGINT of the shutdown (`signalled`: the shutdown
/// began with one). `rolld stop` neither escalates nor counts: scripts and service
/// managers repeat themselves, only a person's second signal means "now".
async fn second_signal(commands: &mut mpsc::UnboundedReceiver<Command>, mut signalled: bool) {
    loop {
        match commands.recv().await {
            Some(Command::Shutdown(StopFrom::Signal)) if signalled => return,
            Some(Command::Shutdown(StopFrom::Signal)) => {
                signalled = true;
                info!("already stopping gracefully; a second signal stops at once");
            }
            Some(Command::Shutdown(StopFrom::Control)) => {
                info!("already stopping gracefully");
            }
            Some(_) => {}
            None => std::future::pending().await,
        }
    }
}

/// Restarts the guard whenever it dies (someone killed it): without it, a SIGKILL of
/// rolld would leave forked workers and daemons behind. At most once a second, so a
/// guard that cannot run does not spin.
async fn watch_guard(guard: Arc<Guard>, reaper: Reaper) {
    loop {
        let pid = guard.pid();
        let Ok(exit) = reaper.wait(pid).await else {
            return;
        };
        error!(
            guard = pid.as_raw(),
            "the guard process died ({exit}); starting a new one"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        match guard.restart() {
            Ok(new) => warn!(guard = new.as_raw(), "guard process restarted"),
            Err(err) => {
                error!(error = %err, "cannot restart the guard process: if rolld is killed now, forked workers and daemons of the apps may survive it");
                return;
            }
        }
    }
}

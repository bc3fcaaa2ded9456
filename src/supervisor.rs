//! The supervisor: the one owner of rolld's mutable state (the config, the serving
//! generation, the proxy's upstreams). One loop takes operator commands and roll
//! results; a roll runs as a task that owns the serving generation until it ends.

use std::sync::Arc;
use std::time::Duration;

use rolld_proxy::{Proxy, Upstreams};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::{Config, PortPlan};
use crate::generation::{Context, Generation, StopHow};
use crate::guard::Guard;
use crate::output;
use crate::process::{Reaper, Spawner};
use crate::rolling::{Roll, Rolled};
use crate::signals::Command;

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
    upstreams: Option<Arc<Upstreams>>,
    current: Option<Generation>,
    next_id: u64,
    /// The workset of the next roll.
    workset: usize,
    shutdown: watch::Sender<Option<StopHow>>,
    alive: mpsc::Receiver<()>,
}

impl Supervisor {
    pub fn new(config: Config, guard: Arc<Guard>) -> std::io::Result<Supervisor> {
        let (shutdown, shutdown_rx) = watch::channel(None);
        let (alive_tx, alive) = mpsc::channel(1);
        let ctx = Arc::new(Context {
            spawner: Spawner::start()?,
            reaper: Reaper::start()?,
            guard,
            shutdown: shutdown_rx,
            alive: alive_tx,
        });
        Ok(Supervisor {
            upstreams: config.listen.map(|_| Arc::new(Upstreams::new())),
            config,
            ctx,
            current: None,
            next_id: 1,
            workset: 0,
            shutdown,
            alive,
        })
    }

    /// Runs until shutdown. `listener` is the bound front listener, if `listen` is set.
    pub async fn run(
        mut self,
        listener: Option<std::net::TcpListener>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) -> Result<(), RunError> {
        let (stop_accepting, server) = match (listener, &self.upstreams) {
            (Some(listener), Some(upstreams)) => {
                let proxy = Arc::new(Proxy::new(upstreams.clone(), self.config.proxy.clone()));
                let (tx, rx) = oneshot::channel::<Duration>();
                let shutdown = async move { rx.await.unwrap_or(Duration::ZERO) };
                let server = tokio::spawn(rolld_proxy::serve(listener, proxy, shutdown));
                (Some(tx), Some(server))
            }
            _ => (None, None),
        };

        let mut roll = Some(self.start_roll(self.config.clone()));
        let mut first = true;
        let mut queued = false;
        let mut first_failed = None;
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Roll) if roll.is_some() => {
                        queued = true;
                        info!("a roll is in progress; one more is queued after it");
                    }
                    Some(Command::Roll) => roll = self.reload().map(|config| self.start_roll(config)),
                    Some(Command::ReopenLogs) => {
                        output::REOPEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        info!("reopening process log files");
                    }
                    Some(Command::Shutdown) | None => break,
                },
                rolled = async { roll.as_mut().expect("guarded by `if roll.is_some()`").await }, if roll.is_some() => {
                    roll = None;
                    let rolled = rolled.unwrap_or_else(|join| Rolled {
                        current: None,
                        outcome: Err(format!("roll task failed: {join}")),
                    });
                    self.current = rolled.current;
                    match rolled.outcome {
                        Ok(()) => self.workset += 1,
                        Err(why) if first => {
                            first_failed = Some(why);
                            break;
                        }
                        Err(_) => {}
                    }
                    first = false;
                    if std::mem::take(&mut queued) {
                        roll = self.reload().map(|config| self.start_roll(config));
                    }
                }
            }
        }

        info!("shutting down");
        self.shutdown(stop_accepting, server, roll, &mut commands)
            .await?;
        match first_failed {
            Some(why) => Err(RunError::FirstSetFailed(why)),
            None => Ok(()),
        }
    }

    /// Re-reads the config file for a roll; an invalid file refuses the roll.
    fn reload(&mut self) -> Option<Config> {
        match Config::load(&self.config.path) {
            Ok(mut config) => {
                if config.listen != self.config.listen {
                    warn!("`listen` changed in the config file; that takes a restart of rolld, the listener stays as it was");
                    config.listen = self.config.listen;
                }
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
                Some(config)
            }
            Err(err) => {
                error!("roll refused: {err}; nothing changed, the current set keeps serving");
                None
            }
        }
    }

    fn start_roll(&mut self, config: Config) -> JoinHandle<Rolled> {
        let id = self.next_id;
        self.next_id += 1;
        let roll = Roll {
            ctx: self.ctx.clone(),
            config,
            upstreams: self.upstreams.clone(),
            current: self.current.take(),
            id,
            workset: self.workset,
        };
        tokio::spawn(roll.run())
    }

    /// Graceful shutdown: stop accepting, let in-flight requests finish (up to
    /// `drain_timeout`), then stop every process and wait until all are reaped.
    /// A second SIGTERM/SIGINT ends it at once.
    async fn shutdown(
        self,
        stop_accepting: Option<oneshot::Sender<Duration>>,
        server: Option<JoinHandle<std::io::Result<()>>>,
        roll: Option<JoinHandle<Rolled>>,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Result<(), RunError> {
        let Supervisor {
            config,
            ctx,
            upstreams,
            current,
            shutdown,
            mut alive,
            ..
        } = self;
        let drain_timeout = config.app.drain_timeout;
        let how = StopHow::from_config(&config);
        let graceful = async move {
            let deadline = tokio::time::Instant::now() + drain_timeout;
            if let (Some(stop), Some(server)) = (stop_accepting, server) {
                let _ = stop.send(drain_timeout);
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
            if let Some(roll) = roll {
                // Dropping a roll's generations stops their processes.
                roll.abort();
                let _ = roll.await;
            }
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
            () = second_signal(commands) => Err(RunError::Forced),
        }
    }
}

async fn second_signal(commands: &mut mpsc::UnboundedReceiver<Command>) {
    loop {
        match commands.recv().await {
            Some(Command::Shutdown) => return,
            Some(_) => {}
            None => std::future::pending().await,
        }
    }
}

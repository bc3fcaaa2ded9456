//! `after_start` actions for a balancer other than rolld's own proxy (nginx mode):
//! render upstream files from Jinja templates and run reload commands, and undo both
//! when a roll fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use minijinja::{context, Environment, UndefinedBehavior};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tracing::{error, info, warn};

use crate::config::Action;
use crate::generation::Context;
use crate::output::{self, Sink};
use crate::process::{self, Spec};

/// Longest time a `run_proc` command may take.
pub const RUN_PROC_TIMEOUT: Duration = Duration::from_secs(60);

/// The names a template can use.
const TEMPLATE_VARIABLES: [&str; 4] = ["ports", "numprocs", "upstreams", "generation"];

/// Renders `template` with the new set's ports. Errors name the file, line and problem;
/// a variable rolld does not provide is named (the original's Jinja2 rendered it empty,
/// rolld refuses it: a misspelt variable would otherwise empty the upstream list).
pub fn render(template: &Path, ports: &[u16], generation: u64) -> Result<String, String> {
    let source = std::fs::read_to_string(template)
        .map_err(|e| format!("cannot read template {}: {e}", template.display()))?;
    let name = template.display().to_string();
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    let describe = |e: &minijinja::Error| {
        let line = e.line().map_or_else(String::new, |l| format!(" line {l}"));
        let detail = e
            .detail()
            .map_or_else(|| e.kind().to_string(), |d| format!("{}: {d}", e.kind()));
        format!("template {name}{line}: {detail}")
    };
    env.add_template_owned(name.clone(), source)
        .map_err(|e| describe(&e))?;
    let tmpl = env.get_template(&name).map_err(|e| describe(&e))?;
    let upstreams: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    tmpl.render(context! { ports => ports, numprocs => ports, upstreams => upstreams, generation => generation })
        .map_err(|e| {
            if e.kind() != minijinja::ErrorKind::UndefinedError {
                return describe(&e);
            }
            let globals: Vec<&str> = env.globals().map(|(n, _)| n).collect();
            let mut unknown: Vec<String> = tmpl
                .undeclared_variables(false)
                .into_iter()
                .filter(|v| !TEMPLATE_VARIABLES.contains(&v.as_str()) && !globals.contains(&v.as_str()))
                .collect();
            unknown.sort();
            let line = e.line().map_or_else(String::new, |l| format!(" line {l}"));
            match unknown.as_slice() {
                [] => describe(&e),
                names => format!(
                    "template {name}{line}: undefined variable {} (the variables are {})",
                    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "),
                    TEMPLATE_VARIABLES.join(", ")
                ),
            }
        })
}

/// Writes `content` to `path` through a temporary file and a rename, so that a reader
/// sees the old file or the new one, never half of one.
///
/// rolld may run this as root in a folder others can write to, so the temporary file
/// has an unpredictable name and is created with `O_EXCL|O_NOFOLLOW` (a planted file or
/// symlink makes it fail, never redirects it); it gets the replaced file's mode and
/// owner through its descriptor, reaches the disk before the rename, and is removed
/// when anything fails.
pub fn write_atomically(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let file_name = path
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    // The replaced file's mode and owner; a symlink there is replaced by a file.
    let before = std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.file_type().is_file());
    let tmp = dir.join(format!(
        ".{file_name}.rolld-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)?;
    let written = (|| {
        match &before {
            Some(meta) => {
                file.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
                let owner = nix::unistd::Uid::from_raw(meta.uid());
                let group = nix::unistd::Gid::from_raw(meta.gid());
                if owner != nix::unistd::geteuid() || group != nix::unistd::getegid() {
                    // Only root can give a file away; anyone else writes their own.
                    if let Err(e) =
                        std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()))
                    {
                        warn!(path = %path.display(), "cannot keep the file's owner: {e}");
                    }
                }
            }
            None => file.set_permissions(std::fs::Permissions::from_mode(0o644))?,
        }
        file.write_all(content)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return written;
    }
    // The rename itself, on disk.
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// What a file looked like before an action replaced it.
struct Replaced {
    path: PathBuf,
    before: Option<Vec<u8>>,
}

/// Runs `actions` in order for a new generation. On failure, undoes what was done:
/// restores every replaced file and runs the reload commands again, so the balancer
/// points at the old set; the caller then stops the new set.
pub async fn run_after_start(
    ctx: &Context,
    actions: &[Action],
    directory: &Path,
    ports: &[u16],
    generation: u64,
) -> Result<(), String> {
    let mut replaced = Vec::new();
    let mut reloaded = false;
    for action in actions {
        let result = match action {
            Action::ReplaceFile { template, output } => {
                replace_file(template, output, ports, generation, &mut replaced)
            }
            Action::RunProc { command } => {
                reloaded = true;
                run_proc(ctx, command, directory).await
            }
        };
        if let Err(why) = result {
            rollback(ctx, actions, directory, replaced, reloaded).await;
            return Err(format!("after_start: {why}"));
        }
    }
    Ok(())
}

fn replace_file(
    template: &Path,
    output: &Path,
    ports: &[u16],
    generation: u64,
    replaced: &mut Vec<Replaced>,
) -> Result<(), String> {
    let rendered = render(template, ports, generation)?;
    let before = std::fs::read(output).ok();
    write_atomically(output, rendered.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", output.display()))?;
    info!(generation, output = %output.display(), "rendered {}", template.display());
    replaced.push(Replaced {
        path: output.to_path_buf(),
        before,
    });
    Ok(())
}

async fn rollback(
    ctx: &Context,
    actions: &[Action],
    directory: &Path,
    replaced: Vec<Replaced>,
    reloaded: bool,
) {
    let restored = !replaced.is_empty();
    for file in replaced.into_iter().rev() {
        let result = match &file.before {
            Some(before) => write_atomically(&file.path, before),
            None => std::fs::remove_file(&file.path),
        };
        match result {
            Ok(()) => info!(path = %file.path.display(), "restored the previous file"),
            Err(e) => error!(path = %file.path.display(), "cannot restore the previous file: {e}"),
        }
    }
    if restored || reloaded {
        for action in actions {
            if let Action::RunProc { command } = action {
                if let Err(why) = run_proc(ctx, command, directory).await {
                    error!("rollback: {why}; the balancer may still point at the failed set");
                }
            }
        }
    }
}

/// Runs `command` through `sh -c` in `directory`, its output in rolld's log; a non-zero
/// exit or a timeout fails it.
pub async fn run_proc(ctx: &Context, command: &str, directory: &Path) -> Result<(), String> {
    let spec = Spec {
        argv: vec!["sh".into(), "-c".into(), command.into()],
        directory: directory.to_path_buf(),
        environment: Vec::new(),
        capture_output: true,
        cgroup: None,
    };
    let mut child = ctx
        .spawner
        .spawn(spec)
        .await
        .map_err(|e| format!("run_proc `{command}`: cannot start: {e}"))?;
    let pid = Pid::from_raw(child.id() as i32);
    ctx.guard.watch(pid);
    let mut exit = ctx.reaper.wait(pid);
    for fd in [
        child.stdout.take().map(std::os::fd::OwnedFd::from),
        child.stderr.take().map(Into::into),
    ]
    .into_iter()
    .flatten()
    {
        output::capture(fd, 0, Sink::Log);
    }
    info!("run_proc `{command}`");
    // What the command leaves running once it exited is its business: a command that
    // starts a daemon (`nginx`) must not see it killed as it detaches.
    let ended = tokio::time::timeout(RUN_PROC_TIMEOUT, &mut exit).await;
    if ended.is_ok() {
        ctx.guard.forget(pid);
    }
    match ended {
        Ok(Ok(process::Exit::Code(0))) => Ok(()),
        Ok(Ok(status)) => Err(format!("run_proc `{command}` failed ({status})")),
        Ok(Err(_)) => Err(format!("run_proc `{command}`: its exit was lost")),
        Err(_) => {
            warn!("run_proc `{command}` still running after {RUN_PROC_TIMEOUT:?}; killing it");
            process::terminate(
                process::Tree::group(pid),
                &mut exit,
                Signal::SIGKILL,
                Duration::ZERO,
                &ctx.guard,
            )
            .await;
            Err(format!(
                "run_proc `{command}` timed out after {RUN_PROC_TIMEOUT:?}"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("upstream.conf.templ");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn the_original_template_renders_unchanged() {
        let (_dir, path) =
            template("{% for port in ports %} server 127.0.0.1:{{port}}; {% endfor %}");
        let out = render(&path, &[8001, 8002], 3).expect("renders");
        assert_eq!(out, " server 127.0.0.1:8001;  server 127.0.0.1:8002; ");
    }

    #[test]
    fn upstreams_and_generation_are_available() {
        let (_dir, path) = template(
            "# generation {{ generation }}\n{% for u in upstreams %}server {{ u }};\n{% endfor %}",
        );
        let out = render(&path, &[9001], 7).expect("renders");
        assert_eq!(out, "# generation 7\nserver 127.0.0.1:9001;\n");
    }

    #[test]
    fn template_errors_name_the_file_and_line() {
        let (_dir, path) = template(
            "upstream app {\n{% for port in ports %}\n  server {{ prot }};\n{% endfor %}\n}\n",
        );
        let err = render(&path, &[1], 1).expect_err("undefined variable");
        assert!(
            err.contains("upstream.conf.templ")
                && err.contains("line 3")
                && err.contains("undefined variable `prot`"),
            "{err}"
        );
        let (_dir, path) = template("{% for port in ports %}\n{{ port }\n");
        let err = render(&path, &[1], 1).expect_err("syntax error");
        assert!(err.contains("line 2") && err.contains("syntax"), "{err}");
    }

    #[test]
    fn an_atomic_write_never_follows_a_planted_symlink() {
        let dir = tempfile::tempdir().expect("dir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").expect("write");
        let path = dir.path().join("out.conf");
        // Where a temporary file with a predictable name would go.
        let planted = dir
            .path()
            .join(format!(".out.conf.rolld-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).expect("symlink");
        write_atomically(&path, b"new").expect("write");
        assert_eq!(std::fs::read(&victim).expect("read"), b"precious");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
    }

    #[test]
    fn an_atomic_write_keeps_the_mode_and_owner_of_the_replaced_file() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("out.conf");
        std::fs::write(&path, b"old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let root = nix::unistd::geteuid().is_root();
        if root {
            std::os::unix::fs::chown(&path, Some(65534), Some(65534)).expect("chown");
        }
        write_atomically(&path, b"new").expect("write");
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.mode() & 0o7777, 0o640);
        if root {
            assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        }
    }

    #[test]
    fn a_failed_atomic_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("dir");
        // A non-empty folder where the file should go: the rename fails.
        let path = dir.path().join("out.conf");
        std::fs::create_dir(&path).expect("dir");
        std::fs::write(path.join("inside"), b"x").expect("write");
        assert!(write_atomically(&path, b"new").is_err());
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);
    }

    #[test]
    fn an_atomic_write_replaces_the_whole_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("sub/out.conf");
        write_atomically(&path, b"one").expect("write");
        write_atomically(&path, b"two").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub"))
                .expect("dir")
                .count(),
            1,
            "no temp file left"
        );
    }
}

//! The kernel's TCP tables: counting the connections an app process is serving, and
//! telling who listens on a port.
//!
//! Without its own proxy in front, rolld cannot count requests; it drains the old set by
//! waiting until no connection to the old set's ports is established any more: the
//! balancer (nginx, after a reload) has finished its requests there and closed them.
//!
//! A port can be taken by someone else (port squatting): before a process is started its
//! port must be free, and once it answers, the listening socket on its port must belong
//! to its process group; else the health check passed against a stranger.

use std::collections::HashSet;
use std::io;

/// TCP states that can still carry a request: established, and a handshake under way.
const ESTABLISHED: &str = "01";
const SYN_RECV: &str = "03";
const LISTEN: &str = "0A";

/// The TCP tables, IPv4 then IPv6 (absent on a kernel without IPv6).
fn tables() -> io::Result<Vec<String>> {
    let mut texts = Vec::with_capacity(2);
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match std::fs::read_to_string(table) {
            Ok(text) => texts.push(text),
            Err(e) if e.kind() == io::ErrorKind::NotFound && table.ends_with('6') => {}
            Err(e) => return Err(e),
        }
    }
    Ok(texts)
}

/// One row of a TCP table: local port, state, socket inode.
fn rows(table: &str) -> impl Iterator<Item = (u16, &str, u64)> {
    table.lines().skip(1).filter_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port = fields.get(1)?.rsplit(':').next()?;
        let port = u16::from_str_radix(port, 16).ok()?;
        Some((port, *fields.get(3)?, fields.get(9)?.parse().ok()?))
    })
}

/// Whether something already uses `port`: a socket listens on it, or it cannot be bound.
pub fn in_use(port: u16) -> bool {
    let listening = tables().is_ok_and(|tables| {
        tables
            .iter()
            .any(|t| rows(t).any(|(p, state, _)| p == port && state == LISTEN))
    });
    listening || std::net::TcpListener::bind(("0.0.0.0", port)).is_err()
}

/// Checks that every socket listening on `port` belongs to a process of group `pgid`.
/// Where the kernel's tables or a process's descriptors cannot be read, nothing is
/// claimed: the check passes.
pub fn check_owner(port: u16, pgid: i32) -> Result<(), String> {
    let Ok(tables) = tables() else {
        return Ok(());
    };
    let listeners: Vec<u64> = tables
        .iter()
        .flat_map(|t| rows(t).filter(|&(p, state, _)| p == port && state == LISTEN))
        .map(|(_, _, inode)| inode)
        .collect();
    if listeners.is_empty() {
        return Err(format!("nothing listens on port {port} any more"));
    }
    let Ok(owned) = group_sockets(pgid) else {
        return Ok(());
    };
    if listeners.iter().all(|inode| owned.contains(inode)) {
        Ok(())
    } else {
        Err(format!(
            "port {port} is answered by another process, not by the process group {pgid} \
             rolld started (port squatting?)"
        ))
    }
}

/// Socket inodes held by the processes of group `pgid`.
fn group_sockets(pgid: i32) -> io::Result<HashSet<u64>> {
    let mut inodes = HashSet::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let in_group = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                // After the command's closing parenthesis: state, ppid, pgrp.
                stat.rsplit(')')
                    .next()?
                    .split_whitespace()
                    .nth(2)?
                    .parse()
                    .ok()
            })
            == Some(pgid);
        if in_group {
            match socket_inodes(&format!("/proc/{pid}/fd")) {
                Ok(found) => inodes.extend(found),
                // It exited meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(inodes)
}

/// Socket inodes among the descriptors listed in `fd_dir` (`/proc/PID/fd`).
fn socket_inodes(fd_dir: &str) -> io::Result<HashSet<u64>> {
    let mut inodes = HashSet::new();
    for entry in std::fs::read_dir(fd_dir)?.flatten() {
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let link = link.to_string_lossy();
        if let Some(inode) = link
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
        {
            inodes.insert(inode);
        }
    }
    Ok(inodes)
}

/// Connections whose local port is one of `ports` and that can still carry a request,
/// over IPv4 and IPv6.
pub fn open_to(ports: &[u16]) -> io::Result<usize> {
    let ports: HashSet<u16> = ports.iter().copied().collect();
    let mut count = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match std::fs::read_to_string(table) {
            Ok(text) => count += count_in(&text, &ports),
            // A kernel without IPv6 has no tcp6 table.
            Err(e) if e.kind() == io::ErrorKind::NotFound && table.ends_with('6') => {}
            Err(e) => return Err(e),
        }
    }
    Ok(count)
}

fn count_in(table: &str, ports: &HashSet<u16>) -> usize {
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1);
            let state = fields.nth(1);
            let port = local
                .and_then(|l| l.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            matches!(state, Some(ESTABLISHED | SYN_RECV))
                && port.is_some_and(|p| ports.contains(&p))
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_established_connections_on_the_ports_only() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F41 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:1F41 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 0100007F:D431 0100007F:1F41 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
   3: 0100007F:1F42 0100007F:D432 06 00000000:00000000 00:00000000 00000000     0        0 0 3 0 0 0 0 0 0
";
        let ports: HashSet<u16> = [8001, 8002].into_iter().collect();
        assert_eq!(
            count_in(table, &ports),
            1,
            "one established server-side socket on 8001"
        );
    }

    #[test]
    fn a_listener_belongs_to_its_own_process_group_only() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert!(in_use(port));
        let ours = nix::unistd::getpgrp().as_raw();
        assert_eq!(check_owner(port, ours), Ok(()));
        let err = check_owner(port, i32::MAX).expect_err("not that group's");
        assert!(err.contains("another process"), "{err}");
        drop(listener);
        assert!(check_owner(port, ours).is_err(), "nobody listens");
    }

    #[test]
    fn a_real_connection_is_seen() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert_eq!(open_to(&[port]).expect("read tables"), 0);
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (_server, _) = listener.accept().expect("accept");
        assert_eq!(open_to(&[port]).expect("read tables"), 1);
    }
}

//! The kernel's TCP tables: counting the connections an app process is serving, and
//! telling who listens on a port.
//!
//! Without its own proxy in front, rolld cannot count requests; it drains the old set by
//! waiting until no connection to the old set's ports is established any more: the
//! balancer (nginx, after a reload) has finished its requests there and closed them.
//!
//! A port can be taken by someone else (port squatting): before a process is started its
//! port must be free (else its holder is found: a leftover of rolld's is stopped, a
//! stranger is named), and once it answers, the listening socket on its port must belong
//! to its processes; else the health check passed against a stranger.

use std::collections::HashSet;
use std::io;

use nix::unistd::Pid;

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

/// Listening sockets of a TCP table: local port and socket inode.
fn listening(table: &str) -> impl Iterator<Item = (u16, u64)> + '_ {
    connections(table)
        .filter(|(_, _, state, _)| *state == LISTEN)
        .map(|(local, _, _, inode)| (local.1, inode))
}

/// Listening TCP sockets (IPv4 and IPv6): local port and socket inode, asked of the
/// kernel over netlink (sock_diag, listeners only), which costs the same however many
/// other sockets the host has; `/proc/net/tcp` lists them all, thousands on a busy
/// host, and takes milliseconds per read. Falls back to those tables where netlink
/// cannot be used.
fn listeners() -> io::Result<Vec<(u16, u64)>> {
    match sock_diag_listeners() {
        Ok(found) => Ok(found),
        Err(_) => Ok(tables()?.iter().flat_map(|t| listening(t)).collect()),
    }
}

fn sock_diag_listeners() -> io::Result<Vec<(u16, u64)>> {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST};
    use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut found = Vec::new();
    for (family, id) in [
        (AF_INET, SocketId::new_v4()),
        (AF_INET6, SocketId::new_v6()),
    ] {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::LISTEN,
                socket_id: id,
            })
            .into(),
        );
        request.finalize();
        let mut buf = vec![0; request.buffer_len()];
        request.serialize(&mut buf);
        socket.send(&buf, 0)?;
        let mut received = vec![0; 64 * 1024];
        'dump: loop {
            let size = socket.recv(&mut &mut received[..], 0)?;
            let mut offset = 0;
            while offset < size {
                let message =
                    NetlinkMessage::<SockDiagMessage>::deserialize(&received[offset..size])
                        .map_err(|e| bad(format!("sock_diag answer: {e}")))?;
                let length = message.header.length as usize;
                match message.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                        found.push((
                            response.header.socket_id.source_port,
                            u64::from(response.header.inode),
                        ));
                    }
                    NetlinkPayload::Done(_) => break 'dump,
                    NetlinkPayload::Error(e) => return Err(bad(format!("sock_diag: {e:?}"))),
                    _ => {}
                }
                if length == 0 {
                    break;
                }
                offset += length;
            }
        }
    }
    Ok(found)
}

/// Whether something already uses `port`: it cannot be bound on all addresses (a
/// listener on any local address of the port makes that bind fail). No kernel table is
/// read: on a busy host those hold thousands of sockets and take milliseconds each.
pub fn in_use(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_err()
}

/// Checks that every socket listening on `port` belongs to one of `members`, the
/// processes of the app process `leader` (its group, its daemons). Where the kernel's
/// tables or a process's descriptors cannot be read, nothing is claimed: the check
/// passes.
pub fn check_owner(port: u16, leader: Pid, members: &[Pid]) -> Result<(), String> {
    check_owners(&[(port, leader, members.to_vec())])
}

/// [`check_owner`] for several ports at once, asking the kernel for its listeners once
/// for all of them: (port, leader, members) each.
pub fn check_owners(owners: &[(u16, Pid, Vec<Pid>)]) -> Result<(), String> {
    let Ok(listening) = listeners() else {
        return Ok(());
    };
    for (port, leader, members) in owners {
        let port = *port;
        let listeners: Vec<u64> = listening
            .iter()
            .filter(|&&(p, _)| p == port)
            .map(|&(_, inode)| inode)
            .collect();
        if listeners.is_empty() {
            return Err(format!("nothing listens on port {port} any more"));
        }
        let mut owned = HashSet::new();
        for pid in members {
            match socket_inodes(&format!("/proc/{pid}/fd")) {
                Ok(found) => owned.extend(found),
                // It exited meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(_) => return Ok(()),
            }
        }
        if !listeners.iter().all(|inode| owned.contains(inode)) {
            return Err(format!(
                "port {port} is answered by another process, not by the process {leader} rolld \
                 started or one it started (port squatting?)"
            ));
        }
    }
    Ok(())
}

/// The processes holding a socket that listens on `port`.
pub fn holders(port: u16) -> Vec<Pid> {
    let Ok(listening) = listeners() else {
        return Vec::new();
    };
    let wanted: HashSet<u64> = listening
        .iter()
        .filter(|&&(p, _)| p == port)
        .map(|&(_, inode)| inode)
        .collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            socket_inodes(&format!("/proc/{pid}/fd"))
                .is_ok_and(|inodes| inodes.iter().any(|i| wanted.contains(i)))
        })
        .map(Pid::from_raw)
        .collect()
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
/// over IPv4 and IPv6. rolld's own connections to those ports (its proxy's idle pooled
/// connections, a health check) are not counted: they are not a balancer's, and would
/// hold the drain until `drain_timeout`.
pub fn open_to(ports: &[u16]) -> io::Result<usize> {
    let ports: HashSet<u16> = ports.iter().copied().collect();
    let tables = tables()?;
    let own = socket_inodes("/proc/self/fd").unwrap_or_default();
    Ok(count_in(&tables, &ports, &own))
}

/// An address in a TCP table: the hex address (an IPv4-mapped IPv6 address as IPv4,
/// so both ends of a connection compare equal across the two tables) and the port.
type Addr<'a> = (&'a str, u16);

fn addr(field: &str) -> Option<Addr<'_>> {
    let (ip, port) = field.rsplit_once(':')?;
    let ip = ip.strip_prefix("0000000000000000FFFF0000").unwrap_or(ip);
    Some((ip, u16::from_str_radix(port, 16).ok()?))
}

/// One connection of a TCP table: local and remote address, state, socket inode.
fn connections(table: &str) -> impl Iterator<Item = (Addr<'_>, Addr<'_>, &str, u64)> {
    table.lines().skip(1).filter_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        Some((
            addr(fields.get(1)?)?,
            addr(fields.get(2)?)?,
            *fields.get(3)?,
            fields.get(9)?.parse().ok()?,
        ))
    })
}

fn count_in(tables: &[String], ports: &HashSet<u16>, own: &HashSet<u64>) -> usize {
    // The app's ends of rolld's own connections: (app's address, rolld's address).
    let ours: HashSet<(Addr<'_>, Addr<'_>)> = tables
        .iter()
        .flat_map(|t| connections(t))
        .filter(|(_, remote, _, inode)| own.contains(inode) && ports.contains(&remote.1))
        .map(|(local, remote, _, _)| (remote, local))
        .collect();
    tables
        .iter()
        .flat_map(|t| connections(t))
        .filter(|(local, remote, state, _)| {
            matches!(*state, ESTABLISHED | SYN_RECV)
                && ports.contains(&local.1)
                && !ours.contains(&(*local, *remote))
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
        let tables = [table.to_string()];
        assert_eq!(
            count_in(&tables, &ports, &HashSet::new()),
            1,
            "one established server-side socket on 8001"
        );
        // Socket 3 (the client end of that connection) is rolld's own.
        let own: HashSet<u64> = [3].into_iter().collect();
        assert_eq!(count_in(&tables, &ports, &own), 0, "rolld's own connection");
    }

    #[test]
    fn a_listener_belongs_to_the_processes_holding_it_only() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert!(in_use(port));
        let me = nix::unistd::getpid();
        assert_eq!(check_owner(port, me, &[me]), Ok(()));
        assert_eq!(holders(port), vec![me]);
        let other = Pid::from_raw(i32::MAX);
        let err = check_owner(port, other, &[other]).expect_err("not that process's");
        assert!(err.contains("another process"), "{err}");
        drop(listener);
        assert!(check_owner(port, me, &[me]).is_err(), "nobody listens");
        assert!(holders(port).is_empty());
    }

    #[test]
    fn netlink_finds_the_listeners_the_kernel_tables_list() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let v6 = std::net::TcpListener::bind("[::1]:0").ok();
        let from_tables: Vec<(u16, u64)> = tables()
            .expect("the kernel's tables")
            .iter()
            .flat_map(|t| listening(t).collect::<Vec<_>>())
            .collect();
        let from_netlink = sock_diag_listeners().expect("sock_diag answers");
        let ours = from_tables
            .iter()
            .find(|(p, _)| *p == port)
            .expect("listed in /proc/net/tcp");
        assert!(from_netlink.contains(ours), "{ours:?} in {from_netlink:?}");
        if let Some(v6) = v6 {
            let port6 = v6.local_addr().expect("addr").port();
            assert!(
                from_netlink.iter().any(|(p, _)| *p == port6),
                "IPv6 listener"
            );
        }
    }

    #[test]
    fn a_real_connection_is_seen() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert_eq!(open_to(&[port]).expect("read tables"), 0);
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (_server, _) = listener.accept().expect("accept");
        // Both ends are this process's: its own connection does not count.
        assert_eq!(open_to(&[port]).expect("read tables"), 0);
        let tables = tables().expect("read tables");
        let ports: HashSet<u16> = [port].into_iter().collect();
        assert_eq!(count_in(&tables, &ports, &HashSet::new()), 1);
    }
}

//! Counting the TCP connections an app process is serving, from the kernel's tables.
//!
//! Without its own proxy in front, rolld cannot count requests; it drains the old set by
//! waiting until no connection to the old set's ports is established any more: the
//! balancer (nginx, after a reload) has finished its requests there and closed them.

use std::collections::HashSet;
use std::io;

/// TCP states that can still carry a request: established, and a handshake under way.
const ESTABLISHED: &str = "01";
const SYN_RECV: &str = "03";

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
    fn a_real_connection_is_seen() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert_eq!(open_to(&[port]).expect("read tables"), 0);
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (_server, _) = listener.accept().expect("accept");
        assert_eq!(open_to(&[port]).expect("read tables"), 1);
    }
}

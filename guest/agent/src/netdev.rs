//! Counters of the guest's network interfaces from /proc/net/dev (the pod's network: containers share it).

use std::path::Path;

use podvisor_proto as pb;

/// The interfaces in `<proc>/net/dev` but loopback; none when the file is unreadable.
pub fn interfaces(proc_root: &Path) -> Vec<pb::InterfaceStats> {
    std::fs::read_to_string(proc_root.join("net/dev"))
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// Parses /proc/net/dev: two header lines, then `name: rx(bytes packets errs drop fifo frame compressed
/// multicast) tx(bytes packets errs drop fifo colls carrier compressed)`.
fn parse(text: &str) -> Vec<pb::InterfaceStats> {
    text.lines()
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let name = name.trim();
            let v: Vec<u64> = counters
                .split_whitespace()
                .map(|n| n.parse().ok())
                .collect::<Option<_>>()?;
            (name != "lo" && v.len() >= 16).then(|| pb::InterfaceStats {
                name: name.to_string(),
                rx_bytes: v[0],
                rx_packets: v[1],
                rx_errors: v[2],
                rx_dropped: v[3],
                tx_bytes: v[8],
                tx_packets: v[9],
                tx_errors: v[10],
                tx_dropped: v[11],
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_dev() {
        // /proc/net/dev of a Linux 6.1 guest with a virtio-net interface.
        let text = "Inter-|   Receive                                                |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
             lo:    1460      20    0    0    0     0          0         0     1460      20    0    0    0     0       0          0\n  \
             eth0:  104562     761    1    2    0     0          0         3    23180     259    4    5    0     0       0          0\n";
        let ifs = parse(text);
        assert_eq!(ifs.len(), 1, "{ifs:?}");
        let e = &ifs[0];
        assert_eq!(e.name, "eth0");
        assert_eq!(
            (e.rx_bytes, e.rx_packets, e.rx_errors, e.rx_dropped),
            (104_562, 761, 1, 2)
        );
        assert_eq!(
            (e.tx_bytes, e.tx_packets, e.tx_errors, e.tx_dropped),
            (23_180, 259, 4, 5)
        );
        assert!(parse("garbage\nx: 1 2\n").is_empty());
        assert!(interfaces(Path::new("/nonexistent")).is_empty());
    }
}

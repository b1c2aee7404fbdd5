//! GPU -> PCI bus -> NUMA node -> CPUs, from sysfs; and binding memory and threads to a node.
//!
//! Staging memory on the GPU's node and reader threads on that node's CPUs keep every byte on
//! one socket: the disk DMA, the page-cache copy and the GPU's DMA all hit local memory. On a
//! single-node machine (sysfs `numa_node` is -1) there is nothing to do.

use std::path::Path;

/// The NUMA node of the PCI device `bus_id` (as CUDA prints it, e.g. `0000:3B:00.0`), or
/// `None` when the machine has one node or sysfs does not say.
pub fn pci_numa_node(bus_id: &str) -> Option<u32> {
    let path =
        Path::new("/sys/bus/pci/devices").join(bus_id.to_ascii_lowercase()).join("numa_node");
    parse_numa_node(&std::fs::read_to_string(path).ok()?)
}

/// `"-1\n"` -> `None`, `"1\n"` -> `Some(1)`.
pub fn parse_numa_node(text: &str) -> Option<u32> {
    text.trim().parse::<i64>().ok().filter(|&n| n >= 0).map(|n| n as u32)
}

/// The CPUs of NUMA node `node`.
pub fn node_cpus(node: u32) -> Vec<usize> {
    let path = format!("/sys/devices/system/node/node{node}/cpulist");
    std::fs::read_to_string(path).map(|s| parse_cpulist(&s)).unwrap_or_default()
}

/// `"0-3,8,10-11"` -> `[0, 1, 2, 3, 8, 10, 11]`; malformed parts are skipped.
pub fn parse_cpulist(text: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    cpus.extend(a..=b.min(a + 65_536));
                }
            }
            None => cpus.extend(part.parse::<usize>().ok()),
        }
    }
    cpus
}

/// Asks the kernel to place `[ptr, ptr + len)` on `node` (preferred, so a full node falls
/// back instead of failing). Must run before the pages are touched. Logged, never fatal.
///
/// # Safety
/// `[ptr, ptr + len)` must be a mapping the caller owns.
pub unsafe fn bind_to_node(ptr: *mut u8, len: usize, node: u32) {
    const MPOL_PREFERRED: libc::c_long = 1;
    if node >= 64 {
        log::info!("NUMA node {node} is beyond the 64-node mask: staging left unbound");
        return;
    }
    let mask: u64 = 1 << node;
    // SAFETY: mbind only changes the placement policy of our own mapping; the mask pointer is
    // valid for the 64 bits given as maxnode.
    let rc = unsafe {
        libc::syscall(libc::SYS_mbind, ptr, len, MPOL_PREFERRED, &mask as *const u64, 64u64, 0u32)
    };
    if rc != 0 {
        log::info!("mbind to NUMA node {node} failed: {}", std::io::Error::last_os_error());
    }
}

/// Restricts the calling thread to `cpus` (no-op for an empty list). Logged, never fatal.
pub fn pin_current_thread(cpus: &[usize]) {
    if cpus.is_empty() {
        return;
    }
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
        // SAFETY: cpu is below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; the set is valid for its size.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        log::info!("pinning a reader thread failed: {}", std::io::Error::last_os_error());
    }
}

/// The destinations of a placed load that share a NUMA node, and so one staging ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagingGroup {
    /// The node (`None`: the machine has one, or sysfs does not say).
    pub node: Option<u32>,
    /// Positions of the destinations on it.
    pub destinations: Vec<usize>,
    /// Bytes they take.
    pub bytes: u64,
}

/// Groups destinations by the NUMA node of their GPU (`nodes[d]`, with `bytes[d]` to take),
/// the group taking the most bytes first (ties: lower node first). A machine of one node
/// gives one group. The loader stages on the first group's node: its GPUs' copies read local
/// memory, the others cross the interconnect once.
pub fn staging_groups(nodes: &[Option<u32>], bytes: &[u64]) -> Vec<StagingGroup> {
    assert_eq!(nodes.len(), bytes.len());
    let mut groups: Vec<StagingGroup> = Vec::new();
    for (d, (&node, &b)) in nodes.iter().zip(bytes).enumerate() {
        match groups.iter_mut().find(|g| g.node == node) {
            Some(g) => {
                g.destinations.push(d);
                g.bytes += b;
            }
            None => groups.push(StagingGroup { node, destinations: vec![d], bytes: b }),
        }
    }
    groups.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.node.cmp(&b.node)));
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numa_nodes_and_cpulists() {
        assert_eq!(parse_numa_node("-1\n"), None);
        assert_eq!(parse_numa_node("1\n"), Some(1));
        assert_eq!(parse_numa_node("junk"), None);
        assert_eq!(parse_cpulist("0-3,8,10-11\n"), [0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpulist(""), Vec::<usize>::new());
        assert_eq!(parse_cpulist("5,x,7"), [5, 7]);
    }

    #[test]
    fn staging_groups_by_node() {
        let g = |node, destinations: &[usize], bytes| StagingGroup {
            node,
            destinations: destinations.to_vec(),
            bytes,
        };
        // (nodes per GPU, bytes per GPU, groups)
        type Case = (Vec<Option<u32>>, Vec<u64>, Vec<StagingGroup>);
        let cases: Vec<Case> = vec![
            // One node (the lent 4-GPU machines): one group, sysfs says -1.
            (vec![None; 4], vec![10; 4], vec![g(None, &[0, 1, 2, 3], 40)]),
            // Two sockets, two GPUs each, even split: node 0 first on the tie.
            (
                vec![Some(1), Some(0), Some(1), Some(0)],
                vec![5, 5, 5, 5],
                vec![g(Some(0), &[1, 3], 10), g(Some(1), &[0, 2], 10)],
            ),
            // Uneven: the node taking more bytes stages.
            (
                vec![Some(0), Some(1), Some(1)],
                vec![100, 30, 30],
                vec![g(Some(0), &[0], 100), g(Some(1), &[1, 2], 60)],
            ),
            // The same GPU named twice stays one group.
            (vec![Some(3), Some(3)], vec![1, 2], vec![g(Some(3), &[0, 1], 3)]),
            (vec![], vec![], vec![]),
        ];
        for (nodes, bytes, want) in cases {
            assert_eq!(staging_groups(&nodes, &bytes), want, "{nodes:?} {bytes:?}");
        }
    }

    #[test]
    fn binding_and_pinning_do_not_fail_the_caller() {
        let arena = crate::engine::staging::Arena::new(1 << 20, Some(0)).unwrap();
        assert_eq!(arena.len(), 1 << 20);
        std::thread::spawn(|| pin_current_thread(&[0])).join().unwrap();
    }
}

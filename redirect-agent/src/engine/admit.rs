//! What an enroll request's id, cgroup and counter block must be, before anything changes.

use std::path::Path;

use redirect_api::WorkloadInfo;
use redirect_common::MAX_WORKLOADS;

/// An enrollment id: what a container runtime gives (its sandbox id) or a name.
pub(super) fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The first counter block no workload holds.
pub(super) fn free_slot<'a>(taken: impl Iterator<Item = &'a WorkloadInfo> + Clone) -> Option<u32> {
    (0..MAX_WORKLOADS).find(|s| taken.clone().all(|w| w.slot != *s))
}

/// Whether `cgroup` is `attach` or below it (both canonical).
pub(super) fn is_under(cgroup: &Path, attach: &Path) -> bool {
    matches!((cgroup.canonicalize(), attach.canonicalize()), (Ok(c), Ok(a)) if c.starts_with(&a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(slot: u32) -> WorkloadInfo {
        WorkloadInfo {
            id: format!("w{slot}"),
            netns: "/run/netns/x".into(),
            netns_cookie: u64::from(slot) + 100,
            cgroup: None,
            proxy: "embedded".into(),
            args: Vec::new(),
            fast_path: false,
            slot,
            addresses: Vec::new(),
            interfaces: Vec::new(),
            pod: None,
        }
    }

    #[test]
    fn ids_are_names_a_runtime_gives() {
        assert!(valid_id("2f4c0e1d9a"));
        assert!(valid_id("pod-a.default_1"));
        for bad in ["", "a/b", "a b", "é", &"x".repeat(129)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_freed_counter_block_is_reused_first_and_a_full_node_has_none() {
        let taken = [info(0), info(2)];
        assert_eq!(free_slot(taken.iter()), Some(1));
        let all: Vec<_> = (0..MAX_WORKLOADS).map(info).collect();
        assert_eq!(free_slot(all.iter()), None);
        assert_eq!(free_slot([].iter()), Some(0));
    }

    #[test]
    fn a_cgroup_outside_the_attach_point_is_not_under_it() {
        let dir = std::env::temp_dir().join(format!("rd-under-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        assert!(is_under(&dir.join("a/b"), &dir.join("a")));
        assert!(is_under(&dir.join("a"), &dir.join("a")));
        assert!(!is_under(&dir.join("a"), &dir.join("a/b")));
        // `..` does not escape the check.
        assert!(!is_under(&dir.join("a/b/../.."), &dir.join("a")));
        assert!(!is_under(&dir.join("missing"), &dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

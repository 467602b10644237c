//! Serving again what a predecessor served: workloads handed over with their descriptors or
//! adopted from its state, and releasing whatever no state names.

use std::collections::BTreeMap;

use redirect_api::WorkloadInfo;

use super::{Engine, EnrollError, handover::Handed, links, pins};
use crate::sys::Netns;

impl Engine {
    /// Serves again the workloads a predecessor served (handed over with their descriptors,
    /// or adopted from its state). Those whose namespace is gone, or that cannot be started
    /// again, are released rather than left half-served; so are entries and pins no state
    /// names (a state file lost with a crash).
    pub(crate) fn restore(&mut self, infos: Vec<WorkloadInfo>, mut handed: BTreeMap<String, Handed>) {
        for info in infos {
            let cookie = info.netns_cookie;
            let from_peer = handed.remove(&info.id);
            let netns = match &from_peer {
                Some(h) => h
                    .netns
                    .try_clone()
                    .map_err(|e| e.to_string())
                    .and_then(|fd| Netns::from_fd(fd, &info.netns).map_err(|e| e.to_string())),
                None => Netns::open(&info.netns).map_err(|e| e.to_string()),
            };
            let netns = match netns {
                Ok(ns) if ns.cookie().ok() == Some(cookie) => ns,
                Ok(_) => {
                    tracing::warn!(id = %info.id, netns = %info.netns.display(), "namespace is gone (its path names another now); releasing the workload");
                    self.purge(cookie);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(id = %info.id, "namespace is gone ({e}); releasing the workload");
                    self.purge(cookie);
                    continue;
                }
            };
            let id = info.id.clone();
            let started = crate::flags::parse_args(&info.args)
                .map_err(EnrollError::Flags)
                .and_then(|capture| self.start_workload(info, &capture, netns, from_peer.map(|h| h.listeners)));
            match started {
                Ok(w) => {
                    tracing::info!(%id, netns_cookie = cookie, "workload adopted");
                    self.workloads.insert(id, w);
                }
                Err(e) => {
                    tracing::error!(%id, "cannot serve the workload again: {e}; releasing it");
                    self.purge(cookie);
                }
            }
        }
        let known: Vec<u64> = self.workloads.values().map(|w| w.info.netns_cookie).collect();
        let in_maps: Vec<u64> = self.maps.workloads.keys().filter_map(Result::ok).collect();
        for cookie in unknown(in_maps, &known) {
            tracing::warn!(
                netns_cookie = cookie,
                "a workload in the pinned maps has no state; releasing it"
            );
            self.purge(cookie);
        }
        let link_pins = std::fs::read_dir(pins::links_dir(&self.settings.name))
            .map(|dir| {
                dir.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        for name in orphan_sk_lookup_pins(link_pins, &known) {
            let _ = links::unpin(&pins::links_dir(&self.settings.name).join(name));
        }
    }
}

/// Workloads in the pinned maps that no state names (a state file lost with a crash).
fn unknown(in_maps: Vec<u64>, known: &[u64]) -> Vec<u64> {
    in_maps.into_iter().filter(|c| !known.contains(c)).collect()
}

/// sk_lookup link pins (`sk_lookup-COOKIE`) of namespaces nobody serves; other pins are not
/// this function's business.
fn orphan_sk_lookup_pins(names: Vec<String>, known: &[u64]) -> Vec<String> {
    names
        .into_iter()
        .filter(|n| {
            n.strip_prefix("sk_lookup-")
                .and_then(|c| c.parse::<u64>().ok())
                .is_some_and(|c| !known.contains(&c))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_no_state_names_is_released_and_nothing_else() {
        assert_eq!(unknown(vec![5, 7, 9], &[7]), [5, 9]);
        assert!(unknown(vec![7], &[7, 8]).is_empty());
        let pins = [
            "sk_lookup-7",
            "sk_lookup-9",
            "redirect_connect4",
            "sk_lookup-x",
            "sk_lookup-",
        ]
        .map(String::from)
        .to_vec();
        // The cgroup links and names that are not a cookie stay.
        assert_eq!(orphan_sk_lookup_pins(pins, &[7]), ["sk_lookup-9"]);
    }
}

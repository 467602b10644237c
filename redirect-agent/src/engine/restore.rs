//! Serving again what a predecessor served: workloads handed over with their descriptors or
//! adopted from its state, and releasing whatever no state names.

use std::collections::BTreeMap;

use redirect_api::WorkloadInfo;

use super::{Engine, EnrollError, handover::Handed, links, pins};
use crate::sys::Netns;

impl Engine {
    /// Serves again the workloads a predecessor served (handed over with their descriptors,
    /// or adopted from its state). One whose namespace is positively gone (no such path, or
    /// the path names another namespace now) is released. One that cannot be started again
    /// is not: its chain and sk_lookup link stay, so its connections are refused rather than
    /// let through, and it is kept (in the state, for the next start) and tried again
    /// ([`Engine::retry_unserved`]). Entries and pins no state names (a state file lost with
    /// a crash) are released. Returns how many workloads are left unserved.
    pub(crate) fn restore(&mut self, infos: Vec<WorkloadInfo>, mut handed: BTreeMap<String, Handed>) -> usize {
        for info in infos {
            let from_peer = handed.remove(&info.id);
            let netns = match &from_peer {
                Some(h) => h
                    .netns
                    .try_clone()
                    .map_err(|e| crate::error::SysError::Io("the handed netns".into(), e))
                    .and_then(|fd| Netns::from_fd(fd, &info.netns)),
                None => Netns::open(&info.netns),
            };
            self.serve_again(info, netns, from_peer.map(|h| h.listeners));
        }
        let known: Vec<u64> = self
            .workloads
            .values()
            .map(|w| w.info.netns_cookie)
            .chain(self.unserved.values().map(|i| i.netns_cookie))
            .collect();
        // The rule maps first, in one pass for every workload: the counters and set members of
        // workloads no state names (their entry's, and those of a start that failed part-way in
        // a process that then died), and whatever a workload served again holds that it did not
        // write (a predecessor's for other flags).
        let known_set: std::collections::HashSet<u64> = known.iter().copied().collect();
        let stray = self.maps.rules.prune(|cookie| known_set.contains(&cookie));
        if stray > 0 {
            tracing::warn!(
                entries = stray,
                "rule counters and set members no workload has; removed them"
            );
        }
        let in_maps: Vec<u64> = self.maps.workloads.keys().filter_map(Result::ok).collect();
        for cookie in unknown(in_maps, &known) {
            tracing::warn!(
                netns_cookie = cookie,
                "a workload in the pinned maps has no state; releasing it"
            );
            self.purge_entries(cookie, false);
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
        self.unserved.len()
    }

    /// Tries again to serve the workloads [`Engine::restore`] could not: periodically, from
    /// the node's housekeeping.
    pub(crate) fn retry_unserved(&mut self) {
        if self.handed_over || self.unserved.is_empty() {
            return;
        }
        let waiting: Vec<WorkloadInfo> = std::mem::take(&mut self.unserved).into_values().collect();
        let before = self.workloads.len();
        for info in waiting {
            let netns = Netns::open(&info.netns);
            self.serve_again(info, netns, None);
        }
        if self.workloads.len() != before {
            self.persist();
        }
    }

    fn serve_again(
        &mut self,
        info: WorkloadInfo,
        netns: Result<Netns, crate::error::SysError>,
        handed: Option<Vec<(crate::proxy::Side, std::os::fd::OwnedFd)>>,
    ) {
        let (cookie, id) = (info.netns_cookie, info.id.clone());
        let netns = match netns {
            Ok(ns) => match ns.cookie() {
                Ok(c) if c == cookie => ns,
                Ok(_) => {
                    tracing::warn!(%id, netns = %info.netns.display(), "namespace is gone (its path names another now); releasing the workload");
                    self.purge(cookie);
                    return;
                }
                Err(e) => return self.keep_unserved(info, &format!("netns cookie: {e}")),
            },
            Err(e) if e.is_not_found() => {
                tracing::warn!(%id, "namespace is gone ({e}); releasing the workload");
                self.purge(cookie);
                return;
            }
            Err(e) => return self.keep_unserved(info, &e.to_string()),
        };
        let started = crate::flags::parse_args(&info.args)
            .map_err(EnrollError::Flags)
            .and_then(|(capture, _)| {
                let compiled =
                    redirect_common::chain::compile_packed(&capture).map_err(|e| EnrollError::Flags(e.to_string()))?;
                self.start_workload(info.clone(), &capture, &compiled, netns, handed)
            });
        match started {
            Ok(w) => {
                tracing::info!(%id, netns_cookie = cookie, "workload adopted");
                self.workloads.insert(id, w);
            }
            Err(e) => self.keep_unserved(info, &e.to_string()),
        }
    }

    /// Fail-closed: a workload that cannot be served keeps its chain and sk_lookup link, so
    /// its connections are refused (nothing listens on its capture ports), never let through.
    fn keep_unserved(&mut self, info: WorkloadInfo, why: &str) {
        tracing::error!(
            id = %info.id,
            "cannot serve the workload again: {why}; its connections are refused until it can be (retried; unenroll releases it)"
        );
        self.unserved.insert(info.id.clone(), info);
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

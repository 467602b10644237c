//! Removing workloads: unenroll, and the purge of everything one may have left in the maps and
//! pins, whoever wrote it.

use std::path::PathBuf;

use redirect_common::{FamilyKey, OrigDst, TupleKey, addr::Family, maps};

use super::{Engine, EnrollError, links};
use crate::sys::Netns;

impl Engine {
    /// Everything a workload may have left in the maps and pins, removed whoever wrote it:
    /// the undo of a failed enroll, unenroll itself, and the end of a stale workload.
    pub(super) fn purge(&mut self, netns_cookie: u64) {
        self.purge_entries(netns_cookie, true);
    }

    /// [`Engine::purge`]; without `rules` the rule maps are left alone (the caller pruned
    /// them for many workloads in one pass).
    pub(super) fn purge_entries(&mut self, netns_cookie: u64, rules: bool) {
        // First, so that no new connection is captured while the rest goes.
        let _ = self.maps.workloads.remove(&netns_cookie);
        let _ = links::unpin(&self.sk_lookup_pin(netns_cookie));
        // A killed predecessor's tcx links on the workload's `-k` devices (this process's
        // own go with its `SharedVirt`).
        if self.settings.keep_links {
            super::virt::remove_pins(&super::pins::links_dir(&self.settings.name), netns_cookie);
        }
        self.maps.addrs.remove_all(netns_cookie);
        if rules {
            self.maps.rules.remove(netns_cookie);
        }
        for family in [Family::V4, Family::V6] {
            let _ = self.maps.listeners.remove(&FamilyKey::new(netns_cookie, family));
        }
        self.forget_pending(netns_cookie);
    }

    /// Drops the namespace's inbound connections that sk_lookup handed to a listener which is
    /// gone (closed with the proxy, or by a killed agent, before it accepted them): their
    /// handshakes ended with that listener, and nothing else would ever remove their entries.
    /// Only while the namespace has no listener in `INBOUND_LISTENERS`, so that sk_lookup
    /// cannot add one for a live connection as this runs.
    pub(super) fn forget_pending(&self, netns_cookie: u64) {
        let Ok(mut pending) = self.open_map::<aya::maps::HashMap<_, TupleKey, OrigDst>>(maps::INBOUND_PENDING) else {
            return;
        };
        let stale: Vec<TupleKey> = pending
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.netns_cookie == netns_cookie)
            .collect();
        for key in &stale {
            let _ = pending.remove(key);
        }
        if !stale.is_empty() {
            tracing::debug!(
                netns_cookie,
                entries = stale.len(),
                "forgot inbound connections of a closed listener"
            );
        }
    }

    /// Removes a workload: captured no more from this moment; its proxy's open connections
    /// may finish for the drain time.
    pub(crate) fn unenroll(&mut self, id: Option<String>, netns: Option<PathBuf>) -> Result<String, EnrollError> {
        if self.handed_over {
            return Err(EnrollError::HandedOver);
        }
        let id = match (id, netns) {
            (Some(id), _) => id,
            (None, Some(path)) => {
                let cookie = Netns::open(&path)
                    .map_err(EnrollError::Path)?
                    .cookie()
                    .map_err(EnrollError::io(format!("netns cookie of {}", path.display())))?;
                self.workloads
                    .values()
                    .map(|w| &w.info)
                    .chain(self.unserved.values())
                    .find(|w| w.netns_cookie == cookie)
                    .map(|w| w.id.clone())
                    .ok_or(EnrollError::NoSuchNetns(path))?
            }
            (None, None) => return Err(EnrollError::NoTarget),
        };
        if let Some(info) = self.unserved.remove(&id) {
            self.purge(info.netns_cookie);
            self.persist();
            tracing::info!(%id, "unenrolled (it was not served)");
            return Ok(id);
        }
        let w = self
            .workloads
            .remove(&id)
            .ok_or_else(|| EnrollError::NoSuchId(id.clone()))?;
        self.purge(w.info.netns_cookie);
        self.persist();
        tracing::info!(%id, "unenrolled");
        // TPROXY's routing and `-k`'s tc programs go once the proxy drained: its open
        // connections' replies to the client's address come back to it through that routing,
        // and a VM's redirected connections are translated by those programs. (New ones are
        // not captured any more: the programs find no workload.)
        let grace = self.settings.sizing.drain;
        let (routing, virt) = (w.tproxy, w.virt);
        // The -k programs (which mark connections for TPROXY's table) before the routing.
        let after_drain = move || {
            if let Some(v) = virt {
                v.remove(super::virt::Removal::Unenrolled);
            }
            if let Some(t) = routing {
                t.remove();
            }
        };
        match w.proxy {
            Some(proxy) => {
                tokio::spawn(async move {
                    proxy.drain(grace).await;
                    let _ = tokio::task::spawn_blocking(after_drain).await;
                });
            }
            None => after_drain(),
        }
        Ok(id)
    }
}

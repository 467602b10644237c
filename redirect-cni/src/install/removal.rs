//! `install --watch --uninstall-if-removed NAMESPACE/NAME`: at its stop, whether the DaemonSet
//! is being removed (take the plugin out, so that pods start without it) or stays (an update,
//! a drain, a reboot: keep it, so that no pod starts uncaptured).
//!
//! Only a DaemonSet this process has seen can be removed: one it never found (a name an
//! overlay changed, a Role that does not cover it, an API server down since the start) keeps
//! the plugin, so a wrong name cannot uninstall it at every rollout.

use std::time::Duration;

use crate::kube::{self, DaemonSetState};

use super::Node;

/// The bound on each GET: well inside the DaemonSet's termination grace.
const ASK_WITHIN: Duration = Duration::from_secs(5);

pub(super) struct RemovalCheck {
    namespace: String,
    name: String,
    /// The DaemonSet's uid, once seen.
    seen: Option<String>,
}

/// What to do at the stop, and the log's reason.
pub(super) enum AtStop {
    Uninstall(String),
    Keep(String),
}

impl RemovalCheck {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            seen: None,
        }
    }

    fn ask(&self, node: &Node) -> Result<DaemonSetState, String> {
        let source = node
            .kubeconfig
            .as_ref()
            .ok_or_else(|| "no service account to ask the API server with".to_owned())?;
        kube::daemonset_state(&source.render()?, &self.namespace, &self.name, ASK_WITHIN)
    }

    /// Until the DaemonSet is seen, looks for it (at the start, then at each periodic check):
    /// a line for the log when it was found, or why not (said while it holds).
    pub fn look(&mut self, node: &Node) -> Result<Option<String>, String> {
        if self.seen.is_some() {
            return Ok(None);
        }
        let (ns, name) = (&self.namespace, &self.name);
        match self.ask(node)? {
            DaemonSetState::Present(uid) => {
                self.seen = Some(uid);
                Ok(Some(format!(
                    "daemonset {ns}/{name} found: its removal will take the plugin out at the stop"
                )))
            }
            other => Err(format!(
                "daemonset {ns}/{name} not found ({other:?}): the plugin stays at the stop until it is"
            )),
        }
    }

    pub fn at_stop(&self, node: &Node) -> AtStop {
        let (ns, name) = (&self.namespace, &self.name);
        let Some(uid) = &self.seen else {
            return AtStop::Keep(format!("daemonset {ns}/{name} was never seen"));
        };
        match self.ask(node) {
            Ok(DaemonSetState::Gone) => AtStop::Uninstall(format!("daemonset {ns}/{name} is gone")),
            Ok(DaemonSetState::Deleting) => AtStop::Uninstall(format!("daemonset {ns}/{name} is being deleted")),
            Ok(DaemonSetState::Revoked(code)) => AtStop::Uninstall(format!(
                "the service account may no longer read daemonset {ns}/{name} (HTTP {code}): the installation is being removed"
            )),
            Ok(DaemonSetState::Present(now)) if &now == uid => {
                AtStop::Keep(format!("daemonset {ns}/{name} stays (an update, a drain or a reboot)"))
            }
            // Deleted and applied again meanwhile: the new one's install-cni keeps the chain.
            Ok(DaemonSetState::Present(_)) => AtStop::Keep(format!("daemonset {ns}/{name} was created again")),
            // An update while the API server is down must not let pods start uncaptured; a
            // removal then leaves `redirect-cni uninstall` to the operator.
            Err(e) => AtStop::Keep(format!("could not tell whether daemonset {ns}/{name} is removed ({e})")),
        }
    }
}

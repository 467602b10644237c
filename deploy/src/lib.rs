//! `daemonset.yaml` (Kubernetes) and `redirect-agent.service` (systemd) ship redirect's node
//! agent; `tests/manifests.rs` parses them against the Kubernetes API types and checks what
//! the agent needs of them, so that they cannot drift from it.

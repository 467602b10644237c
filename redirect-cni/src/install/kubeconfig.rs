//! The plugin's kubeconfig, written by install from the install container's service account,
//! as Istio's install-cni writes `ZZZ-istio-cni-kubeconfig` (`cni/pkg/install/kubeconfig.go`):
//! the API server from the `KUBERNETES_SERVICE_*` environment the kubelet sets, the cluster's
//! CA and the account's token inline. The plugin runs on the node, where the pod's token
//! volume is not, so the token is copied; projected tokens rotate, so `--watch` writes the file
//! again whenever the token or CA changes. The name starts with `ZZZ-` and has no `.conf`
//! suffix, so no runtime takes it for a network configuration.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::SystemTime,
};

use base64::Engine as _;
use serde_json::json;

/// Its name in the CNI configuration directory.
pub(super) const FILE: &str = "ZZZ-redirect-cni-kubeconfig";

/// Where the API server and the credentials come from.
#[derive(Debug, Clone)]
pub(super) struct Source {
    /// A service account's mounted directory: `token` and `ca.crt`.
    pub account: PathBuf,
    /// `https://HOST:PORT`.
    pub server: String,
}

impl Source {
    /// `server` as given, else from the environment the kubelet gives every container
    /// (`KUBERNETES_SERVICE_HOST`, `_PORT`, and istio-cni's `KUBERNETES_SERVICE_PROTOCOL`).
    pub fn new(account: PathBuf, server: Option<String>) -> Result<Self, String> {
        let server = match server {
            Some(s) => s,
            None => {
                let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
                let host = var("KUBERNETES_SERVICE_HOST").ok_or(
                    "--service-account: KUBERNETES_SERVICE_HOST is not set (the kubelet sets it in a pod); \
                     give the API server with --kube-server URL",
                )?;
                let port = var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".into());
                let protocol = var("KUBERNETES_SERVICE_PROTOCOL").unwrap_or_else(|| "https".into());
                // An IPv6 address goes in brackets in a URL.
                let host = if host.contains(':') { format!("[{host}]") } else { host };
                format!("{protocol}://{host}:{port}")
            }
        };
        let host = server
            .strip_prefix("https://")
            .or_else(|| server.strip_prefix("http://"))
            .unwrap_or_default();
        if host.is_empty() {
            return Err(format!("--kube-server '{server}': expected a URL, https://HOST:PORT"));
        }
        Ok(Self { account, server })
    }

    /// The kubeconfig's text (JSON, which is YAML), from the account's files as they are now.
    pub fn render(&self) -> Result<String, String> {
        let read = |name: &str| {
            let path = self.account.join(name);
            fs::read(&path).map_err(|e| {
                format!(
                    "--service-account {}: {name}: {e} (expected a service account's token and ca.crt)",
                    self.account.display()
                )
            })
        };
        let token = String::from_utf8(read("token")?)
            .map_err(|_| format!("--service-account {}: token is not text", self.account.display()))?;
        let token = token.trim();
        if token.is_empty() {
            return Err(format!("--service-account {}: token is empty", self.account.display()));
        }
        let mut cluster = json!({ "server": self.server });
        // Plain HTTP (a test's API server) has no CA; HTTPS must have one.
        if self.server.starts_with("https://") {
            let ca = read("ca.crt")?;
            cluster["certificate-authority-data"] = json!(base64::engine::general_purpose::STANDARD.encode(ca));
        }
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "local", "cluster": cluster }],
            "users": [{ "name": "redirect-cni", "user": { "token": token } }],
            "contexts": [{ "name": "redirect-cni", "context": { "cluster": "local", "user": "redirect-cni" } }],
            "current-context": "redirect-cni"
        });
        Ok(serde_json::to_string_pretty(&config).unwrap_or_default() + "\n")
    }
}

/// Who writes `dir/FILE`. During a rolling update two install-cni containers run, each with a
/// token of its own pod (both valid): the newer one owns the file. Each writes it when it is
/// missing, when it holds what this writer wrote last and the token or CA changed since, or
/// when it was written before this process started (by the predecessor, or before a reboot).
/// So the predecessor, seeing its successor's file, leaves it; the two never take turns.
pub(super) struct Writer {
    started: SystemTime,
    last: Option<String>,
}

impl Writer {
    pub fn new() -> Self {
        Self {
            started: SystemTime::now(),
            last: None,
        }
    }

    /// Writes `text` to `dir/FILE` (mode 0600: it holds a token) if this writer should;
    /// whether it wrote.
    pub fn write(&mut self, dir: &Path, text: &str) -> Result<bool, String> {
        let target = dir.join(FILE);
        let current = fs::read_to_string(&target).ok();
        if current.as_deref() == Some(text) {
            self.last = Some(text.to_owned());
            return Ok(false);
        }
        let ours = current.is_some() && current == self.last;
        let before_us = fs::metadata(&target)
            .and_then(|m| m.modified())
            .is_ok_and(|m| m < self.started);
        if current.is_some() && !ours && !before_us {
            return Ok(false);
        }
        // A write and a rename: the plugin reads the old file or the new one, never half of
        // one. The temporary name is this process's, so two writers never share it.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let tmp = dir.join(format!(
            ".{FILE}.{}.{}.tmp",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let written = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .and_then(|()| fs::rename(&tmp, &target));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(format!("write {}: {e}", target.display()));
        }
        self.last = Some(text.to_owned());
        Ok(true)
    }
}

/// Removes `dir/FILE`; whether it was there.
pub(super) fn remove(dir: &Path) -> Result<bool, String> {
    let target = dir.join(FILE);
    match fs::remove_file(&target) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("remove {}: {e}", target.display())),
    }
}

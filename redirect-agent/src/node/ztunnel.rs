//! Node mode's side of ztunnel (`--ztunnel-socket`): the ambient pods it serves, handed over
//! ZDS ([`crate::zds`]) as istio-cni's node agent hands them.
//!
//! A workload goes to ztunnel when it is enrolled with `--mode ambient` and `--proxy none`:
//! ztunnel, not the embedded proxy, serves its capture ports from sockets it makes in the
//! pod's namespace, which it is sent. ZDS keys pods by their Kubernetes uid, so such an
//! enrollment must name its pod's uid ([`Handoff::admit`]).
//!
//! The engine enrolls first; the pod goes to ztunnel after, without the engine's lock. One
//! that no ztunnel takes (none is connected, or it refuses, or it does not answer in time) is
//! taken back out of the engine ([`crate::api`]) and the enroll fails as `unavailable`, to be
//! retried, as istio-cni fails the pod's ADD. Pods the engine already serves (a restart's)
//! wait for the next snapshot instead: their capture is on, and connections to them fail fast
//! until ztunnel serves them.
//!
//! One server at a time listens on the socket: a successor binds it once its predecessor has
//! let go of it (every [`RETRY_IN_USE`] until then), with the pods the engine serves in its
//! first snapshot, so that a ztunnel that reconnects at once finds them all.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Weak},
    time::Duration,
};

use redirect_api::{ApiError, ErrorKind, WorkloadInfo};
use tokio::sync::Mutex;

use super::AbortOnDrop;
use crate::{
    api::Handoff,
    engine::{self, Engine},
    flags::ProxyMode,
    zds::{DEFAULT_TIMEOUT, ZdsError, ZdsPod, ZdsServer},
};

/// How often a successor tries the socket while its predecessor still listens on it.
const RETRY_IN_USE: Duration = Duration::from_millis(100);
/// How often it tries after any other failure (logged when it changes).
const RETRY_FAILED: Duration = Duration::from_secs(1);
/// How long the socket may stay in use before that is worth a warning: a predecessor lets go
/// of it as soon as it has handed over.
const IN_USE_WARNING: Duration = Duration::from_secs(30);

/// The ZDS server of a node agent, and the workloads it hands to ztunnel.
pub(crate) struct Ztunnel {
    path: PathBuf,
    /// For the API's blocking threads, which wait on ztunnel through it.
    runtime: tokio::runtime::Handle,
    /// Held while a server is bound with the engine's pods, so that an enroll or an unenroll
    /// meanwhile is either in those pods or finds the server once it is in place.
    slot: Mutex<Slot>,
    /// The uid of each workload (by id) handed to ztunnel, or waiting for a server to be.
    handed: std::sync::Mutex<BTreeMap<String, String>>,
}

#[derive(Default)]
struct Slot {
    server: Option<Arc<ZdsServer>>,
    /// A bind in the background, until it binds.
    binding: Option<AbortOnDrop>,
}

/// Whether ztunnel serves a workload of this proxy and these rules.
fn for_ztunnel(proxy: ProxyMode, ambient: bool) -> bool {
    proxy == ProxyMode::None && ambient
}

/// `default/web-0 (uid …)`, for messages.
fn pod_name(info: &WorkloadInfo) -> String {
    match &info.pod {
        Some(p) => format!("pod {p} (uid {})", p.uid.as_deref().unwrap_or("none")),
        None => format!("workload '{}'", info.id),
    }
}

/// What ztunnel is told of workload `info`, whose namespace is `netns`; `None` without a uid.
fn zds_pod(info: &WorkloadInfo, netns: std::os::fd::OwnedFd) -> Option<ZdsPod> {
    let pod = info.pod.as_ref()?;
    if pod.service_account.is_none() {
        // ztunnel accepts an empty one; "default" here would state an account nobody named.
        tracing::info!(id = %info.id, "{}: no service account known; ztunnel gets an empty one", pod_name(info));
    }
    Some(ZdsPod {
        uid: pod.uid.clone()?,
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        service_account: pod.service_account.clone().unwrap_or_default(),
        netns,
    })
}

impl Ztunnel {
    /// Serves nothing yet: [`Self::bind`] or [`Self::bind_in_background`] does. Inside the runtime.
    pub(crate) fn new(path: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            path,
            runtime: tokio::runtime::Handle::current(),
            slot: Mutex::default(),
            handed: std::sync::Mutex::default(),
        })
    }

    fn handed(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.handed.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn server(&self) -> Option<Arc<ZdsServer>> {
        self.slot.lock().await.server.clone()
    }

    /// The pods of the workloads the engine serves that ztunnel should, recorded as handed.
    fn pods(&self, engine: &Engine) -> Vec<ZdsPod> {
        let mut handed = self.handed();
        handed.clear();
        let mut pods = Vec::new();
        for info in engine.workloads() {
            let proxy = ProxyMode::parse(&info.proxy).unwrap_or(ProxyMode::Embedded);
            if !for_ztunnel(proxy, engine.is_ambient(&info.id)) {
                continue;
            }
            let netns = match engine.netns_of(&info.id) {
                Some(Ok(fd)) => fd,
                Some(Err(e)) => {
                    tracing::error!(id = %info.id, "{}: its namespace for ztunnel: {e}", pod_name(&info));
                    continue;
                }
                None => continue,
            };
            let Some(pod) = zds_pod(&info, netns) else {
                tracing::warn!(
                    id = %info.id,
                    "ambient workload without a pod uid (enrolled before --ztunnel-socket?): not handed to ztunnel; \
                     enroll it again with its pod's uid"
                );
                continue;
            };
            if let Err(e) = pod.check() {
                tracing::error!(id = %info.id, "not handed to ztunnel: {e}");
                continue;
            }
            handed.insert(info.id.clone(), pod.uid.clone());
            pods.push(pod);
        }
        pods
    }

    /// Binds the socket, with every pod the engine serves in the first snapshot.
    pub(crate) async fn bind(&self, engine: &Mutex<Engine>) -> Result<(), ZdsError> {
        let mut slot = self.slot.lock().await;
        let pods = self.pods(&*engine.lock().await);
        let count = pods.len();
        let server = ZdsServer::bind_with_pods(&self.path, DEFAULT_TIMEOUT, pods).await?;
        tracing::info!(path = %self.path.display(), pods = count, "serving ztunnel over ZDS");
        slot.server = Some(Arc::new(server));
        Ok(())
    }

    /// Binds as soon as the socket is free (a predecessor that handed over listens on it until
    /// it lets go), in the background: every [`RETRY_IN_USE`] while it is in use, until it
    /// binds or this is stopped.
    pub(crate) async fn bind_in_background(self: &Arc<Self>, engine: Arc<Mutex<Engine>>) {
        let me: Weak<Self> = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            let mut told = None;
            let since = std::time::Instant::now();
            let mut warned = false;
            // Ends with the last handle: a stopped agent binds nothing.
            while let Some(z) = me.upgrade() {
                // Probed first, so that waiting costs no look at the engine's pods.
                if matches!(
                    super::endpoints::listened(&z.path),
                    Ok(super::endpoints::ZdsSocket::Listened)
                ) {
                    if !warned && since.elapsed() > IN_USE_WARNING {
                        tracing::warn!(
                            path = %z.path.display(),
                            "still listened on after {} s: another ZDS server (istio-cni's node agent?) holds it; \
                             ztunnel gets no pod from this agent until it lets go",
                            IN_USE_WARNING.as_secs()
                        );
                        warned = true;
                    }
                    drop(z);
                    tokio::time::sleep(RETRY_IN_USE).await;
                    continue;
                }
                let Err(e) = z.bind(&engine).await else { return };
                drop(z);
                let in_use = matches!(e, ZdsError::InUse(_));
                let text = e.to_string();
                if told.as_ref() != Some(&text) {
                    match in_use {
                        true => tracing::info!(
                            "{text}: the agent that handed over still serves it; binding once it lets go"
                        ),
                        false => tracing::error!("{text}; trying again every {} s", RETRY_FAILED.as_secs()),
                    }
                    told = Some(text);
                }
                tokio::time::sleep(if in_use { RETRY_IN_USE } else { RETRY_FAILED }).await;
            }
        });
        let mut slot = self.slot.lock().await;
        if slot.server.is_none() {
            slot.binding = Some(AbortOnDrop(task));
        }
    }

    /// Stops serving ztunnel: the server closes its connections and removes its socket file
    /// (a successor binds it then), and a bind in the background ends.
    pub(crate) async fn stop(&self) {
        let mut slot = self.slot.lock().await;
        slot.binding = None;
        if slot.server.take().is_some() {
            tracing::info!(path = %self.path.display(), "stopped serving ztunnel");
        }
    }

    /// Hands ztunnel a workload the engine serves again (a restart could not, at first); a
    /// refusal is logged: the workload stays enrolled, as it was before the restart.
    pub(crate) async fn served_again(&self, engine: &Mutex<Engine>, info: &WorkloadInfo) {
        let pod = {
            let engine = engine.lock().await;
            let proxy = ProxyMode::parse(&info.proxy).unwrap_or(ProxyMode::Embedded);
            if !for_ztunnel(proxy, engine.is_ambient(&info.id)) {
                return;
            }
            match engine.netns_of(&info.id) {
                Some(Ok(netns)) => zds_pod(info, netns),
                _ => None,
            }
        };
        let Some(pod) = pod else { return };
        let uid = pod.uid.clone();
        self.handed().insert(info.id.clone(), uid.clone());
        let Some(server) = self.server().await else { return };
        match server.add(pod).await {
            Ok(()) => self.released_meanwhile(&server, &info.id, &uid),
            Err(e) => tracing::warn!(id = %info.id, "{}: {e}", pod_name(info)),
        }
    }

    /// After an `AddWorkload` for workload `id`: if it was released while ztunnel was being
    /// told (its [`Self::forget`] found it, and may have sent its `DelWorkload` first), the pod
    /// is removed again, so ztunnel is not left holding a pod nobody serves.
    fn released_meanwhile(&self, server: &Arc<ZdsServer>, id: &str, uid: &str) {
        // Another workload of the same pod keeps it too.
        let held = self.handed().values().any(|u| u == uid);
        if !held {
            tracing::info!(id, %uid, "released while ztunnel was told of it: removed again");
            let server = server.clone();
            let uid = uid.to_owned();
            self.runtime.spawn(async move {
                if let Err(e) = server.remove(&uid).await {
                    tracing::warn!(%uid, "removing a pod released while ztunnel was told of it: {e}");
                }
            });
        }
    }

    /// Tells ztunnel that workload `info` is gone, if it was handed to it; a failure is logged.
    pub(crate) async fn forget(&self, info: &WorkloadInfo) {
        let uid = {
            let mut handed = self.handed();
            let Some(uid) = handed.remove(&info.id) else { return };
            // Another workload of the same pod (enrolled again under a new id) keeps it.
            if handed.values().any(|u| *u == uid) {
                return;
            }
            uid
        };
        let Some(server) = self.server().await else { return };
        if let Err(e) = server.remove(&uid).await {
            tracing::warn!(id = %info.id, "telling ztunnel that {} is gone: {e}", pod_name(info));
        }
    }
}

impl Handoff for Ztunnel {
    fn admit(&self, req: &engine::Request) -> Result<(), ApiError> {
        if !for_ztunnel(req.proxy, req.capture.ambient.is_some()) {
            return Ok(());
        }
        let missing = match &req.pod {
            Some(p) if p.uid.is_some() => return Ok(()),
            Some(p) => format!("its pod {p} has no uid"),
            None => "it names no pod".into(),
        };
        Err(ApiError::new(
            ErrorKind::Invalid,
            format!(
                "workload '{}': {missing}: an ambient pod with --proxy none is handed to ztunnel, which keys pods by \
                 their Kubernetes uid (expected the pod's uid, the CNI's K8S_POD_UID, in the request's pod)",
                req.id
            ),
        ))
    }

    fn enrolled(&self, engine: &Mutex<Engine>, info: &WorkloadInfo) -> Result<(), ApiError> {
        let failed = |kind, e: &dyn std::fmt::Display| {
            ApiError::new(kind, format!("{}: {e}; not enrolled (retry)", pod_name(info)))
        };
        let pod = {
            let engine = engine.blocking_lock();
            let proxy = ProxyMode::parse(&info.proxy).unwrap_or(ProxyMode::Embedded);
            if !for_ztunnel(proxy, engine.is_ambient(&info.id)) {
                return Ok(());
            }
            // Released meanwhile (its namespace went away): nothing to hand on.
            let Some(netns) = engine.netns_of(&info.id) else {
                return Ok(());
            };
            let netns = netns.map_err(|e| failed(ErrorKind::Internal, &format!("its namespace for ztunnel: {e}")))?;
            let pod = zds_pod(info, netns).ok_or_else(|| failed(ErrorKind::Invalid, &"no pod uid"))?;
            // Recorded while the engine still holds it: a release from now on finds it.
            self.handed().insert(info.id.clone(), pod.uid.clone());
            pod
        };
        let uid = pod.uid.clone();
        // As istio-cni: a pod no ztunnel takes now is not enrolled (its ADD is retried), rather
        // than started with nothing serving it.
        let server = self
            .runtime
            .block_on(self.server())
            .filter(|s| s.connections() > 0)
            .ok_or_else(|| {
                failed(
                    ErrorKind::Unavailable,
                    &format!("no ztunnel is connected to {}", self.path.display()),
                )
            })?;
        self.runtime.block_on(server.add(pod)).map_err(|e| match e {
            ZdsError::InvalidPod { .. } => failed(ErrorKind::Invalid, &e),
            // Refused, or not answered in time: the CNI plugin tries again.
            e => failed(ErrorKind::Unavailable, &e),
        })?;
        self.released_meanwhile(&server, &info.id, &uid);
        Ok(())
    }

    fn released(&self, info: &WorkloadInfo) {
        self.runtime.block_on(self.forget(info));
    }
}

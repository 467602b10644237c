//! `redirect-cni install` and `uninstall`: put the plugin on the node and chain it into the
//! node's CNI network configuration as Istio's install-cni does (docs/research/istio-cni.md
//! §5), keep it chained (`--watch`), and take it out again.

mod conf;
mod kubeconfig;
mod removal;
#[cfg(test)]
mod tests;
mod watch;

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use clap::{Args, Parser, error::ErrorKind};
use serde_json::{Map, Value, json};

use crate::{POD_ANNOTATIONS, default_socket};

/// The plugin's `type`, and its file name in the bin directory.
const PLUGIN: &str = "redirect-cni";

#[derive(Debug, Args)]
struct Dirs {
    /// The node's CNI bin directory, as mounted here
    #[arg(long, value_name = "DIR", default_value = "/host/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The node's CNI configuration directory, as mounted here
    #[arg(long, value_name = "DIR", default_value = "/host/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// This file of --cni-conf-dir instead of the one the runtime uses (the first in byte order
    /// that loads); X.conf and X.conflist stand for each other, whichever exists [Istio:
    /// CNI_CONF_NAME]
    #[arg(long, value_name = "NAME")]
    cni_conf_name: Option<String>,
}

#[derive(Debug, Parser)]
#[command(
    name = "redirect-cni install",
    about = "Copies redirect-cni into the node's CNI bin directory and chains it last into the node's CNI \
             network configuration. The plugin's options left out (--proxy, --selector, \
             --exclude-namespaces, --iptables-args, the --ambient ones) are left out of its entry, which \
             then takes the plugin's defaults; running install again with other options updates the \
             entry.",
    disable_version_flag = true
)]
struct InstallArgs {
    #[command(flatten)]
    dirs: Dirs,
    /// The node agent's control socket [entry: agentSocket]
    #[arg(long, value_name = "PATH", default_value_os_t = default_socket())]
    agent_socket: PathBuf,
    /// The proxy for pods without a sidecar that `--selector all` enrolls, unless their
    /// annotation says otherwise [entry: proxy; plugin default: embedded]
    #[arg(long, value_name = "MODE", value_parser = ["embedded", "none"])]
    proxy: Option<String>,
    /// Which pods are enrolled: injected (those Istio injected with a sidecar, as istio-cni
    /// chooses, and those that ask for redirect's proxy) or all [entry: selector; plugin
    /// default: injected]
    #[arg(long, value_name = "SELECTOR", value_parser = ["injected", "all"])]
    selector: Option<String>,
    /// Ambient mode: enroll the pods istio-cni's ambient mode would (label
    /// istio.io/dataplane-mode=ambient on the pod or its namespace) with istio-cni's in-pod
    /// rules; needs --service-account, as labels come from the API server [entry:
    /// ambientEnabled]
    #[arg(long, requires = "service_account")]
    ambient: bool,
    /// An ambient pod's proxy: none (ztunnel, which the agent hands the pod over ZDS) or
    /// embedded (the agent's own, in ztunnel's place) [entry: ambientProxy; plugin default:
    /// none]
    #[arg(long, value_name = "MODE", value_parser = ["embedded", "none"], requires = "ambient")]
    ambient_proxy: Option<String>,
    /// Capture an ambient pod's DNS unless its ambient.istio.io/dns-capture annotation says
    /// otherwise (istio-cni's AMBIENT_DNS_CAPTURE) [entry: ambientDnsCapture; plugin default:
    /// true]
    #[arg(long, value_name = "BOOL", requires = "ambient")]
    ambient_dns_capture: Option<bool>,
    /// Namespaces never enrolled, comma-separated; "" for none [entry: excludeNamespaces; plugin
    /// default: kube-system]
    #[arg(long, value_name = "NS,...", value_parser = namespaces)]
    exclude_namespaces: Option<Namespaces>,
    /// istio-iptables flags for every pod, as FLAG VALUE pairs in one argument separated by
    /// spaces, e.g. --iptables-args "-d 15090,15021 -b *"; "" for none [entry: args]
    #[arg(long, value_name = "FLAGS", allow_hyphen_values = true, value_parser = iptables_args)]
    iptables_args: Option<IptablesArgs>,
    /// After installing, keep the plugin installed and chained: re-chain when another file
    /// becomes the runtime's, or the file is rewritten without the plugin; wait for a
    /// configuration if there is none yet. Runs until SIGTERM or SIGINT, which leave the plugin
    /// chained
    #[arg(long)]
    watch: bool,
    /// With --watch: uninstall on SIGTERM or SIGINT (new pods then start uncaptured until the
    /// next install)
    #[arg(long, conflicts_with = "uninstall_if_removed")]
    uninstall_on_exit: bool,
    /// With --watch and --service-account: on SIGTERM or SIGINT, ask the API server whether
    /// this DaemonSet is gone or being deleted, and uninstall only then; an update, a drain or
    /// a reboot leaves the plugin chained, and so does an API server that does not answer
    #[arg(long, value_name = "NAMESPACE/NAME", value_parser = daemonset, requires = "service_account")]
    uninstall_if_removed: Option<(String, String)>,
    /// Write the plugin a kubeconfig from this service account directory (its token and
    /// ca.crt, as mounted in the install container) into the CNI configuration directory, so
    /// that it reads each pod from the API server as istio-cni does; --watch rewrites it when
    /// the token rotates [entry: kubeconfig]
    #[arg(long, value_name = "DIR")]
    service_account: Option<PathBuf>,
    /// The API server for that kubeconfig [default: from KUBERNETES_SERVICE_HOST and _PORT,
    /// which the kubelet sets]
    #[arg(long, value_name = "URL", requires = "service_account")]
    kube_server: Option<String>,
    /// The CNI configuration directory as the node sees it, where the runtime's plugin reads
    /// the kubeconfig (--cni-conf-dir is where this container sees it)
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    host_cni_conf_dir: PathBuf,
}

#[derive(Debug, Parser)]
#[command(
    name = "redirect-cni uninstall",
    about = "Takes redirect-cni out of the node's CNI network configuration (every file that chains it, or \
             only --cni-conf-name) and removes it from the CNI bin directory. A .conf that install \
             converted stays a one-plugin .conflist.",
    disable_version_flag = true
)]
struct UninstallArgs {
    #[command(flatten)]
    dirs: Dirs,
}

#[derive(Debug, Clone)]
struct Namespaces(Vec<String>);

#[derive(Debug, Clone)]
struct IptablesArgs(Vec<String>);

/// Kubernetes namespace names are RFC 1123 labels.
fn namespaces(value: &str) -> Result<Namespaces, String> {
    let mut names = Vec::new();
    for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if !redirect_api::rfc1123_label(name) {
            return Err(format!(
                "'{name}' is not a namespace name (lower-case letters, digits and '-', at most 63 characters)"
            ));
        }
        names.push(name.to_owned());
    }
    Ok(Namespaces(names))
}

/// `NAMESPACE/NAME` of a DaemonSet: a namespace name and an object name (a DNS subdomain).
fn daemonset(value: &str) -> Result<(String, String), String> {
    let bad = || format!("'{value}': expected NAMESPACE/NAME of a DaemonSet, e.g. kube-system/redirect-agent");
    let (namespace, name) = value.split_once('/').ok_or_else(bad)?;
    if !redirect_api::rfc1123_label(namespace) || !redirect_api::dns_subdomain(name) {
        return Err(bad());
    }
    Ok((namespace.to_owned(), name.to_owned()))
}

/// What `install --watch` does with the plugin when it is stopped.
#[derive(Debug, Clone)]
enum OnExit {
    /// Leave it chained: an update or a reboot must not let pods start uncaptured.
    Keep,
    Uninstall,
    /// Uninstall if the API server says this DaemonSet (namespace, name) is going away.
    UninstallIfRemoved(String, String),
}

/// Pairs, as the plugin's `args` holds them, checked as the plugin checks them.
fn iptables_args(value: &str) -> Result<IptablesArgs, String> {
    let words: Vec<String> = value.split_whitespace().map(str::to_owned).collect();
    crate::pod::check_args(&words).map_err(|e| e.trim_start_matches("args: ").to_owned())?;
    Ok(IptablesArgs(words))
}

enum Parsed<T> {
    Run(T),
    Help(String),
}

/// clap's error in one line: its message and hints, without the usage block.
fn parse<T: Parser>(command: &str, args: &[String]) -> Result<Parsed<T>, String> {
    let argv = std::iter::once(format!("redirect-cni {command}")).chain(args.iter().cloned());
    match T::try_parse_from(argv) {
        Ok(parsed) => Ok(Parsed::Run(parsed)),
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            Ok(Parsed::Help(e.render().to_string().trim_end().to_owned()))
        }
        Err(e) => {
            let text = e.render().to_string();
            let line = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:"))
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
                .collect::<Vec<_>>()
                .join(" ");
            let line = line.strip_prefix("error: ").unwrap_or(&line);
            Err(format!("{line} (see redirect-cni {command} --help)"))
        }
    }
}

/// The node's directories, checked, and where the plugin's kubeconfig comes from.
#[derive(Debug, Clone)]
struct Node {
    bin_dir: PathBuf,
    conf_dir: PathBuf,
    conf_name: Option<String>,
    kubeconfig: Option<kubeconfig::Source>,
}

/// Writes the plugin's kubeconfig if one is configured and `writer` should: its path then.
fn write_kubeconfig(node: &Node, writer: &mut kubeconfig::Writer) -> Result<Option<String>, String> {
    let Some(source) = &node.kubeconfig else {
        return Ok(None);
    };
    let wrote = writer.write(&node.conf_dir, &source.render()?)?;
    Ok(wrote.then(|| node.conf_dir.join(kubeconfig::FILE).display().to_string()))
}

impl Dirs {
    fn check(self) -> Result<Node, String> {
        for (flag, dir) in [
            ("--cni-bin-dir", &self.cni_bin_dir),
            ("--cni-conf-dir", &self.cni_conf_dir),
        ] {
            match fs::metadata(dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(format!("{flag} {}: not a directory", dir.display())),
                Err(e) => {
                    return Err(format!(
                        "{flag} {}: {e}: expected the node's directory, mounted there",
                        dir.display()
                    ));
                }
            }
        }
        if let Some(name) = &self.cni_conf_name {
            let plain = !name.contains('/') && !name.starts_with('.');
            if !plain || !(name.ends_with(".conf") || name.ends_with(".conflist")) {
                return Err(format!(
                    "--cni-conf-name '{name}': expected a file name in --cni-conf-dir ending in .conf or .conflist"
                ));
            }
        }
        Ok(Node {
            bin_dir: self.cni_bin_dir,
            conf_dir: self.cni_conf_dir,
            conf_name: self.cni_conf_name,
            kubeconfig: None,
        })
    }
}

impl InstallArgs {
    /// The plugin's entry in the list: what the plugin reads from its network configuration.
    fn entry(&self) -> Result<Value, String> {
        let socket = self
            .agent_socket
            .to_str()
            .ok_or_else(|| format!("--agent-socket {}: not UTF-8", self.agent_socket.display()))?;
        if !self.agent_socket.is_absolute() {
            return Err(format!(
                "--agent-socket {socket}: expected an absolute path (the runtime runs the plugin from anywhere)"
            ));
        }
        let mut entry = Map::new();
        entry.insert("type".into(), json!(PLUGIN));
        entry.insert("agentSocket".into(), json!(socket));
        if let Some(proxy) = &self.proxy {
            entry.insert("proxy".into(), json!(proxy));
        }
        if let Some(selector) = &self.selector {
            entry.insert("selector".into(), json!(selector));
        }
        if self.ambient {
            entry.insert("ambientEnabled".into(), json!(true));
        }
        if let Some(proxy) = &self.ambient_proxy {
            entry.insert("ambientProxy".into(), json!(proxy));
        }
        if let Some(dns) = self.ambient_dns_capture {
            entry.insert("ambientDnsCapture".into(), json!(dns));
        }
        if let Some(Namespaces(names)) = &self.exclude_namespaces {
            entry.insert("excludeNamespaces".into(), json!(names));
        }
        if let Some(IptablesArgs(args)) = &self.iptables_args {
            entry.insert("args".into(), json!(args));
        }
        if self.service_account.is_some() {
            if !self.host_cni_conf_dir.is_absolute() {
                return Err(format!(
                    "--host-cni-conf-dir {}: expected an absolute path",
                    self.host_cni_conf_dir.display()
                ));
            }
            let path = self.host_cni_conf_dir.join(kubeconfig::FILE);
            let path = path
                .to_str()
                .ok_or_else(|| format!("--host-cni-conf-dir {}: not UTF-8", self.host_cni_conf_dir.display()))?;
            entry.insert("kubeconfig".into(), json!(path));
        }
        entry.insert("capabilities".into(), json!({ POD_ANNOTATIONS: true }));
        Ok(Value::Object(entry))
    }
}

/// `redirect-cni install`: what the DaemonSet runs. Copies this binary into the node's CNI bin
/// directory and chains the plugin into the node's network configuration; with `--watch`, keeps
/// it so until SIGTERM or SIGINT and returns then. A runtime never passes arguments, so
/// arguments mean this mode.
pub fn install(args: &[String]) -> Result<String, String> {
    let args = match parse::<InstallArgs>("install", args)? {
        Parsed::Run(a) => a,
        Parsed::Help(help) => return Ok(help),
    };
    if args.uninstall_on_exit && !args.watch {
        return Err("--uninstall-on-exit applies to --watch only: add --watch or leave it out".into());
    }
    if args.uninstall_if_removed.is_some() && !args.watch {
        return Err("--uninstall-if-removed applies to --watch only: add --watch or leave it out".into());
    }
    let on_exit = match (&args.uninstall_if_removed, args.uninstall_on_exit) {
        (Some((namespace, name)), _) => OnExit::UninstallIfRemoved(namespace.clone(), name.clone()),
        (None, true) => OnExit::Uninstall,
        (None, false) => OnExit::Keep,
    };
    let entry = args.entry()?;
    let mut node = args.dirs.check()?;
    if let Some(account) = args.service_account {
        let source = kubeconfig::Source::new(account, args.kube_server)?;
        // Before anything is written: a missing token fails install and changes nothing.
        source.render()?;
        node.kubeconfig = Some(source);
    }
    if args.watch {
        return watch::run(&node, &entry, &on_exit);
    }
    let bin = install_bin(&node.bin_dir)?;
    let scan = find(&node)?;
    report_skipped(&scan.skipped);
    let conf = scan.chosen.ok_or_else(|| missing(&node))?;
    // The kubeconfig before the entry that names it: the plugin never reads a missing one.
    let wrote = write_kubeconfig(&node, &mut kubeconfig::Writer::new())?;
    let chained = conf::chain(&conf, &entry)?;
    Ok(match wrote {
        Some(path) => format!("{bin}; wrote {path}; {chained}"),
        None => format!("{bin}; {chained}"),
    })
}

/// `redirect-cni uninstall`: takes the plugin out of every file that chains it (only
/// `--cni-conf-name` and its twin when given) and out of the bin directory. Nothing to remove is
/// success.
pub fn uninstall(args: &[String]) -> Result<String, String> {
    let args = match parse::<UninstallArgs>("uninstall", args)? {
        Parsed::Run(a) => a,
        Parsed::Help(help) => return Ok(help),
    };
    remove(&args.dirs.check()?)
}

fn remove(node: &Node) -> Result<String, String> {
    let files = match &node.conf_name {
        Some(name) => {
            let twin = name
                .strip_suffix("list")
                .map_or_else(|| format!("{name}list"), str::to_owned);
            [name, &twin]
                .into_iter()
                .map(|n| node.conf_dir.join(n))
                .filter(|p| p.exists())
                .collect()
        }
        None => conf::candidates(&node.conf_dir)?,
    };
    let mut done = Vec::new();
    for file in files {
        if conf::unchain(&file)? {
            done.push(file.display().to_string());
        }
    }
    if kubeconfig::remove(&node.conf_dir)? {
        done.push(node.conf_dir.join(kubeconfig::FILE).display().to_string());
    }
    let bin = node.bin_dir.join(PLUGIN);
    match fs::remove_file(&bin) {
        Ok(()) => done.push(bin.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("remove {}: {e}", bin.display())),
    }
    if done.is_empty() {
        return Ok(format!(
            "nothing to remove: no configuration in {} chains {PLUGIN} and {} does not exist",
            node.conf_dir.display(),
            bin.display()
        ));
    }
    Ok(format!("removed {PLUGIN} from {}", done.join(", ")))
}

/// The file to chain into: the named one, or the one the runtime uses.
fn find(node: &Node) -> Result<conf::Scan, String> {
    match &node.conf_name {
        Some(name) => Ok(conf::Scan {
            chosen: conf::named(&node.conf_dir, name)?,
            skipped: Vec::new(),
        }),
        None => conf::scan(&node.conf_dir),
    }
}

fn missing(node: &Node) -> String {
    match &node.conf_name {
        Some(name) => format!(
            "--cni-conf-name {name}: neither it nor its .conf/.conflist twin exists in {}",
            node.conf_dir.display()
        ),
        None => format!(
            "no CNI network configuration in {} (a .conf or .conflist that loads): install the main CNI plugin first",
            node.conf_dir.display()
        ),
    }
}

fn report_skipped(skipped: &[(PathBuf, String)]) {
    for (file, why) in skipped {
        eprintln!("{PLUGIN}: skipped {}: {why}", file.display());
    }
}

/// What installing the binary did.
#[derive(Debug)]
enum Bin {
    Copied(PathBuf),
    Current(PathBuf),
}

impl std::fmt::Display for Bin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Copied(p) => write!(f, "installed {}", p.display()),
            Self::Current(p) => write!(f, "{} is current", p.display()),
        }
    }
}

/// Identity of the installed binary as last checked, so that `--watch` compares contents only
/// when something about the file changed.
type Stamp = (u64, u64, i64, i64);

fn stamp(m: &fs::Metadata) -> Stamp {
    (m.ino(), m.len(), m.mtime(), m.mtime_nsec())
}

/// Copies this binary to `<bin_dir>/redirect-cni` unless the same bytes are there.
fn install_bin(bin_dir: &Path) -> Result<Bin, String> {
    install_bin_cached(bin_dir, &mut None)
}

/// As [`install_bin`], trusting `last` while the file's stamp has not changed.
fn install_bin_cached(bin_dir: &Path, last: &mut Option<Stamp>) -> Result<Bin, String> {
    let target = bin_dir.join(PLUGIN);
    let current = fs::metadata(&target).ok().map(|m| stamp(&m));
    if current.is_some() && current == *last {
        return Ok(Bin::Current(target));
    }
    let me = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let mine = fs::read(&me).map_err(|e| format!("read {}: {e}", me.display()))?;
    if current.is_some_and(|(_, len, ..)| len == mine.len() as u64) && fs::read(&target).is_ok_and(|t| t == mine) {
        *last = current;
        return Ok(Bin::Current(target));
    }
    // A copy and a rename: a runtime running the plugin meanwhile runs the old or the new one.
    let tmp = bin_dir.join(format!(".{PLUGIN}.tmp"));
    let copied = fs::write(&tmp, &mine)
        .and_then(|()| fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)))
        .and_then(|()| fs::rename(&tmp, &target));
    if let Err(e) = copied {
        let _ = fs::remove_file(&tmp);
        return Err(format!("install {}: {e}", target.display()));
    }
    *last = fs::metadata(&target).ok().map(|m| stamp(&m));
    Ok(Bin::Copied(target))
}

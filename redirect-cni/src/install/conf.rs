//! The node's CNI network configuration: which file the runtime uses, and chaining into it or
//! out of it as Istio's install-cni does (`getDefaultCNINetwork`, `insertCNIConfig`,
//! `Cleanup`; docs/research/istio-cni.md §5).

use std::{
    fmt,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use serde_json::{Value, json};

use super::PLUGIN;

/// Istio's plugin: chained with ours, a pod would be captured twice.
const ISTIO_CNI: &str = "istio-cni";

/// A configuration file that loads as the runtime loads it.
#[derive(Debug, Clone)]
pub(super) struct Loaded {
    pub path: PathBuf,
    /// As read, to tell whether someone else rewrote the file before we write it.
    bytes: Vec<u8>,
    json: Value,
}

impl Loaded {
    fn is_list(&self) -> bool {
        is_list(&self.path)
    }

    fn plugins(&self) -> Vec<&Value> {
        if self.is_list() {
            self.json["plugins"]
                .as_array()
                .map(|p| p.iter().collect())
                .unwrap_or_default()
        } else {
            vec![&self.json]
        }
    }
}

/// What a scan of the directory found: the runtime's file, and the files it passed over.
#[derive(Debug, Default)]
pub(super) struct Scan {
    pub chosen: Option<Loaded>,
    /// `(file, why it does not load)`, for the files before the chosen one.
    pub skipped: Vec<(PathBuf, String)>,
}

/// What chaining did to the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Chained {
    Added(PathBuf),
    Updated(PathBuf),
    Converted { from: PathBuf, to: PathBuf },
    UpToDate(PathBuf),
}

impl Chained {
    /// The file that chains the plugin now.
    pub fn path(&self) -> &Path {
        match self {
            Self::Added(p) | Self::Updated(p) | Self::UpToDate(p) | Self::Converted { to: p, .. } => p,
        }
    }
}

impl fmt::Display for Chained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Added(p) => write!(f, "chained {PLUGIN} into {}", p.display()),
            Self::Updated(p) => write!(f, "updated {PLUGIN}'s entry in {}", p.display()),
            Self::Converted { from, to } => write!(
                f,
                "chained {PLUGIN} into {} (converted from {}, which is gone)",
                to.display(),
                from.display()
            ),
            Self::UpToDate(p) => write!(f, "{} already chains {PLUGIN}, up to date", p.display()),
        }
    }
}

/// A `.conf` holds one plugin at the top level; a `.conflist` a `plugins` list. The extension
/// decides, as it decides how libcni loads the file.
fn is_list(path: &Path) -> bool {
    path.as_os_str().as_encoded_bytes().ends_with(b".conflist")
}

/// Whether the runtime would consider this file: libcni's `ConfFiles(dir, [".conf",
/// ".conflist"])`, which takes `filepath.Ext`. `.json` is not among them, as Istio passes them.
fn is_candidate(name: &[u8]) -> bool {
    name.ends_with(b".conf") || name.ends_with(b".conflist")
}

/// The files of `dir` the runtime would consider, in its order: Go's `sort.Strings`, byte order.
pub(super) fn candidates(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("read {}: {e}", dir.display()))?;
        // libcni skips directories but not symlinks, which it reads through.
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name();
        if is_candidate(name.as_encoded_bytes()) {
            names.push(name);
        }
    }
    names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// Loads a file with the checks libcni makes (`ConfListFromBytes`, `ConfFromBytes`): a list
/// needs a string `name` and at least one plugin, each with a `type`; a single config a `type`.
pub(super) fn load(path: &Path) -> Result<Loaded, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let json: Value = serde_json::from_slice(&bytes).map_err(|e| format!("not valid JSON ({e})"))?;
    let Some(top) = json.as_object() else {
        return Err("not a JSON object".into());
    };
    for key in ["name", "cniVersion"] {
        if top.get(key).is_some_and(|v| !v.is_string()) {
            return Err(format!("'{key}' is not a string"));
        }
    }
    let has_type = |v: &Value| v["type"].as_str().is_some_and(|t| !t.is_empty());
    if is_list(path) {
        if !top.get("name").is_some_and(Value::is_string) {
            return Err("a .conflist without a 'name'".into());
        }
        let plugins = json["plugins"]
            .as_array()
            .ok_or("a .conflist without a 'plugins' list")?;
        if plugins.is_empty() {
            return Err("no plugins in its 'plugins' list".into());
        }
        if let Some(i) = plugins.iter().position(|p| !has_type(p)) {
            return Err(format!("plugin {i} has no 'type'"));
        }
    } else if !has_type(&json) {
        return Err("no 'type'; perhaps this is a .conflist?".into());
    }
    Ok(Loaded {
        path: path.to_owned(),
        bytes,
        json,
    })
}

/// The file the runtime uses: the first in byte order that loads (the kubelet's and Istio's
/// `getDefaultCNINetwork`).
pub(super) fn scan(dir: &Path) -> Result<Scan, String> {
    let mut scan = Scan::default();
    for path in candidates(dir)? {
        match load(&path) {
            Ok(loaded) => {
                scan.chosen = Some(loaded);
                break;
            }
            Err(why) => scan.skipped.push((path, why)),
        }
    }
    Ok(scan)
}

/// `--cni-conf-name`: that file, or its twin when only the twin exists (Istio's
/// `getCNIConfigFilepath`: `X.conf` becomes `X.conflist` once chained). `None` while neither
/// exists.
pub(super) fn named(dir: &Path, name: &str) -> Result<Option<Loaded>, String> {
    let twin = match name.strip_suffix(".conflist") {
        Some(stem) => format!("{stem}.conf"),
        None => format!("{name}list"),
    };
    let Some(path) = [name, &twin].into_iter().map(|n| dir.join(n)).find(|p| p.exists()) else {
        return Ok(None);
    };
    load(&path)
        .map(Some)
        .map_err(|why| format!("{}: {why}", path.display()))
}

/// Chains `entry` into `conf` as Istio's `insertCNIConfig` does: a `.conflist` loses any entry
/// of ours and gets `entry` last; a `.conf` becomes a two-plugin `.conflist`. Refuses a file
/// that chains istio-cni, leaving it untouched.
pub(super) fn chain(conf: &Loaded, entry: &Value) -> Result<Chained, String> {
    let mut conf = conf.clone();
    // The main plugin's agent may rewrite the file while we do: our rewrite, made from what we
    // read, would undo its change. Start over from its version instead.
    for _ in 0..3 {
        if let Some(done) = chain_once(&conf, entry)? {
            return Ok(done);
        }
        conf = load(&conf.path).map_err(|why| format!("{}: {why}", conf.path.display()))?;
    }
    Err(format!(
        "{}: rewritten by another writer at every attempt to chain {PLUGIN}",
        conf.path.display()
    ))
}

/// `None` when the file changed since it was read.
fn chain_once(conf: &Loaded, entry: &Value) -> Result<Option<Chained>, String> {
    let path = &conf.path;
    if conf.plugins().iter().any(|p| p["type"] == ISTIO_CNI) {
        return Err(format!(
            "{} chains {ISTIO_CNI}, which would capture the same pods a second time: remove \
             {ISTIO_CNI} from it (uninstall Istio's CNI node agent) or do not install {PLUGIN}",
            path.display()
        ));
    }
    let was = (path.as_path(), conf.bytes.as_slice());
    if conf.is_list() {
        let mut json = conf.json.clone();
        let plugins = json["plugins"].as_array_mut().ok_or("no 'plugins' list")?;
        let ours: Vec<&Value> = plugins.iter().filter(|p| p["type"] == PLUGIN).collect();
        // Wherever it stands: two installers that each insisted on being last would rewrite the
        // file in turn for ever.
        if ours.len() == 1 && ours[0] == entry {
            return Ok(Some(Chained::UpToDate(path.clone())));
        }
        let had = !ours.is_empty();
        plugins.retain(|p| p["type"] != PLUGIN);
        plugins.push(entry.clone());
        if !write_atomic(path, &json, was)? {
            return Ok(None);
        }
        return Ok(Some(if had {
            Chained::Updated(path.clone())
        } else {
            Chained::Added(path.clone())
        }));
    }
    let mut single = conf.json.clone();
    if let Some(top) = single.as_object_mut() {
        top.remove("cniVersion");
    }
    let list = json!({ "name": "k8s-pod-network", "cniVersion": "0.3.1", "plugins": [single, entry] });
    let mut to = path.clone().into_os_string();
    to.push("list");
    let to = PathBuf::from(to);
    // Istio renames over it; here only an earlier conversion of ours may be replaced (the main
    // plugin wrote its .conf again), never a list someone else keeps beside the .conf.
    if to.exists() && !chains_us(&to) {
        return Err(format!(
            "{} must become {} to chain {PLUGIN}, but {} already exists and is not an earlier \
             conversion: remove one of the two",
            path.display(),
            to.display(),
            to.display()
        ));
    }
    if !write_atomic(&to, &list, was)? {
        return Ok(None);
    }
    std::fs::remove_file(path).map_err(|e| format!("remove {}: {e}", path.display()))?;
    Ok(Some(Chained::Converted { from: path.clone(), to }))
}

/// Whether `path` is a list that holds an entry of ours.
pub(super) fn chains_us(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    serde_json::from_slice::<Value>(&bytes).is_ok_and(|v| {
        v["plugins"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["type"] == PLUGIN))
    })
}

/// Takes our entry out of `path` (Istio's `Cleanup`: a converted `.conf` stays a one-plugin
/// list). `Ok(false)` when it holds none, or is not a list at all.
pub(super) fn unchain(path: &Path) -> Result<bool, String> {
    for _ in 0..3 {
        let bytes = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
        let Ok(mut json) = serde_json::from_slice::<Value>(&bytes) else {
            return Ok(false);
        };
        let Some(plugins) = json["plugins"].as_array_mut() else {
            return Ok(false);
        };
        let before = plugins.len();
        plugins.retain(|p| p["type"] != PLUGIN);
        if plugins.len() == before {
            return Ok(false);
        }
        if write_atomic(path, &json, (path, &bytes))? {
            return Ok(true);
        }
    }
    Err(format!(
        "{}: rewritten by another writer at every attempt to remove {PLUGIN}",
        path.display()
    ))
}

/// Writes `json` to `path` through a temporary file in the same directory and a rename, so a
/// runtime reading it meanwhile sees the old or the new file; the temporary name ends in neither
/// `.conf` nor `.conflist`, so no runtime loads it. `Ok(false)`, and nothing written, when the
/// file `was` names no longer holds the bytes it was made from: checked just before the rename,
/// the window for a lost update is that of two system calls.
pub(super) fn write_atomic(path: &Path, json: &Value, was: (&Path, &[u8])) -> Result<bool, String> {
    let mut bytes = serde_json::to_vec_pretty(json).map_err(|e| format!("encode {}: {e}", path.display()))?;
    bytes.push(b'\n');
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".redirect-cni.tmp");
    let tmp = dir.join(name);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        // The umask may have narrowed the mode; Istio leaves 0644 and so do we.
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.sync_all()?;
        if std::fs::read(was.0)? != was.1 {
            std::fs::remove_file(&tmp)?;
            return Ok(false);
        }
        std::fs::rename(&tmp, path).map(|()| true)
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("write {}: {e}", path.display())
    })
}

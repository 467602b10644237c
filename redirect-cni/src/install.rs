//! `redirect-cni install`: puts the plugin on the node and chains it into the node's CNI
//! network configuration.

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::{POD_ANNOTATIONS, default_socket};

/// `redirect-cni install`: what the DaemonSet's init container runs. Copies this binary into
/// the node's CNI bin directory and chains the plugin into the node's network configuration
/// (the first `.conflist` in the directory, as the runtime picks it), once. A runtime never
/// passes arguments, so arguments mean this mode.
pub fn install(args: &[String]) -> Result<String, String> {
    let mut bin_dir = PathBuf::from("/host/opt/cni/bin");
    let mut conf_dir = PathBuf::from("/host/etc/cni/net.d");
    let mut socket = default_socket();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--cni-bin-dir" => bin_dir = value()?.into(),
            "--cni-conf-dir" => conf_dir = value()?.into(),
            "--agent-socket" => socket = value()?.into(),
            other => {
                return Err(format!(
                    "unknown argument '{other}': expected install [--cni-bin-dir DIR] [--cni-conf-dir DIR] [--agent-socket PATH]"
                ));
            }
        }
    }
    let me = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let target = bin_dir.join("redirect-cni");
    let tmp = bin_dir.join(".redirect-cni.tmp");
    // A copy and a rename: a runtime running the plugin meanwhile sees the old or the new one.
    std::fs::copy(&me, &tmp).map_err(|e| format!("copy to {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &target).map_err(|e| format!("install {}: {e}", target.display()))?;
    let mut confs: Vec<PathBuf> = std::fs::read_dir(&conf_dir)
        .map_err(|e| format!("read {}: {e}", conf_dir.display()))?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
        .collect();
    confs.sort();
    let conf = confs.first().ok_or_else(|| {
        format!(
            "no .conflist in {}: install the main CNI plugin first",
            conf_dir.display()
        )
    })?;
    let text = std::fs::read(conf).map_err(|e| format!("read {}: {e}", conf.display()))?;
    let mut list: Value = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", conf.display()))?;
    let plugins = list["plugins"]
        .as_array_mut()
        .ok_or_else(|| format!("{}: no plugins list", conf.display()))?;
    if plugins.iter().any(|p| p["type"] == "redirect-cni") {
        return Ok(format!("{} already chains redirect-cni", conf.display()));
    }
    plugins.push(json!({ "type": "redirect-cni", "agentSocket": socket, "capabilities": { POD_ANNOTATIONS: true } }));
    let tmp = conf.with_extension("conflist.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&list).unwrap_or_default())
        .and_then(|()| std::fs::rename(&tmp, conf))
        .map_err(|e| format!("write {}: {e}", conf.display()))?;
    Ok(format!(
        "installed {} and chained it in {}",
        target.display(),
        conf.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_chains_the_plugin_once() {
        let dir = std::env::temp_dir().join(format!("redirect-cni-install-{}", std::process::id()));
        let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        let list = json!({ "cniVersion": "1.0.0", "name": "k8s", "plugins": [{ "type": "ptp" }] });
        std::fs::write(conf.join("10-k8s.conflist"), list.to_string()).unwrap();
        std::fs::write(conf.join("99-other.conflist"), list.to_string()).unwrap();
        let args: Vec<String> = [
            "--cni-bin-dir",
            bin.to_str().unwrap(),
            "--cni-conf-dir",
            conf.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        install(&args).unwrap();
        assert!(install(&args).unwrap().contains("already"));
        let got: Value = serde_json::from_slice(&std::fs::read(conf.join("10-k8s.conflist")).unwrap()).unwrap();
        assert_eq!(got["plugins"][1]["type"], "redirect-cni");
        assert_eq!(got["plugins"].as_array().unwrap().len(), 2);
        assert!(bin.join("redirect-cni").is_file());
        let untouched: Value = serde_json::from_slice(&std::fs::read(conf.join("99-other.conflist")).unwrap()).unwrap();
        assert_eq!(untouched, list);
        assert!(install(&["--bogus".to_owned()]).unwrap_err().contains("'--bogus'"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

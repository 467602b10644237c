//! The kustomize base (deploy/kustomization.yaml) rendered by kubectl's own kustomize: it
//! yields exactly the checked-in objects, each valid against its Kubernetes API type, and an
//! overlay that names another registry changes every container's image and nothing else.

use std::{path::Path, process::Command};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use serde::Deserialize as _;
use serde_json::Value;

const DEPLOY: &str = env!("CARGO_MANIFEST_DIR");

fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| {
            let v = serde_yaml::Value::deserialize(d).expect("YAML");
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// `kubectl kustomize DIR`: the rendered objects.
fn render(dir: &Path) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl (`cargo xtask setup` installs it)");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    documents(&String::from_utf8(out.stdout).unwrap())
}

/// The object as its API type, which must keep every field (one it drops is one the API
/// server would not know).
fn check_typed(v: &Value) {
    fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) {
        let t: T = serde_json::from_value(v.clone()).expect("an API object");
        assert_eq!(&serde_json::to_value(&t).unwrap(), v, "a field the API does not know");
    }
    match (v["apiVersion"].as_str(), v["kind"].as_str()) {
        (Some("apps/v1"), Some("DaemonSet")) => typed::<DaemonSet>(v),
        (Some("v1"), Some("ServiceAccount")) => typed::<ServiceAccount>(v),
        (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRole")) => typed::<ClusterRole>(v),
        (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRoleBinding")) => typed::<ClusterRoleBinding>(v),
        (Some("rbac.authorization.k8s.io/v1"), Some("Role")) => typed::<Role>(v),
        (Some("rbac.authorization.k8s.io/v1"), Some("RoleBinding")) => typed::<RoleBinding>(v),
        other => panic!("an object of an unexpected kind: {other:?}"),
    }
}

fn key(v: &Value) -> String {
    format!("{}/{}", v["kind"], v["metadata"]["name"])
}

fn sorted(mut objects: Vec<Value>) -> Vec<Value> {
    objects.sort_by_key(key);
    objects
}

#[test]
fn the_base_renders_the_checked_in_objects_each_valid() {
    let rendered = sorted(render(Path::new(DEPLOY)));
    let mut sources = Vec::new();
    for file in ["rbac.yaml", "daemonset.yaml"] {
        sources.extend(documents(
            &std::fs::read_to_string(Path::new(DEPLOY).join(file)).unwrap(),
        ));
    }
    assert_eq!(rendered, sorted(sources));
    rendered.iter().for_each(check_typed);
}

/// An overlay of the base in a directory of its own (kustomize refuses one inside its base),
/// removed on drop.
struct Overlay(std::path::PathBuf);

impl Overlay {
    /// `kustomization` after `bases: [base]`, with the base linked in and `files` copied from
    /// deploy/.
    fn new(tag: &str, kustomization: &str, files: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("redirect-kustomize-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let me = Self(dir);
        std::os::unix::fs::symlink(DEPLOY, me.0.join("base")).unwrap();
        for file in files {
            std::fs::copy(Path::new(DEPLOY).join(file), me.0.join(file)).unwrap();
        }
        // `bases`, not `resources`: Debian 12's kubectl (1.20) has kustomize 2.0, which takes
        // a directory only there; newer ones take both.
        std::fs::write(
            me.0.join("kustomization.yaml"),
            format!("bases:\n  - base\n{kustomization}"),
        )
        .unwrap();
        me
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn an_overlay_naming_another_registry_changes_only_the_images() {
    let dir = Overlay::new(
        "registry",
        "images:\n  - name: ghcr.io/redirect-mesh/redirect\n    newName: registry.example/redirect\n    newTag: dev\n",
        &[],
    );
    let base = sorted(render(Path::new(DEPLOY)));
    let overlay = sorted(render(&dir.0));
    overlay.iter().for_each(check_typed);
    let mut images = 0;
    let mut expected = base.clone();
    for object in expected.iter_mut().filter(|o| o["kind"] == "DaemonSet") {
        let spec = &mut object["spec"]["template"]["spec"];
        for list in ["initContainers", "containers"] {
            for c in spec[list].as_array_mut().into_iter().flatten() {
                c["image"] = "registry.example/redirect:dev".into();
                images += 1;
            }
        }
    }
    assert_eq!(images, 2, "the agent and install-cni");
    assert_eq!(overlay, expected);
}

#[test]
fn the_ambient_patch_adds_ztunnels_socket_and_ambient_selection_and_nothing_else() {
    let dir = Overlay::new(
        "ambient",
        "patchesJson6902:\n  - target: {group: apps, version: v1, kind: DaemonSet, name: redirect-agent, namespace: kube-system}\n    path: ambient.yaml\n",
        &["ambient.yaml"],
    );
    let overlay = sorted(render(&dir.0));
    overlay.iter().for_each(check_typed);
    let mut expected = sorted(render(Path::new(DEPLOY)));
    let ds = expected.iter_mut().find(|o| o["kind"] == "DaemonSet").unwrap();
    let spec = &mut ds["spec"]["template"]["spec"];
    let install = &mut spec["initContainers"][0];
    assert_eq!(install["name"], "install-cni");
    install["command"].as_array_mut().unwrap().push("--ambient".into());
    let agent = &mut spec["containers"][0];
    assert_eq!(agent["name"], "agent");
    let command = agent["command"].as_array_mut().unwrap();
    command.extend(["--ztunnel-socket".into(), "/var/run/ztunnel/ztunnel.sock".into()]);
    agent["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({ "name": "ztunnel", "mountPath": "/var/run/ztunnel" }));
    spec["volumes"].as_array_mut().unwrap().push(serde_json::json!({
        "name": "ztunnel",
        "hostPath": { "path": "/var/run/ztunnel", "type": "DirectoryOrCreate" }
    }));
    assert_eq!(overlay, expected);
}

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

#[test]
fn an_overlay_naming_another_registry_changes_only_the_images() {
    let dir = std::env::temp_dir().join(format!("redirect-kustomize-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    struct Gone<'a>(&'a Path);
    impl Drop for Gone<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
    let _gone = Gone(&dir);
    std::os::unix::fs::symlink(DEPLOY, dir.join("base")).unwrap();
    // `bases`, not `resources`: Debian 12's kubectl (1.20) has kustomize 2.0, which takes a
    // directory only there; newer ones take both.
    std::fs::write(
        dir.join("kustomization.yaml"),
        "bases:\n  - base\nimages:\n  - name: ghcr.io/redirect-mesh/redirect\n    newName: registry.example/redirect\n    newTag: dev\n",
    )
    .unwrap();
    let base = sorted(render(Path::new(DEPLOY)));
    let overlay = sorted(render(&dir));
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
